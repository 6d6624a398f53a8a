//! Reading manifests: multi-document YAML into resources, keeping the position
//! of every field so later errors can name the line.
//!
//! Scalars follow YAML 1.2's core schema: `yes`/`no`/`on`/`off` are strings,
//! not booleans; quoted scalars are always strings.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Number, Value};
use yaml_rust2::Yaml;
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::codec::decode_resource;
use crate::issue::{Issue, Issues, Origin, Position, SpanIndex};
use crate::resource::{Kind, Resource, ResourceKey};

/// The most values (scalars, lists, mappings; aliases counted expanded) one
/// read of manifests may build, over all its files: what bounds the memory
/// one request can make the control plane spend.
pub const MAX_NODES: usize = 200_000;

/// The most values aliases may add, over all files of one read: an alias
/// copies what its anchor holds, so a few hundred bytes of nested aliases
/// would otherwise stand for millions of values ("billion laughs").
pub const MAX_ALIAS_NODES: usize = 10_000;

/// The deepest a value may nest (lists and mappings inside each other).
pub const MAX_DEPTH: usize = 64;

/// What one read of manifests may still build; shared by the files of one
/// request (see [`load_all_within`]).
#[derive(Clone, Debug)]
pub struct ParseBudget {
    values: usize,
    alias_values: usize,
}

impl Default for ParseBudget {
    fn default() -> Self {
        Self {
            values: MAX_NODES,
            alias_values: MAX_ALIAS_NODES,
        }
    }
}

impl ParseBudget {
    /// Whether a limit was reached (the rest of the read is refused).
    pub fn exhausted(&self) -> bool {
        self.values == 0 || self.alias_values == 0
    }
}

/// One YAML document of a manifest file, as a JSON value with field positions.
#[derive(Clone, Debug)]
pub struct Document {
    /// The file name as the user gave it.
    pub source: Arc<str>,
    /// 0-based index of the document in its file.
    pub index: usize,
    /// The document's content.
    pub value: Value,
    /// Where each field starts.
    pub spans: Arc<SpanIndex>,
}

impl Document {
    /// The origin to place issues of this document.
    pub fn origin(&self) -> Origin {
        Origin::Manifest {
            source: self.source.clone(),
            spans: self.spans.clone(),
        }
    }
}

/// A resource together with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Located {
    /// The resource.
    pub resource: Resource,
    /// Where it came from.
    pub origin: Origin,
}

/// What reading one file gave: the resources that decoded, the problems, and
/// the keys of documents that named a kind and name but did not decode.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Resources that decoded.
    pub resources: Vec<Located>,
    /// Every problem found.
    pub issues: Vec<Issue>,
    /// Kind and name of documents that failed to decode, so that validating
    /// the others does not also call them missing.
    pub pending: Vec<ResourceKey>,
    /// Whether the YAML itself was broken (then nothing of the file is known).
    pub syntax_error: bool,
}

/// Parses and decodes every document of `text`, read from `source`, keeping
/// what decoded next to what did not.
pub fn load_all(source: &str, text: &str) -> Loaded {
    load_all_within(source, text, &mut ParseBudget::default())
}

/// [`load_all`], spending from `budget`, which the files of one request
/// share.
pub fn load_all_within(source: &str, text: &str, budget: &mut ParseBudget) -> Loaded {
    let documents = match parse_within(source, text, budget) {
        Ok(documents) => documents,
        Err(issues) => {
            return Loaded {
                issues: issues.0,
                syntax_error: true,
                ..Loaded::default()
            };
        }
    };
    let mut loaded = Loaded::default();
    for document in documents {
        match decode_document(&document) {
            Ok(resource) => loaded.resources.push(Located {
                resource,
                origin: document.origin(),
            }),
            Err(mut found) => {
                loaded.issues.append(&mut found);
                let kind = document
                    .value
                    .get("kind")
                    .and_then(Value::as_str)
                    .and_then(|k| Kind::ALL.into_iter().find(|kind| kind.as_str() == k));
                let name = document
                    .value
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .and_then(Value::as_str);
                if let (Some(kind), Some(name)) = (kind, name) {
                    loaded.pending.push(ResourceKey::new(kind, name));
                }
            }
        }
    }
    loaded
}

