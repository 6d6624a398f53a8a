//! Talking to the control plane: finding it, calling the REST API, and turning
//! its answers into errors with exit codes.

use std::path::PathBuf;
use std::time::Duration;

use atoll_api::discovery::{
    CONTROL_ENV, DEFAULT_LISTEN, Discovery, STATE_DIR_ENV, SandboxEntry, discovery_path,
    sandboxes_dir,
};
use atoll_api::rest::ErrorCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Exit codes, documented in `docs/cli.md`.
pub(crate) mod exit {
    /// An unexpected error, or the server failed.
    pub(crate) const FAILURE: u8 = 1;
    /// The command line asks for something that does not fit together.
    pub(crate) const USAGE: u8 = 2;
    /// The manifests or the state they would produce are invalid.
    pub(crate) const INVALID: u8 = 3;
    /// A resource changed since it was read.
    pub(crate) const CONFLICT: u8 = 4;
    /// No such resource, revision or node.
    pub(crate) const NOT_FOUND: u8 = 5;
    /// The control plane cannot be reached.
    pub(crate) const UNREACHABLE: u8 = 6;
    /// A barrier's deadline passed before every node got there.
    pub(crate) const BARRIER_NOT_REACHED: u8 = 7;
    /// A switchover aborted (before its flip; nothing moved).
    pub(crate) const SWITCHOVER_ABORTED: u8 = 8;
    /// A drill did not complete, or the checker found an anomaly.
    pub(crate) const DRILL_FAILED: u8 = 10;
    /// No credential, or an unknown, expired or revoked one (401).
    pub(crate) const UNAUTHENTICATED: u8 = 11;
    /// The credential's user may not do this (403).
    pub(crate) const FORBIDDEN: u8 = 12;
    /// The audit chain does not verify: an entry was removed, reordered
    /// or edited.
    pub(crate) const AUDIT_TAMPERED: u8 = 13;
    /// The operation needs a second person's approval: it did not act and
    /// waits as an approval request (or was rejected, or expired).
    pub(crate) const AWAITING_APPROVAL: u8 = 14;
}

/// An error to print, with the process exit code.
#[derive(Debug)]
pub(crate) struct CliError {
    pub(crate) code: u8,
    pub(crate) message: String,
    pub(crate) details: Vec<String>,
}

impl CliError {
    pub(crate) fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(error: anyhow::Error) -> Self {
        Self::new(exit::FAILURE, format!("{error:#}"))
    }
}

/// The state directory: `$ATOLL_STATE_DIR`, else `$XDG_STATE_HOME/atoll`
/// (`~/.local/state/atoll`).
pub(crate) fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(STATE_DIR_ENV) {
        return PathBuf::from(dir);
    }
    dirs::state_dir()
        .or_else(|| dirs::home_dir().map(|h| h.join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("atoll")
}

/// Where the control plane URL came from, for error messages.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub(crate) url: String,
    pub(crate) origin: String,
}

/// A control plane found running on this machine, by its discovery file
/// or a sandbox's entry.
#[derive(Clone, Debug)]
pub(crate) struct Running {
    pub(crate) url: String,
    /// Where it was found, for messages.
    pub(crate) origin: String,
}

/// Whether process `pid` runs (one of another user counts: it exists).
fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    pid > 0
        && match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
            Ok(()) => true,
            Err(errno) => errno == nix::errno::Errno::EPERM,
        }
}

