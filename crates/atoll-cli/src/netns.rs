//! A zone of the sandbox in its own network namespace (`atoll up
//! --isolate-zone ZONE`, Linux, root), joined to the host by a veth pair,
//! so that a drill can cut it off (`atoll drill fault --fault partition`):
//! its agent and instances keep running and would write if they could, but
//! reach nothing, and nothing reaches them.

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
