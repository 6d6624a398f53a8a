//! Test harnesses shared by Atoll's crates. Only used as a dev-dependency.
//!
//! [`EtcdServer`] starts a real etcd (Debian's `etcd-server`) on free loopback
//! ports in a temporary directory and kills it when dropped. It never skips:
//! a test that needs etcd fails with instructions when etcd is missing.

#![expect(
    clippy::expect_used,
    reason = "test harness: failing loudly is the point"
)]

pub mod backend;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (free when this returns; bind it soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port on 127.0.0.1")
}

/// The etcd binary: `$ATOLL_ETCD_BIN`, else `etcd` on the PATH, else
/// `/usr/bin/etcd`.
pub fn etcd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ATOLL_ETCD_BIN") {
        return PathBuf::from(path);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("etcd");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("/usr/bin/etcd")
}

/// A running etcd, killed on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports and waits until it reports healthy.
    ///
    /// # Panics
    /// When etcd is not installed or does not become healthy in 20 s.
    pub fn start() -> EtcdServer {
        let binary = etcd_binary();
        assert!(
            binary.is_file(),
            "etcd not found at {}: run the README's test command (./scripts/test), which installs Debian's etcd-server, or set ATOLL_ETCD_BIN",
            binary.display()
        );
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start(&binary) {
                Ok(server) => return server,
                Err(error) => last_error = error,
            }
        }
        panic!("etcd did not start: {last_error}");
    }

    fn try_start(binary: &PathBuf) -> Result<EtcdServer, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let client = free_port();
        let peer = free_port();
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new(binary)
            .arg("--name=atoll-test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=atoll-test={peer_url}"))
            .arg("--max-txn-ops=10000")
            .arg("--log-level=warn")
            .arg("--logger=zap")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.path().join("etcd.log")).unwrap_or_default();
                return Err(format!("etcd exited with {status}: {}", tail(&log)));
            }
            if healthy(client) {
                return Ok(EtcdServer {
                    child,
                    endpoint: client_url,
                    _dir: dir,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(dir.path().join("etcd.log")).unwrap_or_default();
        Err(format!("etcd not healthy within 20 s: {}", tail(&log)))
    }

    /// The client URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether etcd's `/health` answers `"health":"true"`.
fn healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
