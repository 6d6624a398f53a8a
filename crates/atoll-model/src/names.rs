//! Syntax checks for names, header tokens, methods and addresses.

/// Why `name` is not a DNS label (RFC 1123), or `None` if it is one.
pub fn dns_label_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a name is required".into());
    }
    if name.len() > 63 {
        return Some(format!(
            "`{name}` is {} characters long; names are at most 63",
            name.len()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some(format!(
            "`{name}` is not a DNS label: use lower-case letters, digits and `-` only"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Some(format!(
            "`{name}` is not a DNS label: it must start and end with a letter or digit"
        ));
    }
    None
}

/// Whether `name` is an HTTP token (header names, methods).
pub fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Why `method` is not an upper-case HTTP method, or `None`.
pub fn method_problem(method: &str) -> Option<String> {
    if is_token(method) && !method.bytes().any(|b| b.is_ascii_lowercase()) {
        None
    } else {
        Some(format!(
            "`{method}` is not an HTTP method; write methods in upper case, like POST"
        ))
    }
}

/// Why `address` is not `host:port`, or `None`.
pub fn address_problem(address: &str) -> Option<String> {
    if address.parse::<std::net::SocketAddr>().is_ok() {
        return None;
    }
    let hint = "write it as host:port, e.g. 127.0.0.1:9001 or bank-1.hz-a:9001";
    let Some((host, port)) = address.rsplit_once(':') else {
        return Some(format!("`{address}` has no port; {hint}"));
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return Some(format!("`{address}` has no valid port (1-65535); {hint}")),
        Ok(_) => {}
    }
    if host_problem(host).is_some() {
        return Some(format!("`{address}` has no valid host; {hint}"));
    }
    None
}

/// Why `host` is not a host name (or IP address), or `None`.
pub fn host_problem(host: &str) -> Option<String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        None
    } else {
        Some(format!("`{host}` is not a host name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        assert_eq!(dns_label_problem("rz01"), None);
        assert_eq!(dns_label_problem("hz-a"), None);
        for bad in ["", "RZ01", "rz_01", "-a", "a-", &"a".repeat(64), "a.b"] {
            assert!(dns_label_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn addresses() {
        for good in [
            "127.0.0.1:9001",
            "[::1]:80",
            "bank-1.hz-a:9001",
            "localhost:1",
        ] {
            assert_eq!(address_problem(good), None, "{good}");
        }
        for bad in [
            "127.0.0.1",
            "host:0",
            "host:70000",
            ":80",
            "bad host:80",
            "a..b:80",
        ] {
            assert!(address_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn methods() {
        assert_eq!(method_problem("POST"), None);
        assert!(method_problem("post").is_some());
        assert!(method_problem("PO ST").is_some());
    }
}
