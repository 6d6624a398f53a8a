//! Runtime drivers: how an agent starts and stops instances. The local
//! runtime runs them as child processes; a Kubernetes driver (later) will
//! run them as pods.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
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
    /// Whom it runs as.
    pub run_as: RunAs,
    /// Directories of the agent's the instance's user passes through to
    /// reach its data and credentials: the agent gives them to the user's
    /// group with search permission only (0710), so nothing in them can be
    /// listed or read that is not the instance's own.
    pub passage: Vec<PathBuf>,
    /// What it speaks on its first port (`http`, `http2`, `grpc`).
    pub protocol: String,
    /// The sidecar run beside it, for an App with `mesh: sidecar`.
    pub sidecar: Option<SidecarSpec>,
}

/// `atoll sidecar` beside an instance: started before the app, stopped
/// before it (so callers leave it first), and the instance ends with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarSpec {
    /// The `atoll` program (the agent's own).
    pub program: PathBuf,
    /// Where callers reach the app through it (registered, and reported
    /// as the instance's endpoint).
    pub inbound: u16,
    /// Where the app's calls go out (`ATOLL_SIDECAR_URL`).
    pub outbound: u16,
    /// Its admin address's port (`/metrics`).
    pub admin: u16,
    /// Where the app's Bolt calls go out (`ATOLL_SIDECAR_BOLT`).
    pub outbound_bolt: u16,
    /// What the app speaks.
    pub protocol: String,
    /// Services the app calls, watched from the start.
    pub calls: Vec<String>,
    /// Its log.
    pub log: PathBuf,
}

/// Whom an instance runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunAs {
    /// As the agent's own user: an agent not running as root, or root by
    /// `--allow-root-instances`.
    Agent,
    /// As this user (the agent runs as root and switches to it).
    User(User),
    /// Not at all, for this reason.
    Refused(String),
}

/// A user of the agent's host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Its name (the uid when it has none).
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid, the instance's only group.
    pub gid: u32,
}

impl RunAs {
    /// Whom a zone's instances run as, from its `runAs`, the agent's own
    /// user and whether root was allowed (`--allow-root-instances`).
    pub fn of_zone(zone: &str, run_as: Option<&str>, allow_root: bool) -> RunAs {
        let agent = nix::unistd::geteuid().as_raw();
        let user = match run_as.map(|r| lookup(zone, r)).transpose() {
            Ok(user) => user,
            Err(why) => return RunAs::Refused(why),
        };
        match (agent, user) {
            (0, None) if allow_root => RunAs::Agent,
            (0, None) => RunAs::Refused(format!(
                "Zone/{zone} names no spec.runAs and this agent runs as root: it runs no App's command as root unless started with --allow-root-instances; set `runAs: nobody` (or another unprivileged user) on Zone/{zone}"
            )),
            (0, Some(user)) if user.uid == 0 && !allow_root => RunAs::Refused(format!(
                "Zone/{zone} runs instances as `{}` (uid 0), which this agent does only when started with --allow-root-instances; name an unprivileged user in spec.runAs",
                user.name
            )),
            (0, Some(user)) if user.uid == 0 => RunAs::Agent,
            (0, Some(user)) => RunAs::User(user),
            (_, None) => RunAs::Agent,
            (agent, Some(user)) if user.uid == agent => RunAs::Agent,
            (agent, Some(user)) => RunAs::Refused(format!(
                "Zone/{zone} runs instances as `{}` (uid {}), but this agent runs as uid {agent} and cannot switch users; run the agent as root or as that user, or remove spec.runAs",
                user.name, user.uid
            )),
        }
    }
}

