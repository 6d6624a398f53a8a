//! Runs the real `atoll` binary: a control plane in a temporary state
//! directory, and CLI commands that find it through the discovery file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) const ATOLL: &str = env!("CARGO_BIN_EXE_atoll");

/// The demo bank program, built (or found fresh) with atoll's profile.
pub(crate) fn bank_program() -> PathBuf {
    let dir = PathBuf::from(ATOLL)
        .parent()
        .expect("target dir")
        .to_path_buf();
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut build = Command::new(env!("CARGO"));
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "atoll-bank",
            "--bin",
            "atoll-bank",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo");
    assert!(status.success(), "building atoll-bank failed");
    dir.join("atoll-bank")
}

/// The repository's examples directory.
pub(crate) fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/topology")
}

/// A running `atoll control`, stopped (SIGTERM) on drop.
///
/// Without `--cert` it runs `--insecure`; with it, access control is on
/// and the harness starts it with an admin token (`admin_token`), which
/// `atoll` sends unless a test says otherwise.
pub(crate) struct Control {
    child: Option<Child>,
    pub(crate) state: tempfile::TempDir,
    pub(crate) url: String,
    extra: Vec<String>,
    /// The fleet admin's token, when access control is on.
    pub(crate) admin_token: Option<String>,
}

impl Control {
    /// Starts a control plane with the embedded store in a new state directory.
    pub(crate) fn start() -> Control {
        Self::start_with(Vec::new())
    }

    /// Starts one with extra `atoll control` arguments.
    pub(crate) fn start_with(extra: Vec<String>) -> Control {
        let state = tempfile::tempdir().expect("temp dir");
        let mut control = Control {
            child: None,
            state,
            url: String::new(),
            extra,
            admin_token: None,
        };
        control.launch();
        control
    }

