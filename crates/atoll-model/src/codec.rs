//! Resources to and from their JSON form (`apiVersion`, `kind`, `metadata`,
//! `spec`), with errors that carry the field path.

use serde::de::DeserializeOwned;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::resource::{API_VERSION, Kind, Metadata, RegionSpec, Resource, Spec, WorkspaceSpec};

/// A problem decoding one resource, at a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Field path, e.g. `spec.assignments[0].cell`; empty for the whole document.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

fn error(path: &str, message: impl Into<String>) -> DecodeError {
    DecodeError {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Decodes a resource from its JSON form, reporting every problem found at
/// the top level, in `metadata` and in `spec`.
pub fn decode_resource(value: Value) -> Result<Resource, Vec<DecodeError>> {
    let Value::Object(mut object) = value else {
        return Err(vec![error(
            "",
            "a manifest must be a mapping with apiVersion, kind, metadata and spec",
        )]);
    };
    let mut errors = Vec::new();

    match object.remove("apiVersion") {
        Some(Value::String(v)) if v == API_VERSION => {}
        Some(Value::String(v)) => errors.push(error(
            "apiVersion",
            format!("`{v}` is not supported; this release reads apiVersion {API_VERSION}"),
        )),
        Some(_) => errors.push(error(
            "apiVersion",
            format!("must be the string {API_VERSION}"),
        )),
        None => errors.push(error(
            "apiVersion",
            format!("missing; every manifest starts with `apiVersion: {API_VERSION}`"),
        )),
    }

    let kind = match object.remove("kind") {
        Some(Value::String(k)) => match Kind::ALL.into_iter().find(|kind| kind.as_str() == k) {
            Some(kind) => Some(kind),
            None => {
                let hint = Kind::parse(&k)
                    .map(|kind| format!(" (did you mean {kind}?)"))
                    .unwrap_or_default();
                errors.push(error(
                    "kind",
                    format!(
                        "unknown kind `{k}`{hint}; expected one of {}",
                        Kind::ALL.map(Kind::as_str).join(", ")
                    ),
                ));
                None
            }
        },
        Some(_) => {
            errors.push(error("kind", "must be a string such as Cell"));
            None
        }
        None => {
            errors.push(error(
                "kind",
                "missing; say which kind of resource this is, e.g. `kind: Cell`",
            ));
            None
        }
    };

    let metadata = match object.remove("metadata") {
        Some(value) => match typed::<Metadata>("metadata", value) {
            Ok(metadata) => Some(metadata),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        None => {
            errors.push(error(
                "metadata",
                "missing; every resource needs `metadata: {name: ...}`",
            ));
            None
        }
    };

    let spec_value = object.remove("spec");
    // `status` is what the control plane observes (a cell's health); it is
    // not intent, so input that carries it (a saved `atoll get -o yaml`)
    // applies as if it did not.
    object.remove("status");
    for key in object.keys() {
        errors.push(error(
            key,
            format!("unknown field `{key}`; a resource has apiVersion, kind, metadata and spec"),
        ));
    }

    let spec = kind.and_then(|kind| match decode_spec(kind, spec_value) {
        Ok(spec) => Some(spec),
        Err(e) => {
            errors.push(e);
            None
        }
    });

    match (metadata, spec) {
        (Some(metadata), Some(spec)) if errors.is_empty() => Ok(Resource { metadata, spec }),
        _ => Err(errors),
    }
}

fn decode_spec(kind: Kind, value: Option<Value>) -> Result<Spec, DecodeError> {
    let Some(value) = value else {
        return match kind {
            Kind::Region => Ok(Spec::Region(RegionSpec::default())),
            Kind::Workspace => Ok(Spec::Workspace(WorkspaceSpec::default())),
            _ => Err(error(
                "spec",
                format!("missing; a {kind} needs a spec (see docs/manifests.md#{kind})"),
            )),
        };
    };
    Ok(match kind {
        Kind::Workspace => Spec::Workspace(typed("spec", value)?),
        Kind::Region => Spec::Region(typed("spec", value)?),
        Kind::Zone => Spec::Zone(typed("spec", value)?),
        Kind::Cell => Spec::Cell(typed("spec", value)?),
        Kind::ShardRule => Spec::ShardRule(typed("spec", value)?),
        Kind::ShardMap => Spec::ShardMap(typed("spec", value)?),
        Kind::Service => Spec::Service(typed("spec", value)?),
        Kind::Route => Spec::Route(typed("spec", value)?),
        Kind::Gateway => Spec::Gateway(typed("spec", value)?),
        Kind::App => Spec::App(typed("spec", value)?),
        Kind::Endpoints => Spec::Endpoints(typed("spec", value)?),
        Kind::Switchover => Spec::Switchover(typed("spec", value)?),
    })
}

/// Deserializes `value` as `T`, turning serde's error into one with the full
/// field path below `prefix`.
fn typed<T: DeserializeOwned>(prefix: &str, value: Value) -> Result<T, DecodeError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let mut path = prefix.to_owned();
        for segment in e.path().iter() {
            use serde_path_to_error::Segment;
            match segment {
                Segment::Seq { index } => path.push_str(&format!("[{index}]")),
                Segment::Map { key } => {
                    path.push('.');
                    path.push_str(key);
                }
                Segment::Enum { variant } => {
                    path.push('.');
                    path.push_str(variant);
                }
                Segment::Unknown => {}
            }
        }
        let message = humanize(&e.into_inner().to_string());
        error(&path, message)
    })
}

