//! Header handling: hop-by-hop headers, Atoll's propagation headers, W3C
//! baggage, X-Forwarded-*.

use http::header::{
    CONNECTION, HeaderMap, HeaderName, HeaderValue, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

/// Marks a request forwarded by another gateway (the loop guard).
pub const HOP: HeaderName = HeaderName::from_static("x-atoll-hop");
/// The routing key.
pub const KEY: HeaderName = HeaderName::from_static("x-atoll-key");
/// The shard.
pub const SHARD: HeaderName = HeaderName::from_static("x-atoll-shard");
/// The owning cell.
pub const CELL: HeaderName = HeaderName::from_static("x-atoll-cell");
/// The shard map's epoch.
pub const EPOCH: HeaderName = HeaderName::from_static("x-atoll-epoch");
/// Marks a mirrored copy.
pub const MIRROR: HeaderName = HeaderName::from_static("x-atoll-mirror");
/// W3C baggage.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");

/// The most headers a request may carry, not counting the ones the proxy
/// replaces (`x-atoll-*`, `baggage`, `X-Forwarded-For`, `X-Forwarded-Proto`):
/// a request forwarded by another gateway counts the same there as here.
/// The proxy adds at most [`ADDED_HEADERS`], so what it fronts must accept
/// `MAX_CLIENT_HEADERS + ADDED_HEADERS` (hyper's default is 100: raise it).
pub const MAX_CLIENT_HEADERS: usize = 100;

/// The most headers the proxy itself puts on a forwarded request: one
/// `baggage`, one `X-Forwarded-For`, one `X-Forwarded-Proto` and the five
/// `x-atoll-*` (key, shard, cell, epoch, hop).
pub const ADDED_HEADERS: usize = 8;

/// The most header lines a request head may have in all (the ones the
/// proxy replaces included).
pub(crate) const MAX_PARSED_HEADERS: usize = 128;

/// Whether a request header counts against [`MAX_CLIENT_HEADERS`].
pub(crate) fn counted(name: &[u8]) -> bool {
    let is = |expected: &[u8]| name.eq_ignore_ascii_case(expected);
    !(is(b"baggage")
        || is(b"x-forwarded-for")
        || is(b"x-forwarded-proto")
        || (name.len() >= 8 && name[..8].eq_ignore_ascii_case(b"x-atoll-")))
}

/// The message of a 431 for `counted` headers.
pub(crate) fn too_many_headers(counted: usize) -> String {
    format!(
        "the request has {counted} headers; the gateway accepts {MAX_CLIENT_HEADERS} (x-atoll-*, baggage and X-Forwarded-For/-Proto not counted)"
    )
}

/// Whether a W3C baggage member is one of Atoll's (`atoll.*`, in any case):
/// clients may not set them.
pub(crate) fn is_atoll_member(member: &str) -> bool {
    let key = member.trim_start().as_bytes();
    key.len() >= 6 && key[..6].eq_ignore_ascii_case(b"atoll.")
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Whether the request asks for a protocol upgrade (WebSocket).
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers.get_all(CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        })
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named by
/// `Connection`; keeps `Connection: upgrade` and `Upgrade` for upgrades.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
            .filter(|n| !(upgrade && *n == UPGRADE))
            .collect();
        for name in named {
            headers.remove(name);
        }
        if upgrade {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        } else {
            headers.remove(CONNECTION);
        }
    }
    for name in [KEEP_ALIVE, PROXY_CONNECTION, TE, TRAILER, TRANSFER_ENCODING] {
        if headers.contains_key(&name) {
            headers.remove(name);
        }
    }
    if !upgrade && headers.contains_key(UPGRADE) {
        headers.remove(UPGRADE);
    }
}

/// Removes client-supplied copies of Atoll's internal headers, and every
/// `baggage` header; returns the client's baggage members that are not
/// Atoll's (`atoll.*` in any case), comma-joined, for [`propagate`] to put
/// in the one `baggage` header it writes. Cheap when there are none.
pub(crate) fn strip_internal(headers: &mut HeaderMap) -> String {
    let internal = |name: &HeaderName| name.as_str().starts_with("x-atoll-");
    if headers.keys().any(internal) {
        let names: Vec<HeaderName> = headers.keys().filter(|n| internal(n)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
    let mut kept = String::new();
    if headers.contains_key(BAGGAGE) {
        for value in headers.get_all(BAGGAGE) {
            let Ok(text) = value.to_str() else { continue };
            for member in text.split(',') {
                let member = member.trim();
                if member.is_empty() || is_atoll_member(member) {
                    continue;
                }
                if !kept.is_empty() {
                    kept.push(',');
                }
                kept.push_str(member);
            }
        }
        headers.remove(BAGGAGE);
    }
    kept
}

/// Percent-encodes a baggage value (W3C baggage allows a restricted set).
fn baggage_value(text: &str) -> String {
    const SAFE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, SAFE).to_string()
}

/// What the upstream learns about the request's routing.
pub(crate) struct Propagation<'a> {
    pub(crate) key: Option<&'a HeaderValue>,
    pub(crate) shard: Option<HeaderValue>,
    pub(crate) cell: &'a HeaderValue,
    pub(crate) epoch: Option<&'a HeaderValue>,
}

