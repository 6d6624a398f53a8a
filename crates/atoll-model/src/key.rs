//! Routing keys: where they come from in a request and how they become a shard.
//!
//! Everything here is a pure function so that the gateway, the sidecar, the SDK
//! and the tests compute the same shard for the same key. `docs/sharding.md`
//! states the rules for odd keys (non-numeric, leading zeros, huge, empty) and
//! gives hash test vectors for other languages.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use crate::resource::{HashName, KeySource, KeySpec, OnMissing, Transform};

/// Keys longer than this many bytes are refused: no real user id is this
/// long, and it bounds the work per request.
pub const MAX_KEY_LEN: usize = 256;

/// The largest `decimalSuffix` digit count (10^9 shards is far beyond any map).
pub const MAX_SUFFIX_DIGITS: u32 = 9;

/// Why a key could not become a shard. The gateway answers 400 with this text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is empty (sources treat empty values as absent, so this only
    /// comes from calling [`shard_of`] directly).
    #[error("the routing key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("the routing key is {len} bytes long; the limit is {MAX_KEY_LEN}")]
    TooLong {
        /// The key's length in bytes.
        len: usize,
    },
    /// The key holds control characters (CR, LF, NUL...): never a real id,
    /// and unsafe to pass on in a header.
    #[error("the routing key contains control characters")]
    Control,
    /// `decimalSuffix` needs the key's last digits to be decimal.
    #[error(
        "routing key `{key}` must end in {digits} decimal digit(s) (or be all digits if shorter) for decimalSuffix"
    )]
    NotDecimalSuffix {
        /// The key, lossily decoded.
        key: String,
        /// The rule's digit count.
        digits: u32,
    },
    /// `mod` needs the whole key to be a decimal number.
    #[error("routing key `{key}` must be a non-negative decimal number for mod")]
    NotDecimal {
        /// The key, lossily decoded.
        key: String,
    },
}

/// The shard of `key` under `transform`, in `[0, shards)`.
///
/// `shards` must be at least 1 (validation guarantees it; 0 is treated as 1).
pub fn shard_of(transform: &Transform, shards: u32, key: &[u8]) -> Result<u32, KeyError> {
    let shards = u64::from(shards.max(1));
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong { len: key.len() });
    }
    if key.iter().any(|b| *b < 0x20 || *b == 0x7f) {
        return Err(KeyError::Control);
    }
    let value = match transform {
        Transform::DecimalSuffix(digits) => decimal_suffix(key, *digits)?,
        Transform::Mod(modulus) => decimal_mod(key, (*modulus).max(1))?,
        Transform::Hash(name) => hash(*name, key),
    };
    // Lossless: the remainder is below `shards`, which came from a u32.
    Ok(u32::try_from(value % shards).unwrap_or(0))
}

/// The number formed by the last `digits` bytes of `key`, which must all be
/// ASCII digits; a key shorter than `digits` must be all digits.
fn decimal_suffix(key: &[u8], digits: u32) -> Result<u64, KeyError> {
    let digits = digits.clamp(1, MAX_SUFFIX_DIGITS) as usize;
    let tail = &key[key.len().saturating_sub(digits)..];
    if !tail.iter().all(u8::is_ascii_digit) {
        return Err(KeyError::NotDecimalSuffix {
            key: String::from_utf8_lossy(key).into_owned(),
            digits: digits as u32,
        });
    }
    Ok(tail
        .iter()
        .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0')))
}

/// `key` read as a decimal number of any length, modulo `modulus`, without
/// overflow.
fn decimal_mod(key: &[u8], modulus: u64) -> Result<u64, KeyError> {
    if !key.iter().all(u8::is_ascii_digit) {
        return Err(KeyError::NotDecimal {
            key: String::from_utf8_lossy(key).into_owned(),
        });
    }
    let modulus = u128::from(modulus);
    let remainder = key
        .iter()
        .fold(0u128, |acc, b| (acc * 10 + u128::from(b - b'0')) % modulus);
    // Lossless: below `modulus`, a u64.
    Ok(u64::try_from(remainder).unwrap_or(0))
}

/// A named stable hash of `key`.
pub fn hash(name: HashName, key: &[u8]) -> u64 {
    match name {
        HashName::Fnv1a64 => fnv1a64(key),
        HashName::Xxh3 => xxhash_rust::xxh3::xxh3_64(key),
    }
}

/// 64-bit FNV-1a: offset basis 0xcbf29ce484222325, prime 0x100000001b3.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The value of cookie `name` in a `Cookie` header (`a=1; b=2`), with
/// surrounding double quotes removed. Names match exactly.
pub fn cookie_value<'a>(cookie_header: &'a str, name: &str) -> Option<&'a str> {
    cookie_header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        if key.trim() != name {
            return None;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        Some(value)
    })
}