/// Parses and decodes every document of `text`, read from `source`.
///
/// Empty documents (only comments, or a trailing `---`) are skipped. All
/// problems of all documents are returned together.
pub fn load(source: &str, text: &str) -> Result<Vec<Located>, Issues> {
    let loaded = load_all(source, text);
    if loaded.issues.is_empty() {
        Ok(loaded.resources)
    } else {
        Err(Issues(loaded.issues))
    }
}

/// Decodes one parsed document into a resource.
pub fn decode_document(document: &Document) -> Result<Resource, Vec<Issue>> {
    let origin = document.origin();
    let label = describe(&document.value, document.index);
    decode_resource(document.value.clone()).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| origin.issue(Some(label.clone()), e.path, e.message))
            .collect()
    })
}

/// `Kind/name` when the document says so, else `document N`.
fn describe(value: &Value, index: usize) -> String {
    let kind = value.get("kind").and_then(Value::as_str);
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    match (kind, name) {
        (Some(kind), Some(name)) => format!("{kind}/{name}"),
        (Some(kind), None) => format!("{kind} (document {})", index + 1),
        _ => format!("document {}", index + 1),
    }
}

/// Parses YAML text into documents without interpreting them.
pub fn parse_documents(source: &str, text: &str) -> Result<Vec<Document>, Issues> {
    parse_within(source, text, &mut ParseBudget::default())
}

fn parse_within(
    source: &str,
    text: &str,
    budget: &mut ParseBudget,
) -> Result<Vec<Document>, Issues> {
    let source: Arc<str> = Arc::from(source);
    let mut builder = Builder::new(source.clone(), budget.clone());
    let mut parser = Parser::new_from_str(text);
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => break,
            Ok((event, marker)) => builder.on_event(event, marker),
            Err(error) => {
                let marker = error.marker();
                builder.issues.push(Issue {
                    source: Some(source.to_string()),
                    line: u32::try_from(marker.line()).ok(),
                    column: u32::try_from(marker.col() + 1).ok(),
                    resource: None,
                    field: None,
                    reason: format!("YAML syntax error: {}", error.info()),
                });
                break;
            }
        }
    }
    *budget = builder.budget.clone();
    if builder.issues.is_empty() {
        Ok(builder.documents)
    } else {
        Err(Issues(builder.issues))
    }
}

enum Frame {
    Sequence {
        items: Vec<Value>,
        path: String,
        anchor: usize,
        /// Nodes spent before this collection started.
        start: usize,
    },
    Mapping {
        entries: Map<String, Value>,
        path: String,
        anchor: usize,
        start: usize,
        /// The key read last, waiting for its value.
        key: Option<String>,
    },
}

struct Builder {
    source: Arc<str>,
    documents: Vec<Document>,
    issues: Vec<Issue>,
    stack: Vec<Frame>,
    spans: SpanIndex,
    /// Anchored values and their size in nodes.
    anchors: HashMap<usize, (Value, usize)>,
    /// Nodes produced so far in this file, aliases counted expanded.
    nodes: usize,
    /// What the read may still build.
    budget: ParseBudget,
    /// Set once the budget is exceeded; the rest of the file is skipped.
    over_budget: bool,
    root: Option<Value>,
    index: usize,
    start: Position,
}

impl Builder {
    fn new(source: Arc<str>, budget: ParseBudget) -> Self {
        Self {
            source,
            documents: Vec::new(),
            issues: Vec::new(),
            stack: Vec::new(),
            spans: SpanIndex::default(),
            anchors: HashMap::new(),
            nodes: 0,
            budget,
            over_budget: false,
            root: None,
            index: 0,
            start: Position { line: 1, column: 1 },
        }
    }

    fn position(marker: Marker) -> Position {
        Position {
            line: u32::try_from(marker.line()).unwrap_or(u32::MAX),
            column: u32::try_from(marker.col() + 1).unwrap_or(u32::MAX),
        }
    }

    fn issue(&mut self, marker: Marker, reason: String) {
        let position = Self::position(marker);
        self.issues.push(Issue {
            source: Some(self.source.to_string()),
            line: Some(position.line),
            column: Some(position.column),
            resource: None,
            field: None,
            reason,
        });
    }

