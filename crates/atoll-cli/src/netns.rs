//! A zone of the sandbox in its own network namespace (`atoll up
//! --isolate-zone ZONE`, Linux, root), joined to the host by a veth pair,
//! so that a drill can cut it off (`atoll drill fault --fault partition`):
//! its agent and instances keep running and would write if they could, but
//! reach nothing, and nothing reaches them. Likewise the control-plane
//! replicas of a replicated sandbox (`atoll up --isolate-control`), each
//! in a namespace of its own, for `atoll drill control-plane --fault
//! partition`.

use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::client::{CliError, exit};

/// The namespace and the addresses on both ends of the veth pair.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Isolation {
    /// The isolated zone.
    pub(crate) zone: String,
    /// `ip netns` name.
    pub(crate) netns: String,
    /// The veth end in the host namespace (what a partition takes down).
    pub(crate) host_interface: String,
    /// Its address: the host side's, for everything the zone must reach.
    pub(crate) host_address: String,
    /// The address of the zone's end, where its agent and instances listen.
    pub(crate) zone_address: String,
}

fn ip(args: &[&str]) -> Result<(), CliError> {
    let output = Command::new("ip").args(args).output().map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!(
                "cannot run `ip {}` ({e}); isolating a zone needs iproute2",
                args.join(" ")
            ),
        )
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(CliError::new(
            exit::FAILURE,
            format!(
                "`ip {}` failed: {}; isolating a zone needs Linux network namespaces and root",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ))
    }
}

impl Isolation {
    /// Creates the namespace and the veth pair. The names and the /30 come
    /// from this process's id, so two sandboxes do not collide.
    pub(crate) fn create(zone: &str) -> Result<Isolation, CliError> {
        let pid = std::process::id();
        let n = pid % 100_000;
        let subnet = pid % 16_384;
        let (third, fourth) = (subnet / 64, (subnet % 64) * 4);
        let isolation = Isolation {
            zone: zone.to_owned(),
            netns: format!("atoll-{pid}"),
            host_interface: format!("atl{n}h"),
            host_address: format!("10.213.{third}.{}", fourth + 1),
            zone_address: format!("10.213.{third}.{}", fourth + 2),
        };
        let zone_interface = format!("atl{n}z");
        let result = (|| {
            ip(&["netns", "add", &isolation.netns])?;
            ip(&[
                "link",
                "add",
                &isolation.host_interface,
                "type",
                "veth",
                "peer",
                "name",
                &zone_interface,
            ])?;
            ip(&["link", "set", &zone_interface, "netns", &isolation.netns])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/30", isolation.host_address),
                "dev",
                &isolation.host_interface,
            ])?;
            ip(&["link", "set", &isolation.host_interface, "up"])?;
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", isolation.netns.as_str(), "ip"];
                all.extend_from_slice(args);
                ip(&all)
            };
            inside(&[
                "addr",
                "add",
                &format!("{}/30", isolation.zone_address),
                "dev",
                &zone_interface,
            ])?;
            inside(&["link", "set", &zone_interface, "up"])?;
            inside(&["link", "set", "lo", "up"])?;
            Ok(())
        })();
        if let Err(error) = result {
            isolation.remove();
            return Err(error);
        }
        Ok(isolation)
    }

    /// Deletes the namespace (and with it the veth pair).
    pub(crate) fn remove(&self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_interface])
            .output();
    }

    /// Cuts the zone off (the host end of the veth goes down).
    pub(crate) fn partition(&self) -> Result<(), CliError> {
        ip(&["link", "set", &self.host_interface, "down"])
    }

    /// Joins it again.
    pub(crate) fn heal(&self) -> Result<(), CliError> {
        ip(&["link", "set", &self.host_interface, "up"])
    }
}