/// Looks a zone's `runAs` up on this host.
fn lookup(zone: &str, run_as: &str) -> Result<User, String> {
    use atoll_model::UserRef;
    use nix::unistd::{Uid, User as Passwd};
    let reference = atoll_model::parse_run_as(run_as)
        .map_err(|why| format!("Zone/{zone} spec.runAs: {why}"))?;
    let failed = |e: nix::Error| format!("cannot look up user `{run_as}` of Zone/{zone}: {e}");
    Ok(match reference {
        UserRef::Name(name) => {
            let Some(found) = Passwd::from_name(&name).map_err(failed)? else {
                return Err(format!(
                    "Zone/{zone} runs instances as `{name}`, a user this host does not have; create it (e.g. `useradd --system --no-create-home {name}`) or name another in spec.runAs"
                ));
            };
            User {
                name,
                uid: found.uid.as_raw(),
                gid: found.gid.as_raw(),
            }
        }
        UserRef::Uid(uid) => {
            let found = Passwd::from_uid(Uid::from_raw(uid)).map_err(failed)?;
            User {
                name: found
                    .as_ref()
                    .map_or_else(|| uid.to_string(), |u| u.name.clone()),
                uid,
                gid: found.map_or(uid, |u| u.gid.as_raw()),
            }
        }
        UserRef::UidGid(uid, gid) => User {
            name: Passwd::from_uid(Uid::from_raw(uid))
                .ok()
                .flatten()
                .map_or_else(|| uid.to_string(), |u| u.name),
            uid,
            gid,
        },
    })
}

/// Whether `user` may search (or, for the last, execute) every directory
/// down to `path`; else the first that stops it, with what to do.
pub fn reachable(user: &User, path: &Path, execute: bool) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut walked = PathBuf::new();
    let parts: Vec<_> = path.components().collect();
    for (i, part) in parts.iter().enumerate() {
        walked.push(part);
        let last = i + 1 == parts.len();
        if last && !execute {
            break;
        }
        let Ok(meta) = std::fs::metadata(&walked) else {
            return Ok(()); // what is missing is reported when used
        };
        let mode = meta.mode();
        let bits = if meta.uid() == user.uid {
            mode >> 6
        } else if meta.gid() == user.gid {
            mode >> 3
        } else {
            mode
        };
        if bits & 0o1 == 0 {
            let what = if last && !meta.is_dir() {
                "run"
            } else {
                "pass through"
            };
            return Err(format!(
                "user `{}` (uid {}, gid {}) cannot {what} {} (mode {:04o}, owner {}:{}) to reach {}; let it (e.g. `chgrp {} {}` and `chmod g+x {}`), or move the program or the agent's --state-dir where it can",
                user.name,
                user.uid,
                user.gid,
                walked.display(),
                mode & 0o7777,
                meta.uid(),
                meta.gid(),
                path.display(),
                user.gid,
                walked.display(),
                walked.display(),
            ));
        }
    }
    Ok(())
}

/// Takes group and others' permissions off what `dir` holds, but for the
/// entries named in `except` (shared on purpose): a directory that becomes
/// passable by the instances' group must not show them what an earlier run
/// left readable. Only the top level: a private directory hides its tree.
pub fn keep_private(dir: &Path, except: &[&str]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if except.iter().any(|e| entry.file_name() == **e) {
            continue;
        }
        let path = entry.path();
        // Not through symbolic links: their targets are not ours.
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if meta.file_type().is_symlink() || mode & 0o077 == 0 {
            continue;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7700))
            .map_err(|e| format!("cannot make {} private: {e}", path.display()))?;
    }
    Ok(())
}

/// Gives `user` what its instance needs of the agent's files: the passage
/// searchable by its group, its data directory its own (0700).
fn prepare(spec: &InstanceSpec, user: &User) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    for dir in spec.passage.iter().chain([&spec.data_dir]) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let set = |dir: &Path, owner: Option<u32>, mode: u32| {
        std::os::unix::fs::chown(dir, owner, Some(user.gid))
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| {
                format!(
                    "cannot give {} to user `{}` ({}:{}): {e}",
                    dir.display(),
                    user.name,
                    user.uid,
                    user.gid
                )
            })
    };
    for dir in &spec.passage {
        set(dir, None, 0o710)?;
    }
    if let Some(state) = spec.passage.first() {
        keep_private(state, &["cells", "credentials"])?;
    }
    set(&spec.data_dir, Some(user.uid), 0o700)?;
    reachable(user, &spec.data_dir, true)?;
    Ok(())
}

