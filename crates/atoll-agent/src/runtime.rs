//! Runtime drivers: how an agent starts and stops instances. The local
//! runtime runs them as child processes; a Kubernetes driver (later) will
//! run them as pods.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// Everything needed to start one instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Unique name: `<app>-<cell>-<replica>`.
    pub name: String,
    /// The App resource.
    pub app: String,
    /// The service it serves.
    pub service: String,
    /// Its cell, zone and region.
    pub cell: String,
    /// Its zone.
    pub zone: String,
    /// Its region.
    pub region: String,
    /// Which of the cell's replicas (0-based).
    pub replica: u32,
    /// Program and arguments (local runtime).
    pub command: Vec<String>,
    /// Image (container runtimes).
    pub image: Option<String>,
    /// Environment: the App's, then `ATOLL_*` (which win).
    pub env: BTreeMap<String, String>,
    /// Named ports, the first takes the traffic.
    pub ports: Vec<(String, u16)>,
    /// Host the instance listens on and is reached at.
    pub host: String,
    /// Data directory (per cell and app, kept across restarts).
    pub data_dir: PathBuf,
    /// Where stdout and stderr go.
    pub log: PathBuf,
}

impl InstanceSpec {
    /// `host:port` of the first port.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.ports.first().map_or(0, |p| p.1))
    }
}

/// A runtime driver.
pub trait Runtime: Send + Sync + 'static {
    /// A running instance.
    type Instance: Instance;

    /// The driver's name, for logs (`local`, `kubernetes`).
    fn name(&self) -> &'static str;

    /// Starts an instance; the error says why it cannot.
    fn start(
        &self,
        spec: &InstanceSpec,
    ) -> impl Future<Output = Result<Self::Instance, String>> + Send;
}

/// A running instance.
pub trait Instance: Send + 'static {
    /// Where to find it (`pid 1234`).
    fn describe(&self) -> String;

    /// Completes when it exits, with how (`exited with status 1`).
    fn exited(&mut self) -> impl Future<Output = String> + Send;

    /// Stops it: asks politely, then forces after `grace`.
    fn stop(&mut self, grace: Duration) -> impl Future<Output = ()> + Send;
}

/// Runs instances as child processes of the agent.
#[derive(Debug, Default)]
pub struct LocalRuntime;

/// A child process.
#[derive(Debug)]
pub struct LocalInstance {
    child: tokio::process::Child,
    pid: u32,
}

impl Runtime for LocalRuntime {
    type Instance = LocalInstance;

    fn name(&self) -> &'static str {
        "local"
    }

    async fn start(&self, spec: &InstanceSpec) -> Result<LocalInstance, String> {
        let Some((program, args)) = spec.command.split_first() else {
            return Err(format!(
                "app `{}` has no `command`; the local runtime runs programs, not images ({})",
                spec.app,
                spec.image.as_deref().unwrap_or("none")
            ));
        };
        std::fs::create_dir_all(&spec.data_dir)
            .map_err(|e| format!("cannot create {}: {e}", spec.data_dir.display()))?;
        if let Some(dir) = spec.log.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| format!("cannot open the log {}: {e}", spec.log.display()))?;
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let _ = writeln!(
            log,
            "--- atoll agent: starting {} at {now}: {}",
            spec.name,
            spec.command.join(" ")
        );
        let stderr = log
            .try_clone()
            .map_err(|e| format!("cannot share the log: {e}"))?;
        let mut command = tokio::process::Command::new(program);
        // The agent's own credentials are not the instance's: an App's
        // command never sees them (its own come in `spec.env`).
        for inherited in NOT_INHERITED {
            command.env_remove(inherited);
        }
        command
            .args(args)
            .envs(&spec.env)
            .current_dir(&spec.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        dies_with_parent(command.as_std_mut());
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start `{program}` for {}: {e}", spec.name))?;
        let pid = child.id().unwrap_or(0);
        Ok(LocalInstance { child, pid })
    }
}

/// Variables of the agent's environment an instance does not inherit.
const NOT_INHERITED: [&str; 5] = [
    "ATOLL_TOKEN",
    "ATOLL_BOOTSTRAP_TOKEN",
    "ATOLL_CA",
    "ATOLL_CERT",
    "ATOLL_KEY",
];

