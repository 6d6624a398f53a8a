//! Matching requests to routes: hosts, paths, methods, headers.

use std::collections::HashMap;

use http::{HeaderName, Method};

use crate::HeaderSource;

use crate::RouteId;

/// A set of HTTP methods: a bit per common method, a list for the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Methods {
    bits: u16,
    others: Vec<Method>,
}

fn bit(method: &Method) -> Option<u16> {
    Some(match *method {
        Method::GET => 1,
        Method::POST => 1 << 1,
        Method::PUT => 1 << 2,
        Method::DELETE => 1 << 3,
        Method::PATCH => 1 << 4,
        Method::HEAD => 1 << 5,
        Method::OPTIONS => 1 << 6,
        Method::CONNECT => 1 << 7,
        Method::TRACE => 1 << 8,
        _ => return None,
    })
}

impl Methods {
    pub(crate) fn parse(names: &[String]) -> Result<Self, String> {
        let mut set = Methods::default();
        for name in names {
            let method = Method::from_bytes(name.as_bytes())
                .map_err(|_| format!("`{name}` is not an HTTP method"))?;
            match bit(&method) {
                Some(b) => set.bits |= b,
                None => set.others.push(method),
            }
        }
        Ok(set)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bits == 0 && self.others.is_empty()
    }

    pub(crate) fn contains(&self, method: &Method) -> bool {
        match bit(method) {
            Some(b) => self.bits & b != 0,
            None => self.others.contains(method),
        }
    }
}

/// A condition on one header.
#[derive(Clone, Debug)]
pub(crate) struct HeaderCondition {
    pub(crate) name: HeaderName,
    pub(crate) value: ValueCondition,
}

#[derive(Clone, Debug)]
pub(crate) enum ValueCondition {
    Present,
    Exact(Vec<u8>),
    Prefix(Vec<u8>),
}

impl HeaderCondition {
    pub(crate) fn new(spec: &atoll_model::HeaderMatch) -> Result<Self, String> {
        let name = HeaderName::from_bytes(spec.name.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("`{}` is not a header name", spec.name))?;
        let value = match (&spec.exact, &spec.prefix) {
            (Some(exact), _) => ValueCondition::Exact(exact.as_bytes().to_vec()),
            (None, Some(prefix)) => ValueCondition::Prefix(prefix.as_bytes().to_vec()),
            (None, None) => ValueCondition::Present,
        };
        Ok(Self { name, value })
    }

    /// Whether any value of the header satisfies the condition.
    pub(crate) fn holds<H: HeaderSource + ?Sized>(&self, headers: &H) -> bool {
        headers
            .values(self.name.as_str())
            .any(|v| match &self.value {
                ValueCondition::Present => true,
                ValueCondition::Exact(exact) => v == exact.as_slice(),
                ValueCondition::Prefix(prefix) => v.starts_with(prefix),
            })
    }
}

/// Whether every condition holds.
pub(crate) fn all_hold<H: HeaderSource + ?Sized>(
    conditions: &[HeaderCondition],
    headers: &H,
) -> bool {
    conditions.iter().all(|c| c.holds(headers))
}

/// A path condition of a route match.
#[derive(Clone, Debug)]
pub(crate) enum PathCondition {
    Any,
    Exact(String),
    /// A prefix ending in `/` matches as a string prefix; otherwise it
    /// matches whole segments (`/api` matches `/api` and `/api/x`, not `/apix`).
    Prefix(String),
    /// Segments: `None` is a variable or `*`; the path has the same number of
    /// segments.
    Template(Vec<Option<String>>),
}

impl PathCondition {
    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            PathCondition::Any => true,
            PathCondition::Exact(exact) => path == exact,
            PathCondition::Prefix(prefix) => {
                path.starts_with(prefix.as_str())
                    && (prefix.ends_with('/')
                        || path.len() == prefix.len()
                        || path.as_bytes()[prefix.len()] == b'/')
            }
            PathCondition::Template(segments) => {
                let Some(rest) = path.strip_prefix('/') else {
                    return false;
                };
                let mut parts = rest.split('/');
                for segment in segments {
                    match (parts.next(), segment) {
                        (None, _) => return false,
                        (Some(part), Some(literal)) if part != literal => return false,
                        (Some(""), None) => return false,
                        _ => {}
                    }
                }
                parts.next().is_none()
            }
        }
    }

    /// Precedence within a host: exact, then templates with more literal
    /// segments, then longer prefixes, then anything. Lower sorts first.
    fn rank(&self) -> (u8, usize) {
        match self {
            PathCondition::Exact(_) => (0, 0),
            PathCondition::Template(segments) => (
                1,
                usize::MAX - segments.iter().filter(|s| s.is_some()).count(),
            ),
            PathCondition::Prefix(prefix) => (2, usize::MAX - prefix.len()),
            PathCondition::Any => (3, 0),
        }
    }
}

