//! Request paths in one form before routes see them (RFC 3986 §6.2.2), so
//! that `/api/../admin` cannot match a `/api/` route and reach the upstream
//! as something else.
//!
//! - percent-encoded unreserved characters are decoded (`%2e` is `.`,
//!   `%61` is `a`), and the hex digits of other escapes upper-cased;
//! - `//` becomes `/`;
//! - `.` and `..` segments are removed (RFC 3986 §5.2.4), a `..` at the
//!   root is dropped;
//! - refused, as no route should guess what an upstream makes of them: an
//!   encoded slash or backslash (`%2F`, `%5C`), a raw backslash, an encoded
//!   NUL (`%00`), and a malformed escape (`%zz`).
//!
//! The gateway routes and forwards the normalised path; the query is left
//! as it is. `docs/gateway.md` ("Paths") states the rules for users.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `%` not followed by two hex digits.
    #[error("the path has a malformed percent-escape (`%` must be followed by two hex digits)")]
    BadEscape,
    /// `%2F` or `%5C`: a separator in disguise.
    #[error(
        "the path holds an encoded slash or backslash (%2F, %5C), which upstreams read differently; send the segments unencoded"
    )]
    EncodedSeparator,
    /// A raw `\`.
    #[error(
        "the path holds a backslash, which some upstreams take for a slash; encode it or leave it out"
    )]
    Backslash,
    /// `%00`.
    #[error("the path holds an encoded NUL (%00)")]
    Nul,
}

/// The normalised form of `path` (which starts with `/`): borrowed when it
/// is already normal, which is the common case and costs one scan.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if is_normal(path.as_bytes())? {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// Whether `path` needs no change: no escape, no `//`, no dot segment. A
/// backslash is refused here already.
fn is_normal(path: &[u8]) -> Result<bool, PathError> {
    let mut normal = true;
    for (i, byte) in path.iter().enumerate() {
        match byte {
            b'\\' => return Err(PathError::Backslash),
            b'%' => normal = false,
            b'/' => {
                let next = path.get(i + 1).copied();
                if next == Some(b'/') {
                    normal = false;
                } else if next == Some(b'.') {
                    // `/.` ends the path or is followed by `/`: `.`; `/..`
                    // likewise: `..`. `/.well-known` is a name.
                    let after = &path[i + 2..];
                    let dot_segment = after.is_empty()
                        || after[0] == b'/'
                        || (after[0] == b'.' && (after.len() == 1 || after[1] == b'/'));
                    if dot_segment {
                        normal = false;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(normal)
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Decodes percent-escapes of unreserved characters, upper-cases the others,
/// refuses separators in disguise.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte != b'%' {
            // Copy the run up to the next escape (keeps UTF-8 whole).
            let end = bytes[i..]
                .iter()
                .position(|b| *b == b'%')
                .map_or(bytes.len(), |p| i + p);
            out.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let (Some(high), Some(low)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let value = high * 16 + low;
        match value {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            0 => return Err(PathError::Nul),
            _ if unreserved(value) => out.push(char::from(value)),
            _ => {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[usize::from(high)]));
                out.push(char::from(b"0123456789ABCDEF"[usize::from(low)]));
            }
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on an absolute path, with empty segments (`//`) merged.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            name => {
                segments.push(name);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> String {
        normalize_path(path).expect("normalises").into_owned()
    }

    #[test]
    fn normal_paths_are_borrowed_unchanged() {
        for path in [
            "/",
            "/api/balance",
            "/accounts/1001/deposit",
            "/.well-known/x",
            "/a/..b/c.",
            "/a/b/",
        ] {
            assert!(
                matches!(normalize_path(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn dot_segments_and_double_slashes_go() {
        for (path, expected) in [
            ("/api/../admin", "/admin"),
            ("/api/7/../../etc/passwd", "/etc/passwd"),
            ("/../../etc", "/etc"),
            ("/api/./x", "/api/x"),
            ("/api/.", "/api/"),
            ("/api/..", "/"),
            ("/api/x/..", "/api/"),
            ("//api///x", "/api/x"),
            ("/api//", "/api/"),
            ("/..", "/"),
            ("/.", "/"),
        ] {
            assert_eq!(normal(path), expected, "{path}");
        }
    }

    #[test]
    fn encoded_dots_and_unreserved_characters_are_decoded() {
        for (path, expected) in [
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E%2E/admin", "/admin"),
            ("/api/.%2e/admin", "/admin"),
            ("/api/%2e/x", "/api/x"),
            ("/%61pi/x", "/api/x"),
            ("/a%2db%7e", "/a-b~"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/x%20y", "/x%20y"),
            ("/x%3ay", "/x%3Ay"),
        ] {
            assert_eq!(normal(path), expected, "{path}");
        }
    }

    #[test]
    fn separators_in_disguise_and_bad_escapes_are_refused() {
        for (path, error) in [
            ("/api/..%2Fadmin", PathError::EncodedSeparator),
            ("/api/..%2fadmin", PathError::EncodedSeparator),
            ("/api/..%5cadmin", PathError::EncodedSeparator),
            ("/api\\..\\admin", PathError::Backslash),
            ("/api/%00", PathError::Nul),
            ("/api/%zz", PathError::BadEscape),
            ("/api/%4", PathError::BadEscape),
            ("/api/%", PathError::BadEscape),
        ] {
            assert_eq!(normalize_path(path), Err(error), "{path}");
        }
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for path in ["/a/./b/../c//d/", "/%2e%2e/%61", "/x/%3a/..", "/a/b/c"] {
            let once = normal(path);
            assert_eq!(normal(&once), once, "{path}");
        }
    }
}