/// Rewords serde's messages in the terms of a manifest.
fn humanize(message: &str) -> String {
    let message = message.replace("invalid type: ", "wrong type: ").replace(
        "data did not match any variant of untagged enum",
        "unexpected value for",
    );
    if message.starts_with("unknown field") {
        format!("{message}; check the spelling against docs/manifests.md")
    } else {
        message
    }
}

/// Encodes the spec of a resource as JSON.
fn spec_value(spec: &Spec) -> Result<Value, serde_json::Error> {
    match spec {
        Spec::Workspace(s) => serde_json::to_value(s),
        Spec::Region(s) => serde_json::to_value(s),
        Spec::Zone(s) => serde_json::to_value(s),
        Spec::Cell(s) => serde_json::to_value(s),
        Spec::ShardRule(s) => serde_json::to_value(s),
        Spec::ShardMap(s) => serde_json::to_value(s),
        Spec::Service(s) => serde_json::to_value(s),
        Spec::Route(s) => serde_json::to_value(s),
        Spec::Gateway(s) => serde_json::to_value(s),
        Spec::App(s) => serde_json::to_value(s),
        Spec::Endpoints(s) => serde_json::to_value(s),
        Spec::Switchover(s) => serde_json::to_value(s),
    }
}

impl Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let spec = spec_value(&self.spec).map_err(serde::ser::Error::custom)?;
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("apiVersion", API_VERSION)?;
        map.serialize_entry("kind", self.kind().as_str())?;
        map.serialize_entry("metadata", &self.metadata)?;
        map.serialize_entry("spec", &spec)?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        decode_resource(value).map_err(|errors| {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            serde::de::Error::custom(text.join("; "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn zone() -> Value {
        json!({"apiVersion": "atoll/v1", "kind": "Zone", "metadata": {"name": "hz-a"}, "spec": {"region": "hz"}})
    }

    #[test]
    fn round_trips() {
        let resource = decode_resource(zone()).expect("valid zone");
        assert_eq!(resource.key().to_string(), "Zone/hz-a");
        let back = serde_json::to_value(&resource).expect("serializes");
        assert_eq!(back, zone());
    }

    #[test]
    fn unknown_fields_are_errors_with_their_path() {
        let mut v = zone();
        v["spec"]["regoin"] = json!("hz");
        let errors = decode_resource(v).expect_err("unknown field");
        assert_eq!(errors[0].path, "spec.regoin");
        assert!(
            errors[0].message.contains("unknown field `regoin`"),
            "{:?}",
            errors
        );
    }

    #[test]
    fn reports_all_top_level_problems() {
        let errors = decode_resource(json!({"kind": "Zoen", "stauts": {}})).expect_err("bad");
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["apiVersion", "kind", "metadata", "stauts"]);
        assert!(errors[1].message.contains("unknown kind `Zoen`"));
    }

    #[test]
    fn an_observed_status_is_ignored() {
        let mut v = zone();
        v["status"] = json!({"health": "Healthy"});
        assert_eq!(
            decode_resource(v).expect("status is ignored"),
            decode_resource(zone()).expect("zone")
        );
    }

    #[test]
    fn suggests_the_kind_name() {
        let mut v = zone();
        v["kind"] = json!("zone");
        let errors = decode_resource(v).expect_err("lower-case kind");
        assert!(
            errors[0].message.contains("did you mean Zone?"),
            "{:?}",
            errors
        );
    }

    #[test]
    fn nested_errors_have_full_paths() {
        let v = json!({"apiVersion": "atoll/v1", "kind": "ShardMap", "metadata": {"name": "users"},
            "spec": {"rule": "users", "assignments": [{"shards": "0-9", "cell": "a"}, {"shards": "x", "cell": "b"}]}});
        let errors = decode_resource(v).expect_err("bad range");
        assert_eq!(errors[0].path, "spec.assignments[1].shards");
        assert!(
            errors[0].message.contains("not a shard range"),
            "{:?}",
            errors
        );
    }

    #[test]
    fn region_spec_is_optional() {
        let v = json!({"apiVersion": "atoll/v1", "kind": "Region", "metadata": {"name": "hz"}});
        assert!(decode_resource(v).is_ok());
    }
}
