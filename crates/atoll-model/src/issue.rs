//! Problems found in manifests, each saying what, where, and why.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One problem with a manifest or a set of resources.
///
/// Displayed as `file:line:column: Kind/name field: reason`, the way compilers
/// print errors, so editors can jump to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Issue {
    /// The file (or other source) the resource came from; `stored` for a
    /// resource already in the store that the change would break.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// 1-based line in `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// 1-based column in `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
    /// `Kind/name` of the resource, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Field path inside the resource, e.g. `spec.assignments[1].shards`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong and, where it helps, what to do.
    pub reason: String,
}

impl Issue {
    /// An issue with only a reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            source: None,
            line: None,
            column: None,
            resource: None,
            field: None,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut wrote = false;
        if let Some(source) = &self.source {
            f.write_str(source)?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
                if let Some(column) = self.column {
                    write!(f, ":{column}")?;
                }
            }
            f.write_str(": ")?;
        }
        if let Some(resource) = &self.resource {
            f.write_str(resource)?;
            wrote = true;
        }
        if let Some(field) = &self.field {
            if wrote {
                f.write_str(" ")?;
            }
            f.write_str(field)?;
            wrote = true;
        }
        if wrote {
            f.write_str(": ")?;
        }
        f.write_str(&self.reason)
    }
}

/// A list of issues that is never empty, returned when something is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Issues(pub Vec<Issue>);

impl fmt::Display for Issues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

/// A position in a source text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub column: u32,
}

/// Where each field path of a parsed YAML document starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpanIndex {
    positions: HashMap<String, Position>,
}

impl SpanIndex {
    pub(crate) fn insert(&mut self, path: String, position: Position) {
        self.positions.entry(path).or_insert(position);
    }

    /// The position of `path`, or of its nearest ancestor that has one.
    pub fn locate(&self, path: &str) -> Option<Position> {
        let mut path = path;
        loop {
            if let Some(position) = self.positions.get(path) {
                return Some(*position);
            }
            if path.is_empty() {
                return None;
            }
            path = parent_path(path);
        }
    }
}

/// `spec.a[1].b` → `spec.a[1]` → `spec.a` → `spec` → ``.
fn parent_path(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(i) => &path[..i],
        None => "",
    }
}

/// Where a resource being validated came from, to place its issues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A YAML document in a file (or a request body named like one).
    Manifest {
        /// The file name as the user gave it.
        source: Arc<str>,
        /// Positions of the document's fields.
        spans: Arc<SpanIndex>,
    },
    /// A resource already in the store, at the given revision.
    Stored {
        /// The revision that last changed it.
        revision: u64,
    },
    /// Built by the control plane (for example a rollback target).
    Generated {
        /// What built it, e.g. `rollback to revision 12`.
        what: Arc<str>,
    },
}

impl Origin {
    /// An issue at `field` of `resource` (`Kind/name`).
    pub fn issue(
        &self,
        resource: Option<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Issue {
        let field = field.into();
        let mut issue = Issue::new(reason);
        issue.resource = resource;
        match self {
            Origin::Manifest { source, spans } => {
                issue.source = Some(source.to_string());
                if let Some(position) = spans.locate(&field) {
                    issue.line = Some(position.line);
                    issue.column = Some(position.column);
                }
            }
            Origin::Stored { revision } => {
                issue.source = Some(format!("stored (revision {revision})"));
            }
            Origin::Generated { what } => issue.source = Some(what.to_string()),
        }
        if !field.is_empty() {
            issue.field = Some(field);
        }
        issue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_the_nearest_ancestor() {
        let mut spans = SpanIndex::default();
        spans.insert(String::new(), Position { line: 1, column: 1 });
        spans.insert("spec".into(), Position { line: 4, column: 1 });
        spans.insert(
            "spec.assignments[1]".into(),
            Position { line: 7, column: 5 },
        );
        assert_eq!(
            spans.locate("spec.assignments[1].shards").map(|p| p.line),
            Some(7)
        );
        assert_eq!(spans.locate("spec.rule").map(|p| p.line), Some(4));
        assert_eq!(spans.locate("metadata.name").map(|p| p.line), Some(1));
    }

    #[test]
    fn displays_like_a_compiler() {
        let mut issue = Issue::new("shard 3 is owned twice");
        issue.source = Some("a.yaml".into());
        issue.line = Some(7);
        issue.column = Some(5);
        issue.resource = Some("ShardMap/users".into());
        issue.field = Some("spec.assignments[1].shards".into());
        assert_eq!(
            issue.to_string(),
            "a.yaml:7:5: ShardMap/users spec.assignments[1].shards: shard 3 is owned twice"
        );
    }
}