/// The control-plane replicas of a replicated sandbox, each in its own
/// network namespace (`atoll up --control-replicas N --isolate-control`),
/// their veth pairs joined by a bridge in the host namespace. The bridge
/// has an address of the same /24, where everything else of the sandbox
/// (etcd, gateways, agents, instances) listens, so no packet is forwarded
/// between interfaces. A drill cuts one replica off
/// (`atoll drill control-plane --fault partition`) by taking its port of
/// the bridge down: it runs on, on its own clock, and reaches nothing.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ControlNetwork {
    /// The bridge joining the replicas' veth pairs.
    pub(crate) bridge: String,
    /// The bridge's address: the host side's, for everything the replicas
    /// must reach.
    pub(crate) host_address: String,
    /// One per replica, in the sandbox's order.
    pub(crate) replicas: Vec<IsolatedReplica>,
}

/// One replica's namespace and addresses.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IsolatedReplica {
    /// `ip netns` name.
    pub(crate) netns: String,
    /// The veth end in the host namespace, a port of the bridge (what a
    /// partition takes down).
    pub(crate) host_interface: String,
    /// The replica's address, where it listens.
    pub(crate) address: String,
}

impl ControlNetwork {
    /// Creates the bridge and one namespace per replica. Names and the /24
    /// come from this process's id, so two sandboxes do not collide.
    pub(crate) fn create(replicas: usize) -> Result<ControlNetwork, CliError> {
        let pid = std::process::id();
        let n = pid % 100_000;
        let third = pid % 256;
        let network = ControlNetwork {
            bridge: format!("atc{n}b"),
            host_address: format!("10.214.{third}.1"),
            replicas: (0..replicas)
                .map(|i| IsolatedReplica {
                    netns: format!("atoll-{pid}-control-{}", i + 1),
                    host_interface: format!("atc{n}h{}", i + 1),
                    address: format!("10.214.{third}.{}", i + 2),
                })
                .collect(),
        };
        let result = (|| {
            ip(&["link", "add", &network.bridge, "type", "bridge"])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/24", network.host_address),
                "dev",
                &network.bridge,
            ])?;
            ip(&["link", "set", &network.bridge, "up"])?;
            for (i, replica) in network.replicas.iter().enumerate() {
                let inner = format!("atc{n}r{}", i + 1);
                ip(&["netns", "add", &replica.netns])?;
                ip(&[
                    "link",
                    "add",
                    &replica.host_interface,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &inner,
                ])?;
                ip(&["link", "set", &inner, "netns", &replica.netns])?;
                ip(&[
                    "link",
                    "set",
                    &replica.host_interface,
                    "master",
                    &network.bridge,
                ])?;
                ip(&["link", "set", &replica.host_interface, "up"])?;
                let inside = |args: &[&str]| {
                    let mut all = vec!["netns", "exec", replica.netns.as_str(), "ip"];
                    all.extend_from_slice(args);
                    ip(&all)
                };
                inside(&[
                    "addr",
                    "add",
                    &format!("{}/24", replica.address),
                    "dev",
                    &inner,
                ])?;
                inside(&["link", "set", &inner, "up"])?;
                inside(&["link", "set", "lo", "up"])?;
            }
            Ok(())
        })();
        if let Err(error) = result {
            network.remove();
            return Err(error);
        }
        Ok(network)
    }

    /// Deletes the namespaces, the veth pairs and the bridge.
    pub(crate) fn remove(&self) {
        for replica in &self.replicas {
            let _ = Command::new("ip")
                .args(["netns", "del", &replica.netns])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &replica.host_interface])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }

    /// Cuts replica `index` (0-based) off: its port of the bridge goes down.
    pub(crate) fn partition(&self, index: usize) -> Result<&IsolatedReplica, CliError> {
        let replica = self.replica(index)?;
        ip(&["link", "set", &replica.host_interface, "down"])?;
        Ok(replica)
    }

    /// Joins it again.
    pub(crate) fn heal(&self, index: usize) -> Result<(), CliError> {
        let replica = self.replica(index)?;
        ip(&["link", "set", &replica.host_interface, "up"])
    }

    fn replica(&self, index: usize) -> Result<&IsolatedReplica, CliError> {
        self.replicas.get(index).ok_or_else(|| {
            CliError::new(
                exit::FAILURE,
                format!(
                    "control-plane replica {} is not in the sandbox's control network ({} replicas)",
                    index + 1,
                    self.replicas.len()
                ),
            )
        })
    }
}
