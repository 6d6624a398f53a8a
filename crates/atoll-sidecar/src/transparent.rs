//! Transparent mode: the app calls services at their addresses (for
//! example a range of service addresses its DNS gives), and iptables in
//! the app's network namespace redirects those connections to the
//! sidecar's outbound port, as Istio's init container does. The Host header
//! (or HTTP/2 authority) still names the service. The sidecar's own
//! connections go to instance addresses, outside the captured ranges, so
//! they are not captured again.

use std::process::Command;

/// The nat chain the sidecar owns.
const CHAIN: &str = "ATOLL_OUTBOUND";

fn iptables(args: &[&str]) -> Result<(), String> {
    let output = Command::new("iptables")
        .args(["-w", "-t", "nat"])
        .args(args)
        .output()
        .map_err(|e| {
            format!("cannot run iptables ({e}); transparent mode needs iptables (Debian's `iptables` package) and root in the app's network namespace")
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables -t nat {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The redirect rules, removed when dropped.
#[derive(Debug)]
pub(crate) struct Redirect {
    installed: bool,
}

impl Redirect {
    /// Redirects TCP connections to `ranges` (CIDRs) to `port` on this
    /// host.
    pub(crate) fn install(ranges: &[String], port: u16) -> Result<Redirect, String> {
        for range in ranges {
            if range.parse::<std::net::Ipv4Addr>().is_err()
                && !range.split_once('/').is_some_and(|(ip, bits)| {
                    ip.parse::<std::net::Ipv4Addr>().is_ok()
                        && bits.parse::<u8>().is_ok_and(|b| b <= 32)
                })
            {
                return Err(format!(
                    "--transparent `{range}`: give IPv4 addresses or CIDRs (10.96.0.0/12) of the services' addresses"
                ));
            }
        }
        // A chain of its own, emptied first (a sidecar killed before it
        // could clean up left one).
        let _ = Self::remove();
        iptables(&["-N", CHAIN])?;
        let port = port.to_string();
        for range in ranges {
            iptables(&[
                "-A",
                CHAIN,
                "-p",
                "tcp",
                "-d",
                range,
                "-j",
                "REDIRECT",
                "--to-ports",
                &port,
            ])?;
        }
        iptables(&["-A", "OUTPUT", "-p", "tcp", "-j", CHAIN])?;
        tracing::info!(ranges = ?ranges, port, "transparent mode: connections to these addresses are redirected to the outbound port");
        Ok(Redirect { installed: true })
    }

    fn remove() -> Result<(), String> {
        let _ = iptables(&["-D", "OUTPUT", "-p", "tcp", "-j", CHAIN]);
        let _ = iptables(&["-F", CHAIN]);
        iptables(&["-X", CHAIN])
    }
}

impl Drop for Redirect {
    fn drop(&mut self) {
        if self.installed
            && let Err(error) = Self::remove()
        {
            tracing::warn!(%error, "could not remove the transparent-mode rules");
        }
    }
}
