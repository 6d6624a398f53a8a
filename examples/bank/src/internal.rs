//! Calls between bank instances: credits from a payer's cell to a payee's,
//! and replication shipments to a standby. They live under `/internal/`,
//! which no public route matches, go straight to an instance (never through
//! a gateway), and carry an HMAC-SHA256 signature made with a secret every
//! instance of the deployment shares: an instance refuses an internal call
//! it cannot verify, so a client that reaches a gateway, or an instance
//! directly, cannot mint money or write into a standby's copy.
//!
//! The secret is read from the file `BANK_SECRET_FILE` names (`atoll up`
//! makes one per sandbox, mode 0600). It stands in for mutual TLS between
//! cells, which comes with Atoll's identity work; see docs/bank.md.
//!
//! Signature: `x-bank-signature: t=<unix seconds>,v1=<hex>` over
//! `"<t>\n<METHOD>\n<path>\n"` followed by the body. A signature older or
//! newer than [`MAX_SKEW`] is refused, which bounds replays; both internal
//! calls are idempotent besides (a credit by its key, a shipment by its
//! positions), so a replay inside the window changes nothing.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use ring::hmac;

use crate::{Problem, fail};

/// The header that carries the signature.
pub(crate) const SIGNATURE: &str = "x-bank-signature";

/// The environment variable naming the secret's file.
pub(crate) const SECRET_FILE_ENV: &str = "BANK_SECRET_FILE";

/// How far a signature's time may be from this instance's clock.
pub(crate) const MAX_SKEW: Duration = Duration::from_secs(300);

/// The shortest secret accepted, in bytes.
const MIN_SECRET: usize = 16;