impl Instance for LocalInstance {
    fn describe(&self) -> String {
        format!("pid {}", self.pid)
    }

    async fn exited(&mut self) -> String {
        let how = match self.child.wait().await {
            Ok(status) => describe_exit(status),
            Err(e) => format!("cannot wait for it: {e}"),
        };
        // Whatever it started goes with it (it would hold its port).
        signal_group(self.pid, nix::sys::signal::Signal::SIGKILL);
        how
    }

    async fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        signal_group(self.pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pid = self.pid,
                "instance did not stop within {grace:?}; killing it"
            );
            signal_group(self.pid, nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
    }
}

/// Sends `signal` to the process group led by `pid` (the instance and
/// anything it started).
pub fn signal_group(pid: u32, signal: nix::sys::signal::Signal) {
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid <= 0 {
        return;
    }
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
}

/// How a process ended, in words.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => {
            let name = nix::sys::signal::Signal::try_from(signal)
                .map_or_else(|_| signal.to_string(), |s| s.to_string());
            format!("killed by {name}")
        }
        _ => "ended".to_owned(),
    }
}

/// Makes a child its own process group (so a terminal's Ctrl-C reaches only
/// its supervisor, which stops it in order) and has the kernel send it
/// SIGTERM when the process that started it dies, even by SIGKILL, so no
/// instance outlives its agent. Call `spawn` from a thread that lives as long
/// as the parent (the kernel ties the signal to the spawning thread): any
/// tokio worker thread does.
pub fn dies_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    let parent = nix::unistd::getpid();
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the child between fork and exec; it only
    // calls prctl(2) and getppid(2) through nix, which are
    // async-signal-safe; errors are raw OS errors, which allocate nothing.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)?;
            // The parent may have died between fork and prctl.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from(nix::errno::Errno::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &std::path::Path, command: &[&str]) -> InstanceSpec {
        InstanceSpec {
            name: "demo-c1-0".into(),
            app: "demo".into(),
            service: "svc".into(),
            cell: "c1".into(),
            zone: "z1".into(),
            region: "r1".into(),
            replica: 0,
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            image: None,
            env: BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
            ports: vec![("http".into(), 1)],
            host: "127.0.0.1".into(),
            data_dir: dir.join("data"),
            log: dir.join("logs/demo-c1-0.log"),
        }
    }

    #[tokio::test]
    async fn a_process_gets_its_environment_and_its_output_is_logged() {
        let dir = tempfile::tempdir().expect("dir");
        let spec = spec(
            dir.path(),
            &[
                "sh",
                "-c",
                "echo $GREETING from $PWD; echo oops >&2; exit 3",
            ],
        );
        let mut instance = LocalRuntime.start(&spec).await.expect("start");
        assert_eq!(instance.exited().await, "exited with status 3");
        let log = std::fs::read_to_string(&spec.log).expect("log");
        assert!(log.contains("hello from"), "{log}");
        assert!(
            log.contains(&spec.data_dir.display().to_string()),
            "runs in its data dir: {log}"
        );
        assert!(log.contains("oops"), "stderr is captured: {log}");
    }

    #[tokio::test]
    async fn stop_asks_then_forces() {
        let dir = tempfile::tempdir().expect("dir");
        let polite = spec(dir.path(), &["sleep", "30"]);
        let mut instance = LocalRuntime.start(&polite).await.expect("start");
        let started = std::time::Instant::now();
        instance.stop(Duration::from_secs(5)).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "SIGTERM was enough"
        );

        let stubborn = spec(
            dir.path(),
            &["sh", "-c", "trap '' TERM; sleep 30 & wait; sleep 30"],
        );
        let mut instance = LocalRuntime.start(&stubborn).await.expect("start");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        instance.stop(Duration::from_millis(300)).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "SIGKILL after the grace period"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("dir");
        let error = LocalRuntime
            .start(&spec(dir.path(), &["/nonexistent/program"]))
            .await
            .expect_err("no such program");
        assert!(
            error.contains("cannot start `/nonexistent/program` for demo-c1-0"),
            "{error}"
        );
        let mut image_only = spec(dir.path(), &[]);
        image_only.image = Some("bank:1".into());
        let error = LocalRuntime
            .start(&image_only)
            .await
            .expect_err("image only");
        assert!(error.contains("runs programs, not images"), "{error}");
    }
}