/// The first value of parameter `name` in a query string (without `?`),
/// percent-decoded, `+` read as a space.
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if decode_component(key) != name {
            return None;
        }
        Some(decode_component(value))
    })
}

fn decode_component(text: &str) -> Cow<'_, str> {
    if !text.contains(['%', '+']) {
        return Cow::Borrowed(text);
    }
    let spaced = text.replace('+', " ");
    Cow::Owned(percent_decode_str(&spaced).decode_utf8_lossy().into_owned())
}

/// A path template such as `/users/{uid}/accounts`: literal segments, `*` for
/// any one segment, and exactly one `{variable}` that captures the key. A
/// request path matches when its leading segments match the template (later
/// segments are allowed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Any,
    Capture,
}

impl PathTemplate {
    /// Parses a template; the error says what is wrong with it.
    pub fn parse(template: &str) -> Result<PathTemplate, String> {
        let Some(rest) = template.strip_prefix('/') else {
            return Err(format!("path template `{template}` must start with `/`"));
        };
        let mut segments = Vec::new();
        let mut captures = 0;
        for part in rest.split('/') {
            if part.starts_with('{') && part.ends_with('}') && part.len() > 2 {
                let name = &part[1..part.len() - 1];
                if !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(format!(
                        "variable `{{{name}}}` in `{template}` may use letters, digits, `_` and `-` only"
                    ));
                }
                captures += 1;
                segments.push(Segment::Capture);
            } else if part == "*" {
                segments.push(Segment::Any);
            } else if part.contains(['{', '}']) {
                return Err(format!(
                    "segment `{part}` of `{template}`: a variable must be a whole segment like `{{uid}}`"
                ));
            } else {
                segments.push(Segment::Literal(part.to_owned()));
            }
        }
        if captures != 1 {
            return Err(format!(
                "path template `{template}` must have exactly one `{{variable}}` segment for the key; it has {captures}"
            ));
        }
        Ok(PathTemplate { segments })
    }

    /// The captured segment of `path` (percent-decoded), if the path matches.
    pub fn capture<'a>(&self, path: &'a str) -> Option<Cow<'a, str>> {
        let rest = path.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let mut captured = None;
        for segment in &self.segments {
            let part = parts.next()?;
            match segment {
                Segment::Literal(literal) if literal != part => return None,
                Segment::Literal(_) | Segment::Any => {}
                Segment::Capture => captured = Some(part),
            }
        }
        let captured = captured?;
        if captured.contains('%') {
            Some(percent_decode_str(captured).decode_utf8_lossy())
        } else {
            Some(Cow::Borrowed(captured))
        }
    }
}

