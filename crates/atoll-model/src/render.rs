//! Resources as YAML text, and line diffs between two versions of a resource.

use serde_json::Value;
use yaml_rust2::Yaml;

use crate::resource::Resource;

/// Renders a JSON value as a YAML document (without the leading `---`),
/// block style, two-space indents, lists indented under their key. Every
/// string that YAML would read back as something else (`"7"`, `"true"`,
/// `"0o17"`, `"null"`) is quoted, so the output applies again unchanged.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => emit_map(&mut out, map, 0, false),
        Value::Array(items) if !items.is_empty() => emit_seq(&mut out, items, 0),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

fn indent(out: &mut String, width: usize) {
    out.extend(std::iter::repeat_n(' ', width));
}

/// Writes a mapping at `width`; with `inline`, the first entry continues the
/// current line (after `- `).
fn emit_map(out: &mut String, map: &serde_json::Map<String, Value>, width: usize, inline: bool) {
    for (i, (key, value)) in map.iter().enumerate() {
        if !(inline && i == 0) {
            indent(out, width);
        }
        out.push_str(&string(key));
        out.push(':');
        match value {
            Value::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                emit_map(out, inner, width + 2, false);
            }
            Value::Array(items) if !items.is_empty() => {
                out.push('\n');
                emit_seq(out, items, width + 2);
            }
            other => {
                out.push(' ');
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
    }
}

fn emit_seq(out: &mut String, items: &[Value], width: usize) {
    for item in items {
        indent(out, width);
        out.push_str("- ");
        match item {
            Value::Object(inner) if !inner.is_empty() => emit_map(out, inner, width + 2, true),
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                emit_seq(out, inner, width + 2);
            }
            other => {
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A string, plain when YAML reads it back as the same string, else quoted.
fn string(text: &str) -> String {
    let plain = !text.is_empty()
        && !text.starts_with(|c: char| c.is_whitespace() || "-?:,[]{}#&*!|>'\"%@`".contains(c))
        && !text.ends_with(char::is_whitespace)
        && !text.contains(": ")
        && !text.contains(" #")
        && !text.ends_with(':')
        && !text.chars().any(|c| c.is_control())
        && matches!(Yaml::from_str(text), Yaml::String(_));
    if plain {
        text.to_owned()
    } else {
        // A JSON string is a valid YAML double-quoted scalar.
        serde_json::to_string(text).unwrap_or_else(|_| format!("{text:?}"))
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
    fn strings_that_look_like_other_types_are_quoted() {
        for text in [
            "0o17", "0x1f", "1e3", ".inf", "null", "~", "false", "-5", "", " a", "a: b", "#x",
        ] {
            let yaml = to_yaml(&json!({ "k": text }));
            let back = crate::parse_documents("t", &yaml).expect("parses");
            assert_eq!(back[0].value["k"], text, "{yaml}");
        }
    }

    proptest::proptest! {
        #[test]
        fn yaml_round_trips(
            keys in proptest::collection::vec("[a-zA-Z0-9 _./:#-]{1,8}", 1..5),
            strings in proptest::collection::vec("\\PC{0,12}", 1..5),
            numbers in proptest::collection::vec(proptest::prelude::any::<i64>(), 1..3),
        ) {
            let mut map = serde_json::Map::new();
            for (i, key) in keys.iter().enumerate() {
                let value = match i % 4 {
                    0 => json!(strings[i % strings.len()]),
                    1 => json!(numbers[i % numbers.len()]),
                    2 => json!([strings[0], {"x": numbers[0], "y": [true, null]}]),
                    _ => json!({"nested": {"s": strings[strings.len() - 1]}, "empty": {}, "list": []}),
                };
                map.insert(key.clone(), value);
            }
            let value = Value::Object(map);
            let yaml = to_yaml(&value);
            let back = crate::parse_documents("t", &yaml);
            proptest::prop_assert!(back.is_ok(), "{}\n{:?}", yaml, back.err());
            let back = back.unwrap_or_default();
            proptest::prop_assert_eq!(&back[0].value, &value, "{}", yaml);
        }
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