/// One way a request can match a route.
#[derive(Clone, Debug)]
pub(crate) struct MatchEntry {
    pub(crate) path: PathCondition,
    pub(crate) methods: Methods,
    pub(crate) headers: Vec<HeaderCondition>,
    pub(crate) route: RouteId,
}

impl MatchEntry {
    fn matches<H: HeaderSource + ?Sized>(&self, method: &Method, path: &str, headers: &H) -> bool {
        self.path.matches(path)
            && (self.methods.is_empty() || self.methods.contains(method))
            && all_hold(&self.headers, headers)
    }
}

/// Route matches grouped by host.
#[derive(Clone, Debug, Default)]
pub(crate) struct Hosts {
    exact: HashMap<String, Vec<MatchEntry>>,
    /// (suffix including the dot, entries), longest suffix first.
    wildcard: Vec<(String, Vec<MatchEntry>)>,
    any: Vec<MatchEntry>,
}

impl Hosts {
    pub(crate) fn add(&mut self, hosts: &[String], entry: MatchEntry) {
        if hosts.is_empty() {
            self.any.push(entry);
            return;
        }
        for host in hosts {
            let host = host.to_ascii_lowercase();
            match host.strip_prefix('*') {
                Some(suffix) => match self.wildcard.iter_mut().find(|(s, _)| s == suffix) {
                    Some((_, entries)) => entries.push(entry.clone()),
                    None => self.wildcard.push((suffix.to_owned(), vec![entry.clone()])),
                },
                None => self.exact.entry(host).or_default().push(entry.clone()),
            }
        }
    }

    /// Sorts every group by precedence (route order breaks ties).
    pub(crate) fn finish(&mut self) {
        let sort = |entries: &mut Vec<MatchEntry>| {
            entries.sort_by_key(|e| (e.path.rank(), e.route));
        };
        self.exact.values_mut().for_each(sort);
        self.wildcard.iter_mut().for_each(|(_, e)| sort(e));
        sort(&mut self.any);
        self.wildcard
            .sort_by_key(|(suffix, _)| usize::MAX - suffix.len());
    }

    /// The route for a request: the most specific host group that has a
    /// matching entry wins (exact host, then the longest wildcard, then
    /// routes for any host).
    pub(crate) fn find<H: HeaderSource + ?Sized>(
        &self,
        host: Option<&str>,
        method: &Method,
        path: &str,
        headers: &H,
    ) -> Option<RouteId> {
        let first = |entries: &[MatchEntry]| {
            entries
                .iter()
                .find(|e| e.matches(method, path, headers))
                .map(|e| e.route)
        };
        if let Some(host) = host {
            let lowered;
            let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                lowered = host.to_ascii_lowercase();
                lowered.as_str()
            } else {
                host
            };
            if let Some(found) = self.exact.get(host).and_then(|e| first(e)) {
                return Some(found);
            }
            for (suffix, entries) in &self.wildcard {
                if host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && let Some(found) = first(entries)
                {
                    return Some(found);
                }
            }
        }
        first(&self.any)
    }
}

/// The host of a `Host` header or authority, without the port.
pub fn host_without_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments_unless_they_end_in_a_slash() {
        let p = PathCondition::Prefix("/api".into());
        assert!(p.matches("/api") && p.matches("/api/x") && !p.matches("/apix"));
        let p = PathCondition::Prefix("/api/".into());
        assert!(p.matches("/api/x") && !p.matches("/api"));
    }

    #[test]
    fn templates_match_every_segment() {
        let t = PathCondition::Template(vec![Some("users".into()), None, Some("accounts".into())]);
        assert!(t.matches("/users/42/accounts"));
        assert!(!t.matches("/users/42/accounts/1"));
        assert!(!t.matches("/users//accounts"));
        assert!(!t.matches("/users/42"));
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(host_without_port("bank.example:8080"), "bank.example");
        assert_eq!(host_without_port("bank.example"), "bank.example");
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }

    #[test]
    fn method_sets() {
        let m = Methods::parse(&["GET".into(), "PURGE".into()]).expect("valid");
        assert!(m.contains(&Method::GET));
        assert!(!m.contains(&Method::POST));
        assert!(m.contains(&Method::from_bytes(b"PURGE").expect("method")));
    }
}