/// Sets `x-atoll-*` and one `baggage` header with the same facts, followed
/// by the client's own members (`client_baggage`, from [`strip_internal`]).
pub(crate) fn propagate(headers: &mut HeaderMap, facts: &Propagation<'_>, client_baggage: &str) {
    let mut baggage = String::with_capacity(96);
    if let Some(key) = facts.key {
        headers.insert(KEY, key.clone());
        if let Ok(text) = key.to_str() {
            baggage.push_str("atoll.key=");
            baggage.push_str(&baggage_value(text));
            baggage.push(',');
        }
    }
    if let Some(shard) = &facts.shard {
        baggage.push_str("atoll.shard=");
        baggage.push_str(shard.to_str().unwrap_or_default());
        baggage.push(',');
        headers.insert(SHARD, shard.clone());
    }
    headers.insert(CELL, facts.cell.clone());
    baggage.push_str("atoll.cell=");
    baggage.push_str(facts.cell.to_str().unwrap_or_default());
    if let Some(epoch) = facts.epoch {
        headers.insert(EPOCH, epoch.clone());
        baggage.push_str(",atoll.epoch=");
        baggage.push_str(epoch.to_str().unwrap_or_default());
    }
    if !client_baggage.is_empty() {
        baggage.push(',');
        baggage.push_str(client_baggage);
    }
    if let Ok(value) = HeaderValue::from_str(&baggage) {
        headers.insert(BAGGAGE, value);
    }
}

/// Appends the client's address to `X-Forwarded-For` (every such header
/// joined into one list) and sets `X-Forwarded-Proto` to the protocol of
/// this hop. A request forwarded by another gateway of the deployment
/// (`trusted_hop`) keeps the protocol that gateway saw.
pub(crate) fn forwarded_for(
    headers: &mut HeaderMap,
    client: std::net::IpAddr,
    tls: bool,
    trusted_hop: bool,
) {
    let mut buffer = [0u8; 64];
    let text = {
        use std::io::Write as _;
        let mut cursor = std::io::Cursor::new(&mut buffer[..]);
        let _ = write!(cursor, "{client}");
        let len = cursor.position() as usize;
        &buffer[..len]
    };
    let mut joined = Vec::new();
    for existing in headers.get_all(&X_FORWARDED_FOR) {
        joined.extend_from_slice(existing.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(text);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    let kept = trusted_hop
        .then(|| headers.get(&X_FORWARDED_PROTO).cloned())
        .flatten();
    headers.insert(
        X_FORWARDED_PROTO,
        kept.unwrap_or_else(|| HeaderValue::from_static(if tls { "https" } else { "http" })),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_headers_and_baggage_members_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert("x-atoll-cell", HeaderValue::from_static("rz99"));
        headers.insert("x-atoll-shard", HeaderValue::from_static("1"));
        headers.insert("x-user-id", HeaderValue::from_static("42"));
        headers.append(
            "baggage",
            HeaderValue::from_static("atoll.cell=rz99, team=a"),
        );
        headers.append("baggage", HeaderValue::from_static("atoll.epoch=9"));
        headers.append(
            "baggage",
            HeaderValue::from_static("ATOLL.SHARD=5, Atoll.Cell=rz99,region=hz"),
        );
        let kept = strip_internal(&mut headers);
        assert!(!headers.contains_key("x-atoll-cell") && !headers.contains_key("x-atoll-shard"));
        assert_eq!(headers["x-user-id"], "42");
        assert!(
            !headers.contains_key("baggage"),
            "propagate writes the one baggage header"
        );
        assert_eq!(kept, "team=a,region=hz", "atoll.* members go in any case");
    }

    #[test]
    fn hop_by_hop_headers_go_and_upgrades_stay() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut headers, false);
        assert!(headers.is_empty(), "{headers:?}");

        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[CONNECTION], "upgrade");
        assert_eq!(headers[UPGRADE], "websocket");
    }

    #[test]
    fn propagation_sets_headers_and_baggage() {
        let mut headers = HeaderMap::new();
        let key = HeaderValue::from_static("u/1 2");
        let cell = HeaderValue::from_static("rz01");
        let epoch = HeaderValue::from_static("4");
        propagate(
            &mut headers,
            &Propagation {
                key: Some(&key),
                shard: Some(HeaderValue::from(7)),
                cell: &cell,
                epoch: Some(&epoch),
            },
            "team=a",
        );
        assert_eq!(headers[KEY], "u/1 2");
        assert_eq!(headers[SHARD], "7");
        assert_eq!(headers[CELL], "rz01");
        assert_eq!(headers[EPOCH], "4");
        assert_eq!(
            headers[BAGGAGE],
            "atoll.key=u%2F1%202,atoll.shard=7,atoll.cell=rz01,atoll.epoch=4,team=a"
        );
    }

    #[test]
    fn forwarded_for_appends_and_the_protocol_is_the_gateways() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        forwarded_for(&mut headers, "127.0.0.1".parse().expect("ip"), false, false);
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        assert_eq!(
            headers["x-forwarded-proto"], "http",
            "a client's claim is replaced"
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        forwarded_for(&mut headers, "127.0.0.1".parse().expect("ip"), false, true);
        assert_eq!(
            headers["x-forwarded-proto"], "https",
            "another gateway's is kept"
        );
    }

    #[test]
    fn atoll_headers_do_not_count_against_the_limit() {
        for name in [
            "X-Atoll-Shard",
            "baggage",
            "X-Forwarded-For",
            "x-forwarded-proto",
        ] {
            assert!(!counted(name.as_bytes()), "{name}");
        }
        for name in ["x-user-id", "cookie", "x-atoll", "forwarded"] {
            assert!(counted(name.as_bytes()), "{name}");
        }
    }
}
