//! Bootstrap and API tokens: `atb_<id>_<secret>` (a node's one-use token to
//! join) and `atk_<id>_<secret>` (a person's or a program's API token).
//!
//! The id names the stored record; the secret is 32 random bytes, shown
//! once, and stored only as its SHA-256. A fast hash is the right one here:
//! the secret has 256 bits of entropy, so there is nothing to guess, and
//! checking a token costs one hash, not a password-hashing delay.

use std::fmt;

use ring::rand::SecureRandom as _;

/// What a token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// One use, to join as a node of a role and zone.
    Bootstrap,
    /// A person's or a program's key to the REST API.
    Api,
}

impl TokenKind {
    fn prefix(self) -> &'static str {
        match self {
            TokenKind::Bootstrap => "atb",
            TokenKind::Api => "atk",
        }
    }
}

/// A token, with its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// What it is for.
    pub kind: TokenKind,
    /// Its record's id (16 hex digits): safe to show and to log.
    pub id: String,
    secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The whole token, secret included: for the person it was made for only.
impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}_{}", self.kind.prefix(), self.id, self.secret)
    }
}

/// Why text is not a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "not an Atoll token: {0}; copy it again from `atoll token create` (it looks like atk_<16 hex digits>_<64 hex digits>)"
)]
pub struct TokenError(String);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    // SystemRandom only fails when the OS has no randomness at all.
    let _ = ring::rand::SystemRandom::new().fill(&mut buffer);
    hex(&buffer)
}

impl Token {
    /// A new token of `kind`.
    pub fn generate(kind: TokenKind) -> Self {
        Self {
            kind,
            id: random_hex(8),
            secret: random_hex(32),
        }
    }

    /// Reads a token from its text.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let mut parts = text.splitn(3, '_');
        let (Some(prefix), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError("it needs three parts joined by `_`".into()));
        };
        let kind = match prefix {
            "atb" => TokenKind::Bootstrap,
            "atk" => TokenKind::Api,
            _ => {
                return Err(TokenError(format!(
                    "it starts with `{prefix}_`, not atb_ or atk_"
                )));
            }
        };
        let is_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !is_hex(id, 16) || !is_hex(secret, 64) {
            return Err(TokenError(
                "its id or secret is not the hex it should be".into(),
            ));
        }
        Ok(Self {
            kind,
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// What is stored: the SHA-256 of the secret, hex.
    pub fn hash(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, self.secret.as_bytes()).as_ref())
    }

    /// Whether this token's secret is the one `stored` (a [`hash`]) was
    /// made from; compared in constant time.
    ///
    /// [`hash`]: Self::hash
    pub fn matches(&self, stored: &str) -> bool {
        let mine = self.hash();
        mine.len() == stored.len()
            && mine
                .bytes()
                .zip(stored.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}