    fn discovery(&self) -> PathBuf {
        self.state.path().join("control.json")
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.state.path().join("control.log")).expect("log file");
        let secure = self.extra.iter().any(|a| a.starts_with("--cert"));
        let access: Vec<String> = if secure {
            vec![format!(
                "--admin-token-file={}",
                self.state.path().join("admin.token").display()
            )]
        } else {
            vec!["--insecure".to_owned()]
        };
        let listen = if self.extra.iter().any(|a| a.starts_with("--listen")) {
            None
        } else {
            Some("--listen=127.0.0.1:0")
        };
        let child = Command::new(ATOLL)
            .arg("control")
            .args(listen)
            .args(&access)
            .args(&self.extra)
            .env("ATOLL_STATE_DIR", self.state.path())
            .env_remove("ATOLL_CONTROL")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn atoll control");
        self.child = Some(child);
        // Ready when the discovery file names our process.
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid = self.child.as_ref().map(Child::id).unwrap_or_default();
        loop {
            if let Ok(text) = std::fs::read_to_string(self.discovery())
                && let Ok(value) = serde_json::from_str::<Value>(&text)
                && value["pid"].as_u64() == Some(u64::from(pid))
            {
                self.url = value["url"].as_str().expect("url").to_owned();
                if secure {
                    let token = std::fs::read_to_string(self.state.path().join("admin.token"))
                        .expect("the admin token file");
                    self.admin_token = Some(token.trim().to_owned());
                }
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("atoll control exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "atoll control not ready in 30s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("control.log")).unwrap_or_default()
    }

    /// Its resident memory now, in bytes (Linux: `VmRSS`).
    pub(crate) fn resident_bytes(&self) -> u64 {
        let pid = self.child.as_ref().map(Child::id).unwrap_or_default();
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`...) to the process.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops with SIGTERM and waits; asserts a clean exit.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    assert!(
                        status.success(),
                        "atoll control exited with {status}:\n{}",
                        self.log()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "atoll control did not stop within 20s of SIGTERM:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts again after `stop`, on the same state directory.
    pub(crate) fn restart_after_stop(&mut self) {
        self.launch();
    }

    /// Stops and starts again on the same state directory.
    pub(crate) fn restart(&mut self) {
        self.stop();
        assert!(
            !self.discovery().exists(),
            "a clean stop removes the discovery file"
        );
        self.launch();
    }

    /// Runs `atoll ARGS` against this control plane, found without flags.
    pub(crate) fn atoll(&self, args: &[&str]) -> Run {
        self.atoll_with_stdin(args, None)
    }

    pub(crate) fn atoll_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Run {
        self.atoll_as(self.admin_token.as_deref(), args, stdin)
    }

    /// Runs `atoll ARGS` sending `token` (none: no token, unless one was
    /// saved with `atoll login` in this control plane's config directory).
    pub(crate) fn atoll_as(&self, token: Option<&str>, args: &[&str], stdin: Option<&str>) -> Run {
        let mut command = Command::new(ATOLL);
        match token {
            Some(token) => command.env("ATOLL_TOKEN", token),
            None => command.env_remove("ATOLL_TOKEN"),
        };
        command
            .args(args)
            .env("ATOLL_STATE_DIR", self.state.path())
            .env("ATOLL_CONFIG_DIR", self.state.path().join("config"))
            .env_remove("ATOLL_CONTROL")
            .env("USER", "tester")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn atoll");
        if let Some(text) = stdin {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write stdin");
        }
        Run(child.wait_with_output().expect("run atoll"), args.join(" "))
    }

    /// `atoll ARGS -o json`, parsed.
    pub(crate) fn json(&self, args: &[&str]) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let run = self.atoll(&all).success();
        serde_json::from_str(&run.stdout()).unwrap_or_else(|e| panic!("{e}: {}", run.stdout()))
    }

    /// The store revision.
    pub(crate) fn revision(&self) -> u64 {
        self.json(&["status"])["revision"]
            .as_u64()
            .expect("revision")
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The output of one `atoll` run.
pub(crate) struct Run(pub(crate) Output, pub(crate) String);

impl Run {
    pub(crate) fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }

    pub(crate) fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }

    pub(crate) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }

    /// Asserts exit 0.
    pub(crate) fn success(self) -> Run {
        assert_eq!(
            self.code(),
            0,
            "`atoll {}` failed:\nstdout: {}\nstderr: {}",
            self.1,
            self.stdout(),
            self.stderr()
        );
        self
    }

    /// Asserts the exit code and that stderr contains every needle.
    pub(crate) fn fails(self, code: i32, needles: &[&str]) -> Run {
        assert_eq!(
            self.code(),
            code,
            "`atoll {}`: expected exit {code}\nstdout: {}\nstderr: {}",
            self.1,
            self.stdout(),
            self.stderr()
        );
        let stderr = self.stderr();
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "`atoll {}`: stderr lacks {needle:?}:\n{stderr}",
                self.1
            );
        }
        self
    }
}

/// A running `atoll gateway`, killed on drop.
pub(crate) struct GatewayProcess {
    child: Option<Child>,
    pub(crate) name: String,
    pub(crate) admin: String,
    pub(crate) log: PathBuf,
}

impl GatewayProcess {
    /// Starts gateway `name` against `control_url` with its cache in
    /// `state`; waits until `/readyz` answers 200 (or, when `expect_ready`
    /// is false, until the admin API answers at all).
    pub(crate) fn start(
        control_url: &str,
        name: &str,
        state: &Path,
        expect_ready: bool,
    ) -> GatewayProcess {
        Self::start_with(control_url, name, state, expect_ready, &[])
    }

    /// The same, with more `atoll` arguments (TLS files).
    pub(crate) fn start_with(
        control_url: &str,
        name: &str,
        state: &Path,
        expect_ready: bool,
        extra: &[String],
    ) -> GatewayProcess {
        std::fs::create_dir_all(state).expect("state dir");
        let admin_port = atoll_testing::free_port();
        let log = state.join(format!("{name}.log"));
        let child = Command::new(ATOLL)
            .args([
                "gateway",
                "--name",
                name,
                "--workers",
                "2",
                "--drain-timeout",
                "2s",
            ])
            .arg(format!("--admin=127.0.0.1:{admin_port}"))
            .arg(format!("--state-dir={}", state.display()))
            .arg(format!("--control={control_url}"))
            .args(extra)
            .arg(format!(
                "--access-log={}",
                state.join("access.log").display()
            ))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
            .spawn()
            .expect("spawn atoll gateway");
        let mut gateway = GatewayProcess {
            child: Some(child),
            name: name.to_owned(),
            admin: format!("127.0.0.1:{admin_port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match http_get(&gateway.admin, "/readyz") {
                Some((200, _)) => break,
                Some(_) if !expect_ready => break,
                _ => {}
            }
            if let Some(status) = gateway
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("gateway {name} exited with {status}:\n{}", gateway.log());
            }
            assert!(
                Instant::now() < deadline,
                "gateway {name} not ready in 30s:\n{}",
                gateway.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        gateway
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON access log lines written so far.
    pub(crate) fn access_log(&self) -> Vec<Value> {
        let path = self.log.with_file_name("access.log");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("access log lines are JSON"))
            .collect()
    }

    /// The gateway's `/config` report.
    pub(crate) fn config(&self) -> Value {
        let (_, body) = http_get(&self.admin, "/config").expect("admin answers");
        serde_json::from_str(&body).expect("json")
    }

    /// Its metrics text.
    pub(crate) fn metrics(&self) -> String {
        http_get(&self.admin, "/metrics").expect("admin answers").1
    }

    /// Waits until it serves `version` or later.
    pub(crate) fn wait_version(&self, version: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.config()["version"].as_u64().unwrap_or(0) < version {
            assert!(
                Instant::now() < deadline,
                "gateway {} did not reach version {version}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops with SIGTERM and waits for a clean exit.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    assert!(
                        status.success(),
                        "gateway exited with {status}:\n{}",
                        self.log()
                    );
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "gateway did not stop:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills it at once (SIGKILL).
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process still runs.
    pub(crate) fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blocking HTTP/1.0 GET for admin endpoints: (status, body).
pub(crate) fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}