    /// Counts `nodes` more nodes against the read's budget (`alias`: they
    /// are an alias's copy), before they are built, so that no input makes
    /// the reader build more than the budget allows.
    fn spend(&mut self, nodes: usize, alias: bool, marker: Marker) -> bool {
        if alias && nodes > self.budget.alias_values {
            self.over_budget = true;
            self.budget.alias_values = 0;
            self.issue(
                marker,
                format!("aliases here expand to more than {MAX_ALIAS_NODES} values (the limit for one apply); write the values out or use fewer aliases"),
            );
            return false;
        }
        if nodes > self.budget.values {
            self.over_budget = true;
            self.budget.values = 0;
            self.issue(
                marker,
                format!("the manifests hold more than {MAX_NODES} values (the limit for one apply, aliases counted expanded); apply them in parts"),
            );
            return false;
        }
        if alias {
            self.budget.alias_values -= nodes;
        }
        self.budget.values -= nodes;
        self.nodes = self.nodes.saturating_add(nodes);
        true
    }

    /// Refuses a collection nested deeper than [`MAX_DEPTH`].
    fn too_deep(&mut self, marker: Marker) -> bool {
        if self.stack.len() < MAX_DEPTH {
            return false;
        }
        self.over_budget = true;
        self.issue(
            marker,
            format!("values nest more than {MAX_DEPTH} levels deep here; no manifest needs that"),
        );
        true
    }