impl InstanceSpec {
    /// `host:port` of the first port.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.ports.first().map_or(0, |p| p.1))
    }

    /// Where callers reach it: through its sidecar when it has one.
    pub fn served_at(&self) -> String {
        match &self.sidecar {
            Some(sidecar) => format!("{}:{}", self.host, sidecar.inbound),
            None => self.address(),
        }
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

/// A child process (and its sidecar's, if it has one).
#[derive(Debug)]
pub struct LocalInstance {
    child: tokio::process::Child,
    pid: u32,
    sidecar: Option<(tokio::process::Child, u32)>,
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
        let user = match &spec.run_as {
            RunAs::Refused(why) => return Err(why.clone()),
            RunAs::Agent => None,
            RunAs::User(user) => Some(user),
        };
        match user {
            Some(user) => {
                prepare(spec, user)?;
                if program.contains('/') {
                    reachable(user, Path::new(program), true)?;
                }
            }
            None => std::fs::create_dir_all(&spec.data_dir)
                .map_err(|e| format!("cannot create {}: {e}", spec.data_dir.display()))?,
        }
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
        let sidecar = match &spec.sidecar {
            Some(sidecar) => Some(start_sidecar(spec, sidecar, user)?),
            None => None,
        };
        let mut command = tokio::process::Command::new(program);
        // The agent's own credentials are not the instance's: an App's
        // command never sees them (its own come in `spec.env`).
        for inherited in NOT_INHERITED {
            command.env_remove(inherited);
        }
        command
            .args(args)
            .envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        match user {
            Some(user) => {
                command
                    .env("HOME", &spec.data_dir)
                    .env("USER", &user.name)
                    .env("LOGNAME", &user.name);
                // Before dies_with_parent: a change of user clears the
                // parent-death signal.
                become_user(command.as_std_mut(), user, &spec.data_dir)?;
            }
            None => {
                if nix::unistd::geteuid().is_root() {
                    tracing::warn!(instance = %spec.name, "running the instance as root: this agent was started with --allow-root-instances");
                }
                command.current_dir(&spec.data_dir);
            }
        }
        dies_with_parent(command.as_std_mut());
        let child = command.spawn().map_err(|e| match user {
            Some(user) => format!(
                "cannot start `{program}` for {} as user `{}` (uid {}, gid {}): {e}",
                spec.name, user.name, user.uid, user.gid
            ),
            None => format!("cannot start `{program}` for {}: {e}", spec.name),
        })?;
        let pid = child.id().unwrap_or(0);
        Ok(LocalInstance {
            child,
            pid,
            sidecar,
        })
    }
}

