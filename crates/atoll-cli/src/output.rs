//! Printing resources as tables, YAML or JSON.

use atoll_model::{
    KeySource, Kind, OnMissing, Resource, ServiceKind, ShardState, Spec, Transform, to_yaml,
};
use serde_json::Value;

/// `-o` formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Aligned columns.
    Table,
    /// YAML documents, ready to edit and apply again.
    Yaml,
    /// JSON as the API returns it.
    Json,
}

/// Aligned columns with a header row, like kubectl.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Multi-document YAML of JSON values.
pub(crate) fn yaml_documents(items: &[Value]) -> String {
    items.iter().map(to_yaml).collect::<Vec<_>>().join("---\n")
}

fn version(resource: &Resource) -> String {
    resource
        .metadata
        .resource_version
        .map(|v| v.to_string())
        .unwrap_or_default()
}

/// Observed status of resources, by name (`status` in REST answers).
pub(crate) type Statuses = std::collections::BTreeMap<String, Value>;

/// The table of resources of one kind.
pub(crate) fn resource_table(kind: Kind, resources: &[Resource], status: &Statuses) -> String {
    let (header, rows): (Vec<&str>, Vec<Vec<String>>) = match kind {
        Kind::Workspace => (
            vec!["NAME", "DESCRIPTION", "REVISION"],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::Workspace(s) => vec![
                        r.name().into(),
                        s.description.clone().unwrap_or_default(),
                        version(r),
                    ],
                    _ => vec![],
                })
                .collect(),
        ),
        Kind::Region => (
            vec!["NAME", "DISPLAY NAME", "REVISION"],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::Region(s) => vec![
                        r.name().into(),
                        s.display_name.clone().unwrap_or_default(),
                        version(r),
                    ],
                    _ => vec![],
                })
                .collect(),
        ),
        Kind::Zone => (
            vec!["NAME", "REGION", "WEIGHT", "REVISION"],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::Zone(s) => vec![
                        r.name().into(),
                        s.region.clone(),
                        s.weight.to_string(),
                        version(r),
                    ],
                    _ => vec![],
                })
                .collect(),
        ),
        Kind::Cell => (
            vec![
                "NAME", "TYPE", "ZONE", "WEIGHT", "HEALTH", "READY", "REVISION",
            ],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::Cell(s) => {
                        let observed = status.get(r.name());
                        let field = |name: &str| observed.and_then(|o| o.get(name));
                        let health = match (
                            field("health").and_then(Value::as_str),
                            field("reason").and_then(Value::as_str),
                        ) {
                            (Some(health), Some(reason)) if health != "Unmanaged" => {
                                format!("{health}: {reason}")
                            }
                            (Some(health), _) => health.to_owned(),
                            (None, _) => "-".to_owned(),
                        };
                        let ready = match (
                            field("readyInstances").and_then(Value::as_u64),
                            field("instances").and_then(Value::as_u64),
                        ) {
                            (Some(ready), Some(total)) if total > 0 => format!("{ready}/{total}"),
                            _ => "-".to_owned(),
                        };
                        vec![
                            r.name().into(),
                            s.cell_type.to_string(),
                            s.zone.clone(),
                            s.weight.to_string(),
                            health,
                            ready,
                            version(r),
                        ]
                    }
                    _ => vec![],
                })
                .collect(),
        ),
        Kind::ShardRule => (
            vec![
                "NAME",
                "SHARDS",
                "SOURCES",
                "TRANSFORM",
                "ON MISSING",
                "REVISION",
            ],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::ShardRule(s) => vec![
                        r.name().into(),
                        s.shards.to_string(),
                        s.key
                            .sources
                            .iter()
                            .map(|source| match source {
                                KeySource::Header(n) => format!("header:{n}"),
                                KeySource::Cookie(n) => format!("cookie:{n}"),
                                KeySource::Query(n) => format!("query:{n}"),
                                KeySource::Path(n) => format!("path:{n}"),
                                KeySource::Body(n) => format!("body:{n}"),
                            })
                            .collect::<Vec<_>>()
                            .join(","),
                        match &s.key.transform {
                            Transform::DecimalSuffix(n) => format!("decimalSuffix {n}"),
                            Transform::Mod(n) => format!("mod {n}"),
                            Transform::Hash(h) => format!(
                                "hash {}",
                                serde_json::to_value(h)
                                    .ok()
                                    .and_then(|v| v.as_str().map(str::to_owned))
                                    .unwrap_or_default()
                            ),
                        },
                        match s.key.on_missing {
                            OnMissing::Reject => "reject",
                            OnMissing::Global => "global",
                            OnMissing::Local => "local",
                        }
                        .into(),
                        version(r),
                    ],
                    _ => vec![],
                })
                .collect(),
        ),
        Kind::ShardMap => (
            vec!["NAME", "RULE", "EPOCH", "OWNERS", "FENCED", "REVISION"],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::ShardMap(s) => {
                        let owners = s
                            .assignments
                            .iter()
                            .map(|a| format!("{}={}", a.shards, a.cell))
                            .collect::<Vec<_>>()
                            .join(",");
                        let fenced: Vec<String> = s
                            .assignments
                            .iter()
                            .filter(|a| a.state == ShardState::Fenced)
                            .map(|a| a.shards.to_string())
                            .collect();
                        vec![
                            r.name().into(),
                            s.rule.clone(),
                            s.epoch.to_string(),
                            owners,
                            if fenced.is_empty() {
                                "-".into()
                            } else {
                                fenced.join(",")
                            },
                            version(r),
                        ]
                    }
                    _ => vec![],
                })
                .collect(),
        ),
        Kind::Service => (
            vec!["NAME", "KIND", "SHARD RULE", "ENDPOINTS", "REVISION"],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::Service(s) => vec![
                        r.name().into(),
                        match s.kind {
                            ServiceKind::Unitized => "unitized",
                            ServiceKind::Global => "global",
                            ServiceKind::Local => "local",
                        }
                        .into(),
                        s.shard_rule.clone().unwrap_or_else(|| "-".into()),
                        s.endpoints.len().to_string(),
                        version(r),
                    ],
                    _ => vec![],
                })
                .collect(),
        ),
        Kind::Route => (
            vec!["NAME", "HOSTS", "MATCH", "SERVICE", "REVISION"],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::Route(s) => vec![
                        r.name().into(),
                        if s.hosts.is_empty() {
                            "*".into()
                        } else {
                            s.hosts.join(",")
                        },
                        if s.matches.is_empty() {
                            "*".into()
                        } else {
                            s.matches
                                .iter()
                                .map(|m| {
                                    m.path_exact
                                        .clone()
                                        .or_else(|| m.path_prefix.as_ref().map(|p| format!("{p}*")))
                                        .or_else(|| m.path_template.clone())
                                        .unwrap_or_else(|| "*".into())
                                })
                                .collect::<Vec<_>>()
                                .join(",")
                        },
                        s.service.clone(),
                        version(r),
                    ],
                    _ => vec![],
                })
                .collect(),
        ),
        Kind::App => (
            vec![
                "NAME", "SERVICE", "CELLS", "REPLICAS", "VERSION", "REVISION",
            ],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::App(s) => vec![
                        r.name().into(),
                        s.service.clone(),
                        s.cells.join(","),
                        s.replicas.to_string(),
                        s.version.clone().unwrap_or_else(|| "-".into()),
                        version(r),
                    ],
                    _ => vec![],
                })
                .collect(),
        ),
        Kind::Endpoints => (
            vec!["NAME", "SERVICE", "ZONE", "READY", "REVISION"],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::Endpoints(s) => vec![
                        r.name().into(),
                        s.service.clone(),
                        s.zone.clone(),
                        format!(
                            "{}/{}",
                            s.endpoints.iter().filter(|e| e.ready).count(),
                            s.endpoints.len()
                        ),
                        version(r),
                    ],
                    _ => vec![],
                })
                .collect(),
        ),
        Kind::Switchover => (
            vec!["NAME", "MAP", "MOVES", "PHASE", "TOOK"],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::Switchover(s) => vec![
                        r.name().into(),
                        s.shard_map.clone(),
                        s.moves
                            .iter()
                            .map(|m| format!("{}:{}->{}", m.shards, m.from, m.to))
                            .collect::<Vec<_>>()
                            .join(","),
                        s.phase.to_string(),
                        {
                            let ms: u64 = s.timeline.iter().filter_map(|p| p.millis).sum();
                            if s.phase.is_final() {
                                format!("{:.2}s", ms as f64 / 1000.0)
                            } else {
                                "-".into()
                            }
                        },
                    ],
                    _ => vec![],
                })
                .collect(),
        ),
        Kind::Gateway => (
            vec!["NAME", "ZONE", "LISTENERS", "REVISION"],
            resources
                .iter()
                .map(|r| match &r.spec {
                    Spec::Gateway(s) => vec![
                        r.name().into(),
                        s.zone.clone(),
                        s.listeners
                            .iter()
                            .map(|l| {
                                format!(
                                    "{}/{}",
                                    l.port,
                                    serde_json::to_value(l.protocol)
                                        .ok()
                                        .and_then(|v| v.as_str().map(str::to_owned))
                                        .unwrap_or_default()
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(","),
                        version(r),
                    ],
                    _ => vec![],
                })
                .collect(),
        ),
    };
    table(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["NAME", "ZONE"],
            &[
                vec!["rz01".into(), "hz-a".into()],
                vec!["longer-name".into(), "sh".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME          ZONE\nrz01          hz-a\nlonger-name   sh\n"
        );
    }
}