/// The text of the field at dotted `path` in a JSON body: strings as they are,
/// integers in decimal. Anything else (objects, floats, invalid JSON) gives
/// `None`.
pub fn json_field(body: &[u8], path: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut current = &value;
    for part in path.split('.') {
        current = match current {
            serde_json::Value::Object(map) => map.get(part)?,
            serde_json::Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match current {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

/// What a request offers to key extraction. Implemented by the gateway over
/// its request type and by tests over plain structs.
pub trait RequestView {
    /// The first value of a header (name is lower-case), if present and UTF-8.
    fn header(&self, name: &str) -> Option<&str>;
    /// The value of cookie `name` in any `Cookie` header (HTTP/2 may split
    /// cookies over several); [`cookie_value`] parses one header.
    fn cookie(&self, name: &str) -> Option<&str>;
    /// The path, without the query.
    fn path(&self) -> &str;
    /// The query string without `?`, if any.
    fn query(&self) -> Option<&str>;
    /// The buffered body, when a body source asked for it.
    fn body(&self) -> Option<&[u8]>;
}

/// A [`KeySpec`] prepared for many requests.
#[derive(Clone, Debug)]
pub struct KeyRule {
    sources: Vec<CompiledSource>,
    transform: Transform,
    shards: u32,
    on_missing: OnMissing,
}

#[derive(Clone, Debug)]
enum CompiledSource {
    Header(String),
    Cookie(String),
    Query(String),
    Path(PathTemplate),
    Body(String),
}

/// The result of routing one request's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyOutcome<'a> {
    /// The key and its shard.
    Shard {
        /// The key as found.
        key: Cow<'a, str>,
        /// Its shard.
        shard: u32,
    },
    /// No source gave a key; the rule says what to do.
    Missing(OnMissing),
    /// A key was found but cannot be turned into a shard.
    Invalid(KeyError),
}

impl KeyRule {
    /// Compiles a rule; fails only on an invalid path template, which
    /// validation reports first.
    pub fn new(shards: u32, spec: &KeySpec) -> Result<KeyRule, String> {
        let sources = spec
            .sources
            .iter()
            .map(|source| {
                Ok(match source {
                    KeySource::Header(name) => CompiledSource::Header(name.to_ascii_lowercase()),
                    KeySource::Cookie(name) => CompiledSource::Cookie(name.clone()),
                    KeySource::Query(name) => CompiledSource::Query(name.clone()),
                    KeySource::Path(template) => {
                        CompiledSource::Path(PathTemplate::parse(template)?)
                    }
                    KeySource::Body(path) => CompiledSource::Body(path.clone()),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(KeyRule {
            sources,
            transform: spec.transform.clone(),
            shards,
            on_missing: spec.on_missing,
        })
    }

    /// Whether some source reads the body (so the gateway must buffer it).
    pub fn needs_body(&self) -> bool {
        self.sources
            .iter()
            .any(|s| matches!(s, CompiledSource::Body(_)))
    }

    /// The first non-empty key of the request, in source order.
    pub fn extract<'a, R: RequestView + ?Sized>(&self, request: &'a R) -> Option<Cow<'a, str>> {
        self.sources.iter().find_map(|source| {
            let value: Option<Cow<'a, str>> = match source {
                CompiledSource::Header(name) => request.header(name).map(Cow::Borrowed),
                CompiledSource::Cookie(name) => request.cookie(name).map(Cow::Borrowed),
                CompiledSource::Query(name) => request.query().and_then(|q| query_value(q, name)),
                CompiledSource::Path(template) => template.capture(request.path()),
                CompiledSource::Body(path) => request
                    .body()
                    .and_then(|b| json_field(b, path))
                    .map(Cow::Owned),
            };
            value.filter(|v| !v.is_empty())
        })
    }

    /// Extracts the key and computes its shard.
    pub fn route<'a, R: RequestView + ?Sized>(&self, request: &'a R) -> KeyOutcome<'a> {
        match self.extract(request) {
            None => KeyOutcome::Missing(self.on_missing),
            Some(key) => match shard_of(&self.transform, self.shards, key.as_bytes()) {
                Ok(shard) => KeyOutcome::Shard { key, shard },
                Err(error) => KeyOutcome::Invalid(error),
            },
        }
    }
}

#[cfg(test)]
mod tests;
