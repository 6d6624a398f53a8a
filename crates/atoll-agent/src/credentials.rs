//! Certificates for the instances an agent runs, when the control plane
//! serves TLS: the agent makes each instance a key, asks the control plane
//! to certify it (`POST /v1/instance-certificates`, with the agent's own
//! certificate on the connection, so the identity is
//! `atoll://<workspace>/sdk/<the agent's zone>/<instance>`), and writes the
//! key (0600), the chain and the CA into the instance's own folder, named
//! by `ATOLL_KEY`, `ATOLL_CERT` and `ATOLL_CA`. It renews them with a third
//! of their life left; the instance (the SDK) rereads the files, so it
//! keeps running and keeps its connections.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use atoll_api::rest::{InstanceCertificateRequest, IssuedCertificate};
use atoll_identity::{AtollId, Role};
use parking_lot::Mutex;
use time::OffsetDateTime;

/// The certificates of one agent's instances.
#[derive(Debug)]
pub(crate) struct Credentials {
    rest: atoll_transport::RestClient,
    dir: PathBuf,
    /// When each instance's certificate began and ends, and the
    /// intermediate that signed it (read from its file once, then kept).
    validity: Mutex<HashMap<String, Held>>,
    /// The intermediate the control plane issues with now, and when it was
    /// last asked.
    current: tokio::sync::Mutex<Option<(Option<String>, std::time::Instant)>>,
    /// Whom each instance's files belong to (uid, gid), when not the agent.
    owners: Mutex<HashMap<String, Option<(u32, u32)>>>,
}

/// What is known of an instance's certificate.
#[derive(Clone, Debug)]
struct Held {
    from: OffsetDateTime,
    until: OffsetDateTime,
    intermediate: Option<String>,
}

impl Held {
    fn of(chain: &str) -> Option<Held> {
        let (from, until) = atoll_identity::validity_of_pem(chain).ok()?;
        Some(Held {
            from,
            until,
            intermediate: atoll_identity::intermediate_of_chain(chain),
        })
    }
}

/// Whether a certificate valid from `from` to `until` is due for renewal:
/// a third of its life or less is left, or 2 s (the instance rereads its
/// files every second; a certificate of a few seconds is for drills).
pub(crate) fn due(from: OffsetDateTime, until: OffsetDateTime, now: OffsetDateTime) -> bool {
    let margin: time::Duration = (until - from) / 3_i32;
    now >= until - margin.max(time::Duration::seconds(2))
}