    fn on_event(&mut self, event: Event, marker: Marker) {
        if self.over_budget {
            return;
        }
        match event {
            Event::DocumentStart => {
                self.spans = SpanIndex::default();
                self.anchors.clear();
                self.root = None;
                self.start = Self::position(marker);
            }
            Event::DocumentEnd => self.finish_document(),
            Event::Scalar(text, style, anchor, tag) => {
                if self.expecting_key() {
                    self.on_key(text, marker);
                    return;
                }
                if !self.spend(1, false, marker) {
                    return;
                }
                let value = resolve_scalar(&text, style, tag.as_ref());
                self.on_value_start(marker);
                if anchor > 0 {
                    self.anchors.insert(anchor, (value.clone(), 1));
                }
                self.on_value(value);
            }
            Event::Alias(anchor) => {
                if self.expecting_key() {
                    self.issue(marker, "an alias cannot be a mapping key".into());
                    self.skip_value();
                    return;
                }
                // The size first: nothing is copied past the budget.
                let size = self.anchors.get(&anchor).map_or(1, |(_, size)| *size);
                if !self.spend(size, true, marker) {
                    return;
                }
                let value = self
                    .anchors
                    .get(&anchor)
                    .map_or(Value::Null, |(value, _)| value.clone());
                self.on_value_start(marker);
                self.on_value(value);
            }
            Event::SequenceStart(anchor, _) => {
                if self.expecting_key() {
                    self.issue(marker, "mapping keys must be plain words, not lists".into());
                }
                if self.too_deep(marker) || !self.spend(1, false, marker) {
                    return;
                }
                let start = self.nodes - 1;
                let path = self.on_value_start(marker);
                self.stack.push(Frame::Sequence {
                    items: Vec::new(),
                    path,
                    anchor,
                    start,
                });
            }
            Event::MappingStart(anchor, _) => {
                if self.expecting_key() {
                    self.issue(
                        marker,
                        "mapping keys must be plain words, not mappings".into(),
                    );
                }
                if self.too_deep(marker) || !self.spend(1, false, marker) {
                    return;
                }
                let start = self.nodes - 1;
                let path = self.on_value_start(marker);
                self.stack.push(Frame::Mapping {
                    entries: Map::new(),
                    path,
                    anchor,
                    start,
                    key: None,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, anchor, start) = match self.stack.pop() {
                    Some(Frame::Sequence {
                        items,
                        anchor,
                        start,
                        ..
                    }) => (Value::Array(items), anchor, start),
                    Some(Frame::Mapping {
                        entries,
                        anchor,
                        start,
                        ..
                    }) => (Value::Object(entries), anchor, start),
                    None => return,
                };
                if anchor > 0 {
                    self.anchors
                        .insert(anchor, (value.clone(), self.nodes - start));
                }
                self.on_value(value);
            }
            Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
    }

    fn expecting_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Mapping { key: None, .. }))
    }

    fn on_key(&mut self, key: String, marker: Marker) {
        let position = Self::position(marker);
        let mut duplicate = None;
        if let Some(Frame::Mapping {
            entries,
            path,
            key: pending,
            ..
        }) = self.stack.last_mut()
        {
            if entries.contains_key(&key) {
                duplicate = Some(format!("duplicate key `{key}`: each key may appear once"));
            }
            self.spans.insert(join(path, &key), position);
            *pending = Some(key);
        }
        if let Some(reason) = duplicate {
            self.issue(marker, reason);
        }
    }

    /// Records where the value about to start is, and returns its path.
    fn on_value_start(&mut self, marker: Marker) -> String {
        let position = Self::position(marker);
        match self.stack.last() {
            None => {
                self.spans.insert(String::new(), position);
                String::new()
            }
            Some(Frame::Sequence { items, path, .. }) => {
                let path = format!("{path}[{}]", items.len());
                self.spans.insert(path.clone(), position);
                path
            }
            Some(Frame::Mapping { path, key, .. }) => join(path, key.as_deref().unwrap_or("")),
        }
    }

    fn on_value(&mut self, value: Value) {
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame::Sequence { items, .. }) => items.push(value),
            Some(Frame::Mapping { entries, key, .. }) => {
                if let Some(key) = key.take() {
                    entries.insert(key, value);
                }
            }
        }
    }

    /// After a refused key, drop the value that follows it.
    fn skip_value(&mut self) {
        if let Some(Frame::Mapping { key, .. }) = self.stack.last_mut() {
            *key = Some(String::from("\u{0}invalid"));
        }
    }

    fn finish_document(&mut self) {
        let index = self.index;
        self.index += 1;
        let value = match self.root.take() {
            None | Some(Value::Null) => return,
            Some(value) => value,
        };
        if !value.is_object() {
            self.issues.push(Issue {
                source: Some(self.source.to_string()),
                line: Some(self.start.line),
                column: Some(self.start.column),
                resource: Some(format!("document {}", index + 1)),
                field: None,
                reason: "a manifest must be a mapping with apiVersion, kind, metadata and spec"
                    .into(),
            });
            return;
        }
        self.documents.push(Document {
            source: self.source.clone(),
            index,
            value,
            spans: Arc::new(std::mem::take(&mut self.spans)),
        });
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn resolve_scalar(text: &str, style: TScalarStyle, tag: Option<&Tag>) -> Value {
    if let Some(tag) = tag
        && tag.handle == "tag:yaml.org,2002:"
        && tag.suffix == "str"
    {
        return Value::String(text.to_owned());
    }
    if style != TScalarStyle::Plain {
        return Value::String(text.to_owned());
    }
    match Yaml::from_str(text) {
        Yaml::Integer(i) => Value::Number(Number::from(i)),
        Yaml::Real(real) => real
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map_or_else(|| Value::String(text.to_owned()), Value::Number),
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Null => Value::Null,
        _ => Value::String(text.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_positions_of_nested_fields() {
        let text =
            "apiVersion: atoll/v1\nkind: Zone\nmetadata:\n  name: hz-a\nspec:\n  region: hz\n";
        let docs = parse_documents("z.yaml", text).expect("valid yaml");
        assert_eq!(docs.len(), 1);
        let spans = &docs[0].spans;
        assert_eq!(
            spans.locate("spec.region"),
            Some(Position { line: 6, column: 3 })
        );
        assert_eq!(spans.locate("metadata.name").map(|p| p.line), Some(4));
    }

    #[test]
    fn positions_of_list_items() {
        let text = "a:\n  - x: 1\n  - x: 2\n    y: 3\n";
        let docs = parse_documents("l.yaml", text).expect("valid yaml");
        assert_eq!(docs[0].spans.locate("a[1].y").map(|p| p.line), Some(4));
        assert_eq!(docs[0].spans.locate("a[1]").map(|p| p.line), Some(3));
    }

    #[test]
    fn splits_documents_and_skips_empty_ones() {
        let text = "---\na: 1\n---\n# only a comment\n---\nb: 2\n---\n";
        let docs = parse_documents("m.yaml", text).expect("valid yaml");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].index, 2);
        assert_eq!(docs[1].value["b"], 2);
    }

    #[test]
    fn yaml_1_2_scalars() {
        let text = "a: yes\nb: true\nc: '7'\nd: 7\ne: ~\nf: 1.5\ng: 007\n";
        let docs = parse_documents("s.yaml", text).expect("valid yaml");
        let v = &docs[0].value;
        assert_eq!(v["a"], "yes");
        assert_eq!(v["b"], true);
        assert_eq!(v["c"], "7");
        assert_eq!(v["d"], 7);
        assert!(v["e"].is_null());
        assert_eq!(v["f"], 1.5);
    }

    #[test]
    fn alias_bombs_are_refused_quickly() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..10 {
            let previous = level - 1;
            let items = vec![format!("*a{previous}"); 10].join(", ");
            text += &format!("a{level}: &a{level} [{items}]\n");
        }
        assert!(text.len() < 700, "a bomb of {} bytes", text.len());
        let started = std::time::Instant::now();
        let mut budget = ParseBudget::default();
        let err = parse_within("bomb.yaml", &text, &mut budget).expect_err("refused");
        assert!(
            err.0[0]
                .reason
                .contains("aliases here expand to more than 10000 values"),
            "{err}"
        );
        assert!(budget.exhausted());
        // Refused before it built more than the alias budget allows.
        assert!(MAX_NODES - budget.values <= MAX_ALIAS_NODES + 1_000);
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
    }

    #[test]
    fn the_files_of_one_read_share_the_budget() {
        // 8,000 aliased values per file: each file alone is fine, two are
        // over the read's alias budget.
        let mut text = String::from(
            "a: &a [x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x]
b: [",
        );
        text += &vec!["*a"; 400].join(", ");
        text += "]\n";
        let mut budget = ParseBudget::default();
        assert!(parse_within("one.yaml", &text, &mut budget).is_ok());
        let err = parse_within("two.yaml", &text, &mut budget).expect_err("over the budget");
        assert_eq!(err.0[0].source.as_deref(), Some("two.yaml"));
        let mut fresh = ParseBudget::default();
        assert!(parse_within("two.yaml", &text, &mut fresh).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = format!("a: {}x{}\n", "[".repeat(100), "]".repeat(100));
        let err = parse_documents("deep.yaml", &text).expect_err("refused");
        assert!(
            err.0
                .iter()
                .any(|i| i.reason.contains("nest more than 64 levels")),
            "{err}"
        );
        // Deeper still, the YAML parser's own limit refuses it.
        let text = format!("a: {}x{}\n", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse_documents("deeper.yaml", &text).is_err());
        let ok = format!("a: {}x{}\n", "[".repeat(60), "]".repeat(60));
        assert!(parse_documents("ok.yaml", &ok).is_ok());
    }

    #[test]
    fn anchors_and_aliases_copy_values() {
        let text = "a: &x {k: 1}\nb: *x\n";
        let docs = parse_documents("a.yaml", text).expect("valid yaml");
        assert_eq!(docs[0].value["b"]["k"], 1);
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = parse_documents("bad.yaml", "a: 1\nb: [1,\nc: 2\n").expect_err("invalid");
        let issue = &err.0[0];
        assert_eq!(issue.source.as_deref(), Some("bad.yaml"));
        assert!(issue.line.is_some());
        assert!(issue.reason.starts_with("YAML syntax error"), "{issue}");
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse_documents("d.yaml", "a: 1\nb: 2\na: 3\n").expect_err("duplicate");
        assert_eq!(err.0[0].line, Some(3));
        assert!(err.0[0].reason.contains("duplicate key `a`"));
    }

    #[test]
    fn non_mapping_documents_are_errors() {
        let err = parse_documents("n.yaml", "- a\n- b\n").expect_err("not a mapping");
        assert!(err.0[0].reason.contains("must be a mapping"));
    }
}
