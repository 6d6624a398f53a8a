//! Who is calling, from the connection's verified client certificate
//! rather than from what the client writes.
//!
//! A node that connects with a certificate is the identity in it
//! (`atoll://<workspace>/<role>/<zone>/<name>`): the name, role, zone and
//! workspace it claims in `Hello`, a lease request or an endpoints report
//! must be those, or the call is refused. A request passed on by another
//! replica carries the identity that replica verified; it is taken only
//! from a connection whose certificate is a control-plane replica's.

use atoll_api::config::NodeIdentity;
use atoll_identity::{AtollId, Role};
use tonic::Status;

/// The verified identity of the connection a call came on, if its client
/// sent a certificate.
pub(crate) fn certified<T>(request: &tonic::Request<T>) -> Result<Option<AtollId>, Status> {
    let Some(peer) = request.extensions().get::<atoll_transport::Peer>() else {
        return Ok(None);
    };
    let Some(leaf) = peer.certificates.as_ref().and_then(|chain| chain.first()) else {
        return Ok(None);
    };
    atoll_identity::id_of_certificate(leaf)
        .map(Some)
        .map_err(|e| Status::unauthenticated(format!("the client certificate is not usable: {e}")))
}

/// The roles a node may claim with a certificate of `role`.
fn claims(role: Role) -> &'static [&'static str] {
    match role {
        Role::Gateway => &["gateway"],
        Role::Agent => &["agent"],
        Role::Sidecar => &["sidecar"],
        // An instance's certificate covers the app and the sidecar beside it.
        Role::Sdk => &["app", "sdk", "sidecar"],
        Role::Control => &["control"],
        Role::User => &[],
    }
}

/// Checks what a node claims against its certificate; the identity to use
/// is the certificate's (the claimed cell is kept: a certificate names a
/// zone, and a cell is checked against it where it matters).
pub(crate) fn check_claim(id: &AtollId, claimed: &NodeIdentity) -> Result<NodeIdentity, Status> {
    let workspace = if claimed.workspace.is_empty() {
        atoll_model::DEFAULT_WORKSPACE
    } else {
        claimed.workspace.as_str()
    };
    let zone = if id.has_zone() { id.zone.as_str() } else { "" };
    let fits = claimed.name == id.name
        && claims(id.role).contains(&claimed.role.as_str())
        && claimed.zone == zone
        && workspace == id.workspace;
    if !fits {
        return Err(Status::permission_denied(format!(
            "this connection's certificate is {id}, but the node claims name `{}`, role `{}`, zone `{}`, workspace `{workspace}`; a node is who its certificate says",
            claimed.name, claimed.role, claimed.zone
        )));
    }
    Ok(NodeIdentity {
        name: id.name.clone(),
        role: claimed.role.clone(),
        zone: zone.to_owned(),
        cell: claimed.cell.clone(),
        workspace: id.workspace.clone(),
    })
}

/// Whether a call marked as passed on by a replica may be taken as such:
/// over plain HTTP as before; over TLS only from a connection whose
/// certificate is a control-plane replica's.
pub(crate) fn may_pass_on<T>(request: &tonic::Request<T>, caller: Option<&AtollId>) -> bool {
    let tls = request
        .extensions()
        .get::<atoll_transport::Peer>()
        .is_some_and(|peer| peer.tls);
    !tls || caller.is_some_and(|id| id.role == Role::Control)
}