/// `http://` added when missing, no trailing slash; a comma-separated list
/// of replicas is normalized URL by URL.
pub(crate) fn normalize(url: &str) -> String {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|url| {
            let url = url.trim_end_matches('/');
            if url.starts_with("http://") || url.starts_with("https://") {
                url.to_owned()
            } else {
                format!("http://{url}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The running sandboxes (`atoll up`) registered in `state`; entries of
/// processes that are gone are removed.
pub(crate) fn sandboxes(state: &std::path::Path) -> Vec<(SandboxEntry, PathBuf)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(sandboxes_dir(state)) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Some(sandbox) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<SandboxEntry>(&text).ok())
        else {
            continue;
        };
        if alive(sandbox.pid) {
            found.push((sandbox, path));
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    found.sort_by_key(|(s, _)| s.pid);
    found
}

/// The running sandbox (`atoll up`) whose control plane `url` is (one of its
/// replicas will do): commands given no CA or token use the sandbox's.
pub(crate) fn sandbox_serving(url: &str) -> Option<SandboxEntry> {
    let wanted = normalize(url);
    let wanted: Vec<&str> = wanted.split(',').collect();
    sandboxes(&state_dir())
        .into_iter()
        .map(|(sandbox, _)| sandbox)
        .find(|sandbox| {
            normalize(&sandbox.control)
                .split(',')
                .any(|replica| wanted.contains(&replica))
        })
}

/// The admin token of the sandbox serving `url`, if it has one.
fn sandbox_token(url: &str) -> Option<String> {
    let file = sandbox_serving(url)?.token_file?;
    let token = std::fs::read_to_string(file).ok()?;
    Some(token.trim().to_owned()).filter(|t| !t.is_empty())
}

/// Every control plane this machine's state directory knows to be running:
/// a standalone `atoll control` (its discovery file) and the sandboxes of
/// `atoll up`, one entry per URL.
pub(crate) fn running() -> Vec<Running> {
    let state = state_dir();
    let mut found: Vec<Running> = Vec::new();
    for (sandbox, _) in sandboxes(&state) {
        found.push(Running {
            url: normalize(&sandbox.control),
            origin: format!(
                "the sandbox of atoll up (pid {}, state {})",
                sandbox.pid, sandbox.state_dir
            ),
        });
    }
    let path = discovery_path(&state);
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(discovery) = serde_json::from_str::<Discovery>(&text)
        && alive(discovery.pid)
    {
        let url = normalize(&discovery.url);
        if !found.iter().any(|r| r.url == url) {
            found.push(Running {
                url,
                origin: format!(
                    "{} (written by atoll control, pid {})",
                    path.display(),
                    discovery.pid
                ),
            });
        }
    }
    found
}

/// Finds the control plane: `--control`, then `$ATOLL_CONTROL`, then the
/// one control plane running here (a sandbox of `atoll up`, or the
/// discovery file of `atoll control`), then the default address. With
/// several running, it does not guess: the error lists them.
pub(crate) fn resolve(flag: Option<&str>) -> Result<Endpoint, CliError> {
    if let Some(url) = flag {
        return Ok(Endpoint {
            url: normalize(url),
            origin: "--control".into(),
        });
    }
    if let Ok(url) = std::env::var(CONTROL_ENV)
        && !url.is_empty()
    {
        return Ok(Endpoint {
            url: normalize(&url),
            origin: format!("${CONTROL_ENV}"),
        });
    }
    let mut found = running();
    match found.len() {
        0 => Ok(Endpoint {
            url: format!("http://{DEFAULT_LISTEN}"),
            origin: "the default address".into(),
        }),
        1 => {
            let only = found.remove(0);
            Ok(Endpoint {
                url: only.url,
                origin: only.origin,
            })
        }
        n => {
            let mut error = CliError::new(
                2,
                format!("{n} control planes are running here; say which one to use"),
            );
            for running in &found {
                error
                    .details
                    .push(format!("{}  {}", running.url, running.origin));
            }
            error.details.push(format!(
                "pass --control URL, or set ${CONTROL_ENV}; stop the one you do not use"
            ));
            Err(error)
        }
    }
}

/// A REST client for one control plane: the transport's, with its errors
/// turned into exit codes and the CLI's words.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    rest: atoll_transport::RestClient,
    endpoint: Endpoint,
    user: String,
    token: Option<String>,
    workspace: Option<String>,
    transport: atoll_transport::Transport,
}

impl Client {
    /// A client of `endpoint`. `token` is sent as the bearer token; none:
    /// the one `atoll login` saved for the endpoint's URL, else the admin
    /// token of the sandbox (`atoll up`) serving it, if any.
    pub(crate) fn new(
        endpoint: Endpoint,
        user: String,
        token: Option<String>,
        timeout: Option<Duration>,
        transport: &atoll_transport::Transport,
    ) -> Result<Self, CliError> {
        let token = token
            .filter(|t| !t.trim().is_empty())
            .or_else(|| crate::auth::saved_token(&endpoint.url))
            .or_else(|| sandbox_token(&endpoint.url));
        Self::with_credential(endpoint, user, token, timeout, transport)
    }

    /// A client that speaks for a node by its certificate alone: no token,
    /// not even one saved or the sandbox's (a token would make the call
    /// the token's user's).
    pub(crate) fn for_node(
        endpoint: Endpoint,
        timeout: Option<Duration>,
        transport: &atoll_transport::Transport,
    ) -> Result<Self, CliError> {
        Self::with_credential(endpoint, "node".into(), None, timeout, transport)
    }

    fn with_credential(
        endpoint: Endpoint,
        user: String,
        token: Option<String>,
        timeout: Option<Duration>,
        transport: &atoll_transport::Transport,
    ) -> Result<Self, CliError> {
        let urls = atoll_transport::ControlUrls::parse_in_order(&endpoint.url)
            .map_err(|e| CliError::new(exit::USAGE, format!("{e} (from {})", endpoint.origin)))?;
        let mut rest = transport
            .rest(urls, timeout)
            .with_header(atoll_transport::USER_HEADER, &user)
            .map_err(|e| CliError::new(exit::USAGE, format!("--as: {e}")))?;
        if let Some(token) = &token {
            rest = rest
                .with_token(token.trim())
                .map_err(|e| CliError::new(exit::USAGE, format!("--token: {e}")))?;
        }
        Ok(Self {
            rest,
            endpoint,
            user,
            token,
            workspace: None,
            transport: transport.clone(),
        })
    }

    /// The same control plane, with `token` instead of this client's.
    pub(crate) fn with_token(&self, token: &str) -> Result<Self, CliError> {
        Self::new(
            self.endpoint.clone(),
            self.user.clone(),
            Some(token.to_owned()),
            None,
            &self.transport,
        )
        .map(|c| c.in_workspace(self.workspace.clone()))
    }

    /// The same client working in `workspace` (none: the default one):
    /// every `/v1/resources` path asks for it, and applies put manifests
    /// that name none there.
    pub(crate) fn in_workspace(mut self, workspace: Option<String>) -> Self {
        self.workspace = workspace.filter(|w| !w.is_empty());
        self
    }

    /// The REST client underneath (its credentials set).
    pub(crate) fn rest(&self) -> &atoll_transport::RestClient {
        &self.rest
    }

    /// How this client reaches the control plane.
    pub(crate) fn transport(&self) -> &atoll_transport::Transport {
        &self.transport
    }

    /// The workspace given with `--workspace`, if any.
    pub(crate) fn workspace(&self) -> Option<String> {
        self.workspace.clone()
    }

    /// `path` with `workspace=` added for resource paths.
    fn scoped(&self, path: &str) -> String {
        match &self.workspace {
            Some(workspace) if path.starts_with("/v1/resources") => {
                let separator = if path.contains('?') { '&' } else { '?' };
                format!("{path}{separator}workspace={}", segment(workspace))
            }
            _ => path.to_owned(),
        }
    }

    /// The replica asked first (of a comma-separated list, the first).
    pub(crate) fn url(&self) -> &str {
        self.rest
            .urls()
            .all()
            .first()
            .map_or(self.endpoint.url.as_str(), String::as_str)
    }

    /// Every replica given, comma-separated, as given.
    pub(crate) fn urls(&self) -> &str {
        &self.endpoint.url
    }

    /// The same user on other replicas (`urls`, tried in order), each request given at most
    /// `timeout`: for a drill that froze the replica this client asked first.
    pub(crate) fn elsewhere(&self, urls: &[String], timeout: Duration) -> Result<Self, CliError> {
        Self::new(
            Endpoint {
                url: urls.join(","),
                origin: "the replicas a drill left alone".into(),
            },
            self.user.clone(),
            self.token.clone(),
            Some(timeout),
            &self.transport,
        )
        .map(|c| c.in_workspace(self.workspace.clone()))
    }

    /// The text `GET path` answers at one replica `url` (its metrics), with
    /// this client's credentials; none when it does not answer 200 in time.
    pub(crate) async fn text_at(&self, url: &str, path: &str, timeout: Duration) -> Option<String> {
        let urls = atoll_transport::ControlUrls::parse(url).ok()?;
        let mut rest = self.transport.rest(urls, Some(timeout));
        if let Some(token) = &self.token {
            rest = rest.with_token(token.trim()).ok()?;
        }
        let answer = rest.send(reqwest::Method::GET, path, None).await.ok()?;
        answer
            .status
            .is_success()
            .then(|| String::from_utf8_lossy(&answer.body).into_owned())
    }

    /// A transport error in the CLI's words, with its exit code.
    fn error(&self, error: atoll_transport::RestError) -> CliError {
        use atoll_transport::RestError;
        match error {
            RestError::Unreachable { urls, cause } => {
                let mut e = CliError::new(
                    exit::UNREACHABLE,
                    format!(
                        "cannot reach the control plane at {urls} (from {}): {cause}",
                        self.endpoint.origin
                    ),
                );
                e.details.push(format!(
                    "start one with `atoll control`, or point --control or ${CONTROL_ENV} at a running one"
                ));
                e
            }
            RestError::Timeout { url, .. } => CliError::new(
                exit::UNREACHABLE,
                format!("the control plane at {url} did not answer in time"),
            ),
            RestError::Broken { .. } => CliError::new(exit::UNREACHABLE, error.to_string()),
            RestError::Api { body, .. } => {
                let code = match body.error {
                    ErrorCode::Invalid => exit::INVALID,
                    ErrorCode::Conflict => exit::CONFLICT,
                    ErrorCode::NotFound => exit::NOT_FOUND,
                    ErrorCode::Unavailable | ErrorCode::NotLeader => exit::UNREACHABLE,
                    ErrorCode::Unauthenticated => exit::UNAUTHENTICATED,
                    ErrorCode::Forbidden => exit::FORBIDDEN,
                    _ => exit::FAILURE,
                };
                let mut error = CliError::new(code, body.message);
                error.details = body.issues.iter().map(ToString::to_string).collect();
                error
            }
            RestError::Unexpected { status, text, .. } => CliError::new(
                exit::FAILURE,
                format!("the control plane answered {status}: {text}"),
            ),
            RestError::Decode(_) | RestError::Invalid(_) => {
                CliError::new(exit::FAILURE, error.to_string())
            }
            RestError::AwaitingApproval(pending) => {
                CliError::new(exit::AWAITING_APPROVAL, pending.message)
            }
        }
    }

    /// `POST path`: done, or stored for a second person's approval (202).
    pub(crate) async fn post_or_pending<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Outcome<T>, CliError> {
        match self.rest.post(&self.scoped(path), body).await {
            Ok(done) => Ok(Outcome::Done(done)),
            Err(atoll_transport::RestError::AwaitingApproval(pending)) => {
                Ok(Outcome::Pending(pending))
            }
            Err(error) => Err(self.error(error)),
        }
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.rest
            .get(&self.scoped(path))
            .await
            .map_err(|e| self.error(e))
    }

    pub(crate) async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        self.rest
            .post(&self.scoped(path), body)
            .await
            .map_err(|e| self.error(e))
    }

    /// `DELETE path`; the answer's body is not read.
    pub(crate) async fn delete(&self, path: &str) -> Result<(), CliError> {
        let answer = self
            .rest
            .send(reqwest::Method::DELETE, &self.scoped(path), None)
            .await
            .map_err(|e| self.error(e))?;
        if answer.status.is_success() {
            Ok(())
        } else {
            Err(self.error(answer.error()))
        }
    }

    /// `DELETE path`, its answer read as JSON.
    pub(crate) async fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.rest
            .delete(&self.scoped(path))
            .await
            .map_err(|e| self.error(e))
    }

    /// `GET path`, read as it streams.
    pub(crate) async fn stream(&self, path: &str) -> Result<Stream<'_>, CliError> {
        let inner = self
            .rest
            .stream(&self.scoped(path))
            .await
            .map_err(|e| self.error(e))?;
        Ok(Stream {
            client: self,
            inner,
        })
    }
}

/// What a call that may need a second person's approval did.
#[derive(Debug)]
pub(crate) enum Outcome<T> {
    /// It acted.
    Done(T),
    /// It is stored as an approval request.
    Pending(Box<atoll_api::rest::ApprovalPending>),
}

/// A streaming answer.
#[derive(Debug)]
pub(crate) struct Stream<'a> {
    client: &'a Client,
    inner: atoll_transport::RestStream,
}

impl Stream<'_> {
    /// The next chunk; `None` when the control plane ended the body.
    pub(crate) async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, CliError> {
        self.inner.chunk().await.map_err(|e| {
            CliError::new(
                exit::UNREACHABLE,
                format!("the watch broke: {}", self.client.error(e).message),
            )
        })
    }
}

/// Percent-encodes one path segment.
pub(crate) fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