/// The deployment's shared secret, as an HMAC key.
pub(crate) struct Secret {
    key: hmac::Key,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret from its bytes (surrounding whitespace is not part of it).
    pub(crate) fn new(bytes: &[u8]) -> Result<Self, String> {
        let bytes = bytes.trim_ascii();
        if bytes.len() < MIN_SECRET {
            return Err(format!(
                "the secret is {} bytes long; it must be at least {MIN_SECRET} (e.g. 32 random bytes, hex-encoded)",
                bytes.len()
            ));
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
    }

    /// The secret in the file `BANK_SECRET_FILE` names.
    pub(crate) fn from_env() -> anyhow::Result<Self> {
        let Some(path) = std::env::var_os(SECRET_FILE_ENV) else {
            anyhow::bail!(
                "{SECRET_FILE_ENV} is not set: bank instances sign the calls they make to each other with a secret they share; point {SECRET_FILE_ENV} at a file holding it (atoll up makes one per sandbox; see docs/bank.md)"
            );
        };
        Self::from_file(Path::new(&path))
    }

    fn from_file(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the shared secret {} ({SECRET_FILE_ENV}): {e}",
                path.display()
            )
        })?;
        Self::new(&bytes)
            .map_err(|e| anyhow::anyhow!("{} ({SECRET_FILE_ENV}): {e}", path.display()))
    }

    /// The signature header of a call made now.
    pub(crate) fn sign(&self, method: &str, path: &str, body: &[u8]) -> HeaderValue {
        self.sign_at(unix_now(), method, path, body)
    }

    fn sign_at(&self, time: u64, method: &str, path: &str, body: &[u8]) -> HeaderValue {
        let tag = hmac::sign(&self.key, &message(time, method, path, body));
        let mut text = format!("t={time},v1=");
        for byte in tag.as_ref() {
            text.push_str(&format!("{byte:02x}"));
        }
        // Digits, letters, `=` and `,` only: always a valid header value.
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }

    /// Checks the signature of a call received now.
    pub(crate) fn verify(
        &self,
        headers: &HeaderMap,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(), Problem> {
        self.verify_at(unix_now(), headers, method, path, body)
    }

    fn verify_at(
        &self,
        now: u64,
        headers: &HeaderMap,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(), Problem> {
        let refuse = |why: &str| {
            fail(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                format!(
                    "{path} is called only by other bank instances of this deployment, which sign it ({SIGNATURE}): {why}"
                ),
            )
        };
        let Some(value) = headers.get(SIGNATURE) else {
            return Err(refuse("the call carries no signature"));
        };
        let text = value
            .to_str()
            .map_err(|_| refuse("the signature is not text"))?;
        let mut time = None;
        let mut tag = None;
        for part in text.split(',') {
            match part.trim().split_once('=') {
                Some(("t", value)) => time = value.parse::<u64>().ok(),
                Some(("v1", value)) => tag = decode_hex(value),
                _ => {}
            }
        }
        let (Some(time), Some(tag)) = (time, tag) else {
            return Err(refuse(
                "the signature is not of the form t=<seconds>,v1=<hex>",
            ));
        };
        if now.abs_diff(time) > MAX_SKEW.as_secs() {
            return Err(refuse(&format!(
                "the signature was made at {time}, more than {}s from this instance's clock ({now}); check the hosts' clocks",
                MAX_SKEW.as_secs()
            )));
        }
        hmac::verify(&self.key, &message(time, method, path, body), &tag).map_err(|_| {
            refuse("the signature does not match (another deployment's secret, or a changed call)")
        })
    }
}

fn message(time: u64, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut message = format!("{time}\n{method}\n{path}\n").into_bytes();
    message.extend_from_slice(body);
    message
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 128 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> Secret {
        Secret::new(text.as_bytes()).expect("secret")
    }

    fn headers(value: HeaderValue) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(SIGNATURE, value);
        headers
    }

    #[test]
    fn a_signed_call_verifies_and_any_change_is_refused() {
        let secret = secret("0123456789abcdef0123456789abcdef");
        let now = 1_800_000_000;
        let signed = headers(secret.sign_at(now, "POST", "/internal/credits", b"{\"amount\":30}"));
        assert!(
            secret
                .verify_at(
                    now,
                    &signed,
                    "POST",
                    "/internal/credits",
                    b"{\"amount\":30}"
                )
                .is_ok()
        );
        for (method, path, body) in [
            ("POST", "/internal/credits", &b"{\"amount\":3000}"[..]),
            (
                "POST",
                "/internal/replication/apply",
                &b"{\"amount\":30}"[..],
            ),
            ("PUT", "/internal/credits", &b"{\"amount\":30}"[..]),
        ] {
            let problem = secret
                .verify_at(now, &signed, method, path, body)
                .expect_err("a changed call is refused");
            assert_eq!(problem.status, StatusCode::UNAUTHORIZED);
            assert!(
                problem.message.contains("does not match"),
                "{}",
                problem.message
            );
        }
    }

    #[test]
    fn another_secret_an_old_signature_or_none_is_refused() {
        let ours = secret("0123456789abcdef0123456789abcdef");
        let theirs = secret("fedcba9876543210fedcba9876543210");
        let now = 1_800_000_000;
        let forged = headers(theirs.sign_at(now, "POST", "/internal/credits", b"{}"));
        assert!(
            ours.verify_at(now, &forged, "POST", "/internal/credits", b"{}")
                .is_err()
        );
        let old = headers(ours.sign_at(now - 301, "POST", "/internal/credits", b"{}"));
        let problem = ours
            .verify_at(now, &old, "POST", "/internal/credits", b"{}")
            .expect_err("too old");
        assert!(problem.message.contains("clock"), "{}", problem.message);
        let problem = ours
            .verify_at(now, &HeaderMap::new(), "POST", "/internal/credits", b"{}")
            .expect_err("unsigned");
        assert!(
            problem.message.contains("no signature"),
            "{}",
            problem.message
        );
        let garbage = headers(HeaderValue::from_static("t=1,v1=zz"));
        assert!(
            ours.verify_at(now, &garbage, "POST", "/internal/credits", b"{}")
                .is_err()
        );
    }

    #[test]
    fn a_short_secret_is_refused() {
        assert!(Secret::new(b"short\n").is_err());
        assert!(Secret::new(b"  0123456789abcdef  \n").is_ok());
    }
}