/// Writes a file whole (a temporary file renamed over it), owned by
/// `owner` (uid, gid) when the instance runs as another user than the
/// agent.
fn write(path: &Path, text: &str, private: bool, owner: Option<(u32, u32)>) -> Result<(), String> {
    let temporary = path.with_extension("new");
    let _ = std::fs::remove_file(&temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if private {
        options.mode(0o600);
    }
    options
        .open(&temporary)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .and_then(|()| match owner {
            Some((uid, gid)) => std::os::unix::fs::chown(&temporary, Some(uid), Some(gid)),
            None => Ok(()),
        })
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

impl Credentials {
    /// Credentials for instances, if the agent itself connects with a
    /// certificate (else instances connect as the agent does: plain, or
    /// TLS without a certificate, which a TLS control plane refuses).
    pub(crate) fn new(options: &crate::AgentOptions) -> Option<Self> {
        if !options
            .transport
            .tls()
            .is_some_and(atoll_transport::ClientTls::has_identity)
        {
            return None;
        }
        let urls = atoll_transport::ControlUrls::parse(&options.control).ok()?;
        Some(Self {
            rest: options
                .transport
                .rest(urls, Some(std::time::Duration::from_secs(10))),
            dir: options.state_dir.join("credentials"),
            validity: Mutex::new(HashMap::new()),
            current: tokio::sync::Mutex::new(None),
            owners: Mutex::new(HashMap::new()),
        })
    }

    /// The files of `instance`, as its environment names them.
    pub(crate) fn files(&self, instance: &str) -> atoll_transport::TlsFiles {
        let dir = self.dir.join(instance);
        atoll_transport::TlsFiles {
            ca: Some(dir.join("ca.pem")),
            cert: Some(dir.join("cert.pem")),
            key: Some(dir.join("key.pem")),
        }
    }

    /// The fingerprint of the intermediate the control plane issues with
    /// now, asked at most every `CA_CHECK_INTERVAL` (None: it cannot say).
    async fn current_intermediate(&self) -> Option<String> {
        let mut current = self.current.lock().await;
        if let Some((fingerprint, asked)) = &*current
            && asked.elapsed() < atoll_api::rest::CA_CHECK_INTERVAL
        {
            return fingerprint.clone();
        }
        let fingerprint = self.rest.issuing_intermediate().await;
        *current = Some((fingerprint.clone(), std::time::Instant::now()));
        fingerprint
    }

    /// Makes sure `instance` has a certificate with more than a third of its
    /// life left, from the intermediate the control plane issues with now:
    /// issues one when it has none, it is due, or the intermediate was
    /// rotated.
    pub(crate) async fn ensure(&self, instance: &str) -> Result<(), String> {
        let files = self.files(instance);
        let (Some(cert), Some(key), Some(ca)) = (&files.cert, &files.key, &files.ca) else {
            return Ok(());
        };
        let now = OffsetDateTime::now_utc();
        let known = self.validity.lock().get(instance).cloned();
        let held = match known {
            Some(held) => Some(held),
            None => std::fs::read_to_string(cert)
                .ok()
                .filter(|_| key.exists() && ca.exists())
                .and_then(|pem| Held::of(&pem)),
        };
        if let Some(held) = held
            && !due(held.from, held.until, now)
        {
            let current = self.current_intermediate().await;
            let rotated =
                matches!((&current, &held.intermediate), (Some(now), Some(ours)) if now != ours);
            if !rotated {
                self.validity.lock().insert(instance.to_owned(), held);
                return Ok(());
            }
            tracing::info!(
                instance,
                "the CA's intermediate was rotated; renewing the instance's certificate now"
            );
        }
        // The request's subject is not used (the control plane names the
        // instance from the agent's certificate and `name`).
        let placeholder = AtollId::new("default", Role::Sdk, atoll_identity::NO_ZONE, instance)
            .map_err(|e| format!("instance name `{instance}`: {e}"))?;
        let (key_pem, csr) =
            atoll_identity::key_and_request(&placeholder).map_err(|e| e.to_string())?;
        let issued: IssuedCertificate = self
            .rest
            .post(
                "/v1/instance-certificates",
                &InstanceCertificateRequest {
                    name: instance.to_owned(),
                    csr,
                },
            )
            .await
            .map_err(|e| format!("the control plane did not certify {instance}: {e}"))?;
        let dir = self.dir.join(instance);
        let owner = self.owners.lock().get(instance).copied().flatten();
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            })
            .and_then(|()| match owner {
                Some((uid, gid)) => std::os::unix::fs::chown(&dir, Some(uid), Some(gid)),
                None => Ok(()),
            })
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // The key first: a crash between leaves a new key beside the old
        // certificate, refused at once, not a certificate without its key.
        write(key, &key_pem, true, owner)?;
        write(cert, &issued.chain, false, owner)?;
        write(ca, &issued.trust, false, owner)?;
        let held = Held::of(&issued.chain)
            .ok_or_else(|| format!("the certificate issued for {instance} cannot be read"))?;
        self.validity.lock().insert(instance.to_owned(), held);
        tracing::info!(instance, identity = %issued.identity, expires = %issued.expires, "instance certificate issued");
        Ok(())
    }

    /// Sets whom `instance`'s files belong to (uid, gid; none: the agent),
    /// handing over those it has already.
    pub(crate) fn own(&self, instance: &str, owner: Option<(u32, u32)>) {
        self.owners.lock().insert(instance.to_owned(), owner);
        if let Some((uid, gid)) = owner {
            let dir = self.dir.join(instance);
            let files = self.files(instance);
            for path in [Some(dir), files.ca, files.cert, files.key]
                .into_iter()
                .flatten()
                .filter(|p| p.exists())
            {
                if let Err(error) = std::os::unix::fs::chown(&path, Some(uid), Some(gid)) {
                    tracing::warn!(instance, path = %path.display(), %error, "cannot hand the instance its credentials");
                }
            }
        }
    }

    /// Forgets an instance that is no longer run, with its files.
    pub(crate) fn forget(&self, instance: &str) {
        self.owners.lock().remove(instance);
        self.validity.lock().remove(instance);
        let _ = std::fs::remove_dir_all(self.dir.join(instance));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_due_with_a_third_of_its_life_left() {
        let from = OffsetDateTime::UNIX_EPOCH;
        let until = from + time::Duration::hours(24);
        assert!(!due(from, until, from + time::Duration::hours(15)));
        assert!(due(from, until, from + time::Duration::hours(16)));
        assert!(due(from, until, until + time::Duration::hours(1)));
        let short = from + time::Duration::seconds(4);
        assert!(!due(from, short, from + time::Duration::milliseconds(1900)));
        assert!(due(from, short, from + time::Duration::seconds(2)));
    }
}
