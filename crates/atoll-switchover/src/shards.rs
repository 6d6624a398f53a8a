//! Shard-map edits a switchover makes: fence, flip and unfence a range.

use atoll_model::{Assignment, ShardMapSpec, ShardRange, ShardState};

/// `(owner, state)` of every shard in `range`.
pub fn owners_in(map: &ShardMapSpec, range: ShardRange) -> Vec<(String, ShardState)> {
    (range.start..=range.end)
        .filter_map(|shard| {
            map.assignments
                .iter()
                .find(|a| a.shards.contains(shard))
                .map(|a| (a.cell.clone(), a.state))
        })
        .collect()
}

/// Applies `change` to the assignments of the shards in `range`, splitting
/// ranges where needed, then merges neighbours that became equal.
pub fn set_range(
    map: &mut ShardMapSpec,
    range: ShardRange,
    mut change: impl FnMut(&mut Assignment),
) {
    let mut out: Vec<Assignment> = Vec::with_capacity(map.assignments.len() + 2);
    let mut assignments = std::mem::take(&mut map.assignments);
    assignments.sort_by_key(|a| a.shards.start);
    for a in assignments {
        let (start, end) = (a.shards.start, a.shards.end);
        if end < range.start || start > range.end {
            out.push(a);
            continue;
        }
        if start < range.start {
            let mut before = a.clone();
            before.shards = ShardRange {
                start,
                end: range.start - 1,
            };
            out.push(before);
        }
        let mut inside = a.clone();
        inside.shards = ShardRange {
            start: start.max(range.start),
            end: end.min(range.end),
        };
        change(&mut inside);
        out.push(inside);
        if end > range.end {
            let mut after = a;
            after.shards = ShardRange {
                start: range.end + 1,
                end,
            };
            out.push(after);
        }
    }
    // Merge adjacent equal assignments.
    let mut merged: Vec<Assignment> = Vec::with_capacity(out.len());
    for a in out {
        if let Some(last) = merged.last_mut()
            && last.shards.end + 1 == a.shards.start
            && last.cell == a.cell
            && last.standby == a.standby
            && last.state == a.state
        {
            last.shards.end = a.shards.end;
            continue;
        }
        merged.push(a);
    }
    map.assignments = merged;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> ShardMapSpec {
        ShardMapSpec {
            rule: "users".into(),
            epoch: 1,
            assignments: vec![
                Assignment {
                    shards: ShardRange { start: 0, end: 49 },
                    cell: "rz01".into(),
                    standby: Some("rz02".into()),
                    state: ShardState::Serving,
                },
                Assignment {
                    shards: ShardRange { start: 50, end: 99 },
                    cell: "rz02".into(),
                    standby: Some("rz01".into()),
                    state: ShardState::Serving,
                },
            ],
            failover: None,
        }
    }

    #[test]
    fn set_range_splits_and_merges_back() {
        let mut m = map();
        let range = ShardRange { start: 10, end: 19 };
        set_range(&mut m, range, |a| a.state = ShardState::Fenced);
        let ranges: Vec<String> = m.assignments.iter().map(|a| a.shards.to_string()).collect();
        assert_eq!(ranges, ["0-9", "10-19", "20-49", "50-99"]);
        assert_eq!(m.assignments[1].state, ShardState::Fenced);
        set_range(&mut m, range, |a| a.state = ShardState::Serving);
        assert_eq!(m, map(), "unfencing restores the map exactly");
    }

    #[test]
    fn owners_in_lists_every_shard_of_a_range() {
        let owners = owners_in(&map(), ShardRange { start: 48, end: 51 });
        let cells: Vec<&str> = owners.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(cells, ["rz01", "rz01", "rz02", "rz02"]);
    }
}
