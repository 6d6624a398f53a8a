//! The control plane as a list of replica URLs: every client (nodes, the
//! SDK, agents, the CLI) takes a comma-separated list (`--control`,
//! `ATOLL_CONTROL`) and moves to the next replica when the one it uses
//! fails or does not lead.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The control-plane replicas a client may use, and which one it uses now.
/// Cheap to clone; clones share the position.
#[derive(Clone, Debug)]
pub struct ControlUrls {
    urls: Arc<[String]>,
    current: Arc<AtomicUsize>,
}

impl ControlUrls {
    /// Parses `http://a:7400,http://b:7400`; each URL trimmed, trailing
    /// `/` removed. Clients of one list start at different replicas (by
    /// process id), so that a fleet's load spreads.
    pub fn parse(text: &str) -> Result<Self, String> {
        let urls = Self::parse_in_order(text)?;
        urls.current.store(
            std::process::id() as usize % urls.urls.len(),
            Ordering::Relaxed,
        );
        Ok(urls)
    }

    /// Parses a list as [`parse`](Self::parse) does, starting at the first
    /// replica (a person's command asks the one they named first).
    pub fn parse_in_order(text: &str) -> Result<Self, String> {
        let urls: Vec<String> = text
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err("no control-plane URL given; pass e.g. http://127.0.0.1:7400 (several, comma-separated, for replicas)".into());
        }
        for url in &urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "control-plane URL `{url}` must start with http:// or https://"
                ));
            }
        }
        Ok(Self {
            urls: urls.into(),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The replica to use now.
    pub fn current(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    /// `url` failed (or does not lead): the next one is used from now on,
    /// unless another caller moved on already.
    pub fn failed(&self, url: &str) {
        let now = self.current.load(Ordering::Relaxed);
        if self.urls[now % self.urls.len()] == url {
            let _ = self.current.compare_exchange(
                now,
                (now + 1) % self.urls.len(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// `url` answered: it is used from now on (nothing changes if it is
    /// not in the list).
    pub fn prefer(&self, url: &str) {
        if let Some(index) = self.urls.iter().position(|u| u == url) {
            self.current.store(index, Ordering::Relaxed);
        }
    }

    /// Every URL, in the order given.
    pub fn all(&self) -> &[String] {
        &self.urls
    }

    /// The list as given (comma-separated), for a child's environment.
    pub fn joined(&self) -> String {
        self.urls.join(",")
    }
}

impl std::fmt::Display for ControlUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.joined())
    }
}

#[cfg(test)]
mod tests {
    use super::ControlUrls;

    #[test]
    fn a_list_moves_on_past_a_failed_replica_and_wraps() {
        let urls = ControlUrls::parse(" http://a:1/ ,http://b:2,,http://c:3").expect("valid");
        assert_eq!(urls.all(), ["http://a:1", "http://b:2", "http://c:3"]);
        let first = urls.current().to_owned();
        urls.failed(&first);
        let second = urls.current().to_owned();
        assert_ne!(first, second);
        // A stale failure (of a URL no longer current) moves nothing.
        urls.failed(&first);
        assert_eq!(urls.current(), second);
        urls.failed(&second);
        urls.failed(urls.current().to_owned().as_str());
        assert_eq!(urls.current(), first, "wraps around");
        assert!(ControlUrls::parse(" , ").is_err());
        let error = ControlUrls::parse("127.0.0.1:7400").expect_err("no scheme");
        assert!(error.contains("http://"), "{error}");
    }
}