/// Starts the sidecar of `spec` (as the instance's user, with its
/// environment and the sidecar's addresses).
fn start_sidecar(
    spec: &InstanceSpec,
    sidecar: &SidecarSpec,
    user: Option<&User>,
) -> Result<(tokio::process::Child, u32), String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&sidecar.log)
        .map_err(|e| {
            format!(
                "cannot open the sidecar's log {}: {e}",
                sidecar.log.display()
            )
        })?;
    let stderr = log
        .try_clone()
        .map_err(|e| format!("cannot share the log: {e}"))?;
    let mut command = tokio::process::Command::new(&sidecar.program);
    for inherited in NOT_INHERITED {
        command.env_remove(inherited);
    }
    command
        .arg("sidecar")
        .envs(&spec.env)
        .env("ATOLL_SIDECAR_APP", spec.address())
        .env("ATOLL_SIDECAR_APP_PROTOCOL", &sidecar.protocol)
        .env(
            "ATOLL_SIDECAR_INBOUND",
            format!("{}:{}", spec.host, sidecar.inbound),
        )
        .env(
            "ATOLL_SIDECAR_OUTBOUND",
            format!("127.0.0.1:{}", sidecar.outbound),
        )
        .env(
            "ATOLL_SIDECAR_ADMIN",
            format!("127.0.0.1:{}", sidecar.admin),
        )
        .env("ATOLL_SIDECAR_CALLS", sidecar.calls.join(","))
        .env(
            "ATOLL_SIDECAR_OUTBOUND_BOLT",
            format!("127.0.0.1:{}", sidecar.outbound_bolt),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true);
    match user {
        Some(user) => become_user(command.as_std_mut(), user, &spec.data_dir)?,
        None => {
            command.current_dir(&spec.data_dir);
        }
    }
    dies_with_parent(command.as_std_mut());
    let child = command.spawn().map_err(|e| {
        format!(
            "cannot start the sidecar `{}` of {}: {e}",
            sidecar.program.display(),
            spec.name
        )
    })?;
    let pid = child.id().unwrap_or(0);
    Ok((child, pid))
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
        let how = match &mut self.sidecar {
            Some((sidecar, _)) => tokio::select! {
                status = self.child.wait() => match status {
                    Ok(status) => describe_exit(status),
                    Err(e) => format!("cannot wait for it: {e}"),
                },
                status = sidecar.wait() => match status {
                    Ok(status) => format!("its sidecar {}", describe_exit(status)),
                    Err(e) => format!("cannot wait for its sidecar: {e}"),
                },
            },
            None => match self.child.wait().await {
                Ok(status) => describe_exit(status),
                Err(e) => format!("cannot wait for it: {e}"),
            },
        };
        // Whatever it started goes with it (it would hold its port), and
        // an instance and its sidecar go together.
        signal_group(self.pid, nix::sys::signal::Signal::SIGKILL);
        if let Some((sidecar, pid)) = &mut self.sidecar {
            signal_group(*pid, nix::sys::signal::Signal::SIGKILL);
            let _ = sidecar.wait().await;
        }
        let _ = self.child.wait().await;
        how
    }

    async fn stop(&mut self, grace: Duration) {
        // The sidecar first: it deregisters, keeps serving while callers
        // learn it, and lets calls in flight finish; then the app.
        if let Some((sidecar, pid)) = &mut self.sidecar
            && !matches!(sidecar.try_wait(), Ok(Some(_)))
        {
            signal_group(*pid, nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(grace, sidecar.wait()).await.is_err() {
                signal_group(*pid, nix::sys::signal::Signal::SIGKILL);
                let _ = sidecar.wait().await;
            }
        }
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

/// Has the child drop to `user` (its primary group only) and enter `dir` as
/// that user, so that what the user may not reach, it does not start in.
fn become_user(command: &mut std::process::Command, user: &User, dir: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::process::CommandExt;
    let dir = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| format!("{} holds a NUL byte", dir.display()))?;
    let (uid, gid) = (user.uid, user.gid);
    #[allow(unsafe_code)]
    // SAFETY: the closure runs in the child between fork and exec; it calls
    // only setgroups(2), setgid(2), setuid(2) and chdir(2), which are
    // async-signal-safe, on values prepared before the fork; errors are raw
    // OS errors, which allocate nothing.
    unsafe {
        command.pre_exec(move || {
            let check = |result: nix::libc::c_int| {
                if result == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            check(nix::libc::setgroups(1, &gid))?;
            check(nix::libc::setgid(gid))?;
            check(nix::libc::setuid(uid))?;
            check(nix::libc::chdir(dir.as_ptr()))?;
            Ok(())
        });
    }
    Ok(())
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
            run_as: RunAs::Agent,
            passage: Vec::new(),
            protocol: "http".into(),
            sidecar: None,
        }
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o7777
    }

    /// The user the tests run instances as, when they run as root.
    fn nobody() -> Option<User> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: an agent cannot switch users; skipped");
            return None;
        }
        match RunAs::of_zone("z1", Some("nobody"), false) {
            RunAs::User(user) => Some(user),
            other => panic!("nobody: {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_agent_running_as_root_runs_instances_as_the_zones_user() {
        let Some(user) = nobody() else { return };
        let dir = tempfile::tempdir().expect("dir");
        // The test's own directory is as private as an agent's parent.
        std::os::unix::fs::chown(dir.path(), None, Some(user.gid)).expect("chgrp");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o710),
        )
        .expect("chmod");
        let state = dir.path().join("agent");
        let mut spec = spec(
            &state,
            &[
                "sh",
                "-c",
                "echo uid=$(id -u) gid=$(id -g) groups=$(id -G) home=$HOME; touch $PWD/written; exit 0",
            ],
        );
        spec.passage = vec![state.clone()];
        spec.run_as = RunAs::User(user.clone());
        let mut instance = LocalRuntime.start(&spec).await.expect("start");
        assert_eq!(instance.exited().await, "exited with status 0");
        let log = std::fs::read_to_string(&spec.log).expect("log");
        let expected = format!(
            "uid={} gid={} groups={} home={}",
            user.uid,
            user.gid,
            user.gid,
            spec.data_dir.display()
        );
        assert!(log.contains(&expected), "{expected} in {log}");
        // Its data directory is its own; the passage only searchable.
        use std::os::unix::fs::MetadataExt as _;
        let data = std::fs::metadata(&spec.data_dir).expect("data");
        assert_eq!(
            (data.uid(), data.gid(), mode(&spec.data_dir)),
            (user.uid, user.gid, 0o700)
        );
        assert_eq!(mode(&state), 0o710);
        assert_eq!(std::fs::metadata(&state).expect("state").gid(), user.gid);
        assert_eq!(
            std::fs::metadata(spec.data_dir.join("written"))
                .expect("written")
                .uid(),
            user.uid
        );
    }

    #[tokio::test]
    async fn an_instance_whose_user_cannot_reach_its_directory_is_refused_with_the_directory() {
        let Some(user) = nobody() else { return };
        let dir = tempfile::tempdir().expect("dir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        let mut spec = spec(dir.path(), &["sh", "-c", "exit 0"]);
        spec.run_as = RunAs::User(user);
        let error = LocalRuntime.start(&spec).await.expect_err("unreachable");
        assert!(
            error.contains(&format!(
                "user `nobody` (uid 65534, gid 65534) cannot pass through {} (mode 0700",
                dir.path().display()
            )) && error.contains("--state-dir"),
            "{error}"
        );
    }

    #[test]
    fn root_needs_the_agents_opt_in() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let refused = |run_as: Option<&str>| match RunAs::of_zone("hz-a", run_as, false) {
            RunAs::Refused(why) => why,
            other => panic!("{run_as:?}: {other:?}"),
        };
        assert!(
            refused(None).contains("Zone/hz-a names no spec.runAs and this agent runs as root")
        );
        assert!(refused(Some("root")).contains("--allow-root-instances"));
        assert!(refused(Some("0")).contains("(uid 0)"));
        assert!(refused(Some("0:0")).contains("(uid 0)"));
        assert!(
            refused(Some("no-such-user-here"))
                .contains("a user this host does not have; create it")
        );
        assert!(refused(Some("Bad User")).contains("is neither a user name"));
        assert_eq!(RunAs::of_zone("hz-a", None, true), RunAs::Agent);
        assert_eq!(RunAs::of_zone("hz-a", Some("root"), true), RunAs::Agent);
        assert_eq!(
            RunAs::of_zone("hz-a", Some("1234:5678"), false),
            RunAs::User(User {
                name: "1234".into(),
                uid: 1234,
                gid: 5678
            })
        );
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
