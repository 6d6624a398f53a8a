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

/// Removes client-supplied copies of Atoll's internal headers and `atoll.*`
/// baggage members. Cheap when there are none.
pub(crate) fn strip_internal(headers: &mut HeaderMap) {
    let internal = |name: &HeaderName| name.as_str().starts_with("x-atoll-");
    if headers.keys().any(internal) {
        let names: Vec<HeaderName> = headers.keys().filter(|n| internal(n)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
    if headers.contains_key(BAGGAGE) {
        let kept: Vec<HeaderValue> = headers
            .get_all(BAGGAGE)
            .iter()
            .filter_map(|value| {
                let text = value.to_str().ok()?;
                let members: Vec<&str> = text
                    .split(',')
                    .filter(|m| !m.trim_start().starts_with("atoll."))
                    .filter(|m| !m.trim().is_empty())
                    .collect();
                if members.is_empty() {
                    None
                } else {
                    HeaderValue::from_str(&members.join(",")).ok()
                }
            })
            .collect();
        headers.remove(BAGGAGE);
        for value in kept {
            headers.append(BAGGAGE, value);
        }
    }
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

/// Sets `x-atoll-*` and appends one `baggage` header with the same facts.
pub(crate) fn propagate(headers: &mut HeaderMap, facts: &Propagation<'_>) {
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
    if let Ok(value) = HeaderValue::from_str(&baggage) {
        headers.append(BAGGAGE, value);
    }
}

/// Appends the client's address to `X-Forwarded-For` and sets
/// `X-Forwarded-Proto` when absent.
pub(crate) fn forwarded_for(headers: &mut HeaderMap, client: std::net::IpAddr, tls: bool) {
    let mut buffer = [0u8; 64];
    let text = {
        use std::io::Write as _;
        let mut cursor = std::io::Cursor::new(&mut buffer[..]);
        let _ = write!(cursor, "{client}");
        let len = cursor.position() as usize;
        &buffer[..len]
    };
    let value = match headers.get(&X_FORWARDED_FOR) {
        Some(existing) => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + text.len());
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(text);
            HeaderValue::from_bytes(&joined).ok()
        }
        None => HeaderValue::from_bytes(text).ok(),
    };
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR, value);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );
    }
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
        strip_internal(&mut headers);
        assert!(!headers.contains_key("x-atoll-cell") && !headers.contains_key("x-atoll-shard"));
        assert_eq!(headers["x-user-id"], "42");
        let baggage: Vec<_> = headers.get_all("baggage").iter().collect();
        assert_eq!(baggage, [" team=a"]);
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
        );
        assert_eq!(headers[KEY], "u/1 2");
        assert_eq!(headers[SHARD], "7");
        assert_eq!(headers[CELL], "rz01");
        assert_eq!(headers[EPOCH], "4");
        assert_eq!(
            headers[BAGGAGE],
            "atoll.key=u%2F1%202,atoll.shard=7,atoll.cell=rz01,atoll.epoch=4"
        );
    }

    #[test]
    fn forwarded_for_appends() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        forwarded_for(&mut headers, "127.0.0.1".parse().expect("ip"), false);
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
    }
}
