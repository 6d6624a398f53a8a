//! East-west calls: the cell a call to a service goes to, for a caller
//! (a sidecar, an SDK client) that holds its own endpoint sets.
//!
//! The table decides the cell (shard owner, fence, gzone or czone, nearest
//! cell); the caller's endpoint sets, fed by the service registry, say
//! which cells have an instance in rotation and pick the instance. So one
//! instance coming or going changes one endpoint set, not the table.

use std::borrow::Cow;

use atoll_model::ServiceKind;
use atoll_model::key::KeyOutcome;
use http::Method;

use crate::decide::{HeaderSource, Refusal, RequestInfo};
use crate::table::RoutingTable;
use crate::{CellId, ServiceId};

/// Where an east-west call goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call<'a> {
    /// The service called.
    pub service: ServiceId,
    /// The cell that serves it.
    pub cell: CellId,
    /// Whether it is a write.
    pub write: bool,
    /// The routing key, for unitized services.
    pub key: Option<Cow<'a, str>>,
    /// The shard, for unitized services.
    pub shard: Option<u32>,
    /// The shard map's epoch the call was routed at, for unitized
    /// services: the provider refuses a write routed at another.
    pub epoch: Option<u64>,
}

impl RoutingTable {
    /// Whether a request with `method` to `service` is a write.
    pub fn is_write(&self, service: ServiceId, method: &Method) -> bool {
        self.services
            .get(service as usize)
            .is_some_and(|s| s.writes.contains(method))
    }

    /// The service's kind.
    pub fn kind(&self, service: ServiceId) -> Option<ServiceKind> {
        self.services.get(service as usize).map(|s| s.kind)
    }

    /// Decides the cell of a call to `service`.
    ///
    /// - Unitized: the shard of the key the service's rule finds in the
    ///   request, else of `propagated` (the key the inbound request
    ///   carried: `x-atoll-key` or the `atoll.key` baggage member), goes to
    ///   its owner; a write to a fenced shard is refused.
    /// - Local: the caller's own cell (`nearest`) when it serves, else the
    ///   zone's, the region's, any cell's, by weight.
    /// - Global: writes to the gzone, reads to a czone of this region.
    ///
    /// `serves` says whether a cell has an instance of the service in
    /// rotation.
    pub fn decide_call<'a, H: HeaderSource + ?Sized>(
        &self,
        service_id: ServiceId,
        request: &'a RequestInfo<'a, H>,
        propagated: Option<&'a str>,
        nearest: Option<CellId>,
        serves: &impl Fn(CellId) -> bool,
    ) -> Result<Call<'a>, Refusal> {
        let Some(service) = self.services.get(service_id as usize) else {
            return Err(Refusal::NoRoute);
        };
        let write = service.writes.contains(request.method);
        let epoch = service.unit.as_ref().map(|u| u.epoch);
        // A key the rule cannot find in the call itself comes from the
        // inbound request, as the gateway set it.
        if let (Some(unit), Some(key)) = (&service.unit, propagated)
            && matches!(unit.rule.route(request), KeyOutcome::Missing(_))
        {
            let shard = atoll_model::key::shard_of(&unit.transform, unit.shards, key.as_bytes())
                .map_err(Refusal::InvalidKey)?;
            let owner = unit.owners[shard as usize];
            if write && unit.fenced[shard as usize] {
                return Err(Refusal::Fenced {
                    service: service_id,
                    shard,
                    epoch: unit.epoch,
                    cell: owner,
                });
            }
            return Ok(Call {
                service: service_id,
                cell: owner,
                write,
                key: Some(Cow::Borrowed(key)),
                shard: Some(shard),
                epoch,
            });
        }
        let choice = self.choose_cell_by(service_id, service, request, write, nearest, serves)?;
        if !serves(choice.cell) {
            return Err(Refusal::NoEndpoint {
                service: service_id,
                cell: Some(choice.cell),
            });
        }
        Ok(Call {
            service: service_id,
            cell: choice.cell,
            write,
            key: choice.key,
            shard: choice.shard,
            epoch: choice.shard.and(epoch),
        })
    }
}
