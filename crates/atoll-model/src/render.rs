//! Resources as YAML text, and line diffs between two versions of a resource.

use serde_json::Value;
use yaml_rust2::yaml::Hash;
use yaml_rust2::{Yaml, YamlEmitter};

use crate::resource::Resource;

/// Renders a JSON value as a YAML document (without the leading `---`).
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    let mut emitter = YamlEmitter::new(&mut out);
    emitter.multiline_strings(true);
    // Emitting into a String cannot fail.
    let _ = emitter.dump(&to_yaml_node(value));
    let body = out.strip_prefix("---").unwrap_or(&out);
    let body = body
        .strip_prefix('\n')
        .or_else(|| body.strip_prefix(' '))
        .unwrap_or(body);
    let mut text = body.to_owned();
    text.push('\n');
    text
}

fn to_yaml_node(value: &Value) -> Yaml {
    match value {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(items) => Yaml::Array(items.iter().map(to_yaml_node).collect()),
        Value::Object(map) => {
            let mut hash = Hash::new();
            for (k, v) in map {
                hash.insert(Yaml::String(k.clone()), to_yaml_node(v));
            }
            Yaml::Hash(hash)
        }
    }
}

/// A resource as YAML, without its resource version (for diffs).
pub fn resource_yaml(resource: &Resource) -> String {
    let value = serde_json::to_value(resource.without_version()).unwrap_or(Value::Null);
    to_yaml(&value)
}

/// A unified diff from `old` to `new` (either may be absent), labelled with
/// the resource key. Empty when they render the same.
pub fn diff(label: &str, old: Option<&Resource>, new: Option<&Resource>) -> String {
    let old_text = old.map(resource_yaml).unwrap_or_default();
    let new_text = new.map(resource_yaml).unwrap_or_default();
    if old_text == new_text {
        return String::new();
    }
    similar::TextDiff::from_lines(&old_text, &new_text)
        .unified_diff()
        .context_radius(3)
        .header(
            &if old.is_some() {
                format!("{label} (stored)")
            } else {
                "/dev/null".to_owned()
            },
            &if new.is_some() {
                format!("{label} (new)")
            } else {
                "/dev/null".to_owned()
            },
        )
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::decode_resource;
    use serde_json::json;

    #[test]
    fn yaml_quotes_what_would_change_type() {
        let text = to_yaml(&json!({"a": "7", "b": 7, "c": "true", "d": "0-49", "e": [1, "x"]}));
        assert_eq!(
            text,
            "a: \"7\"\nb: 7\nc: \"true\"\nd: 0-49\ne:\n  - 1\n  - x\n"
        );
    }

    #[test]
    fn diffs_show_changed_lines() {
        let old = decode_resource(json!({"apiVersion": "atoll/v1", "kind": "Zone", "metadata": {"name": "z"}, "spec": {"region": "hz"}})).expect("valid");
        let new = decode_resource(json!({"apiVersion": "atoll/v1", "kind": "Zone", "metadata": {"name": "z"}, "spec": {"region": "sh"}})).expect("valid");
        let text = diff("Zone/z", Some(&old), Some(&new));
        assert!(text.contains("-  region: hz\n+  region: sh\n"), "{text}");
        assert_eq!(diff("Zone/z", Some(&old), Some(&old)), "");
        assert!(diff("Zone/z", None, Some(&new)).contains("+++ Zone/z (new)"));
    }
}
