//! The shard map's epoch: it increases on every ownership change and never
//! goes back, even across a delete and re-create or a rollback.

use crate::resource::ShardMapSpec;

/// Sets `new.epoch` for a write of a shard map.
///
/// `stored` is the map as stored now (absent for a create), `highest` the
/// highest epoch the map ever had in its history (0 if none). When the
/// manifest leaves the epoch out (0), the control plane fills it in; a given
/// epoch may be higher than required (a deliberate bump) but never lower.
pub fn assign_epoch(
    new: &mut ShardMapSpec,
    stored: Option<&ShardMapSpec>,
    highest: u64,
) -> Result<(), String> {
    let required = match stored {
        Some(stored) if !stored.ownership_differs(new) => stored.epoch.max(1),
        Some(stored) => stored.epoch.max(highest) + 1,
        None => highest + 1,
    };
    if new.epoch == 0 {
        new.epoch = required;
        return Ok(());
    }
    if new.epoch < required {
        return Err(format!(
            "epoch {} is behind: this change makes it {required} (epochs only move forward); remove `epoch` from the manifest or set it to {required}",
            new.epoch
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{Assignment, ShardState};
    use crate::shards::ShardRange;

    fn map(epoch: u64, owners: &[(u32, u32, &str)]) -> ShardMapSpec {
        ShardMapSpec {
            rule: "users".into(),
            epoch,
            assignments: owners
                .iter()
                .map(|(start, end, cell)| Assignment {
                    shards: ShardRange {
                        start: *start,
                        end: *end,
                    },
                    cell: (*cell).into(),
                    standby: None,
                    state: ShardState::Serving,
                })
                .collect(),
            failover: None,
        }
    }

    #[test]
    fn a_new_map_starts_at_epoch_one() {
        let mut new = map(0, &[(0, 99, "a")]);
        assign_epoch(&mut new, None, 0).expect("valid");
        assert_eq!(new.epoch, 1);
    }

    #[test]
    fn ownership_changes_bump_the_epoch() {
        let stored = map(4, &[(0, 49, "a"), (50, 99, "b")]);
        let mut moved = map(0, &[(0, 59, "a"), (60, 99, "b")]);
        assign_epoch(&mut moved, Some(&stored), 4).expect("valid");
        assert_eq!(moved.epoch, 5);
    }

    #[test]
    fn fencing_or_splitting_keeps_the_epoch() {
        let stored = map(4, &[(0, 49, "a"), (50, 99, "b")]);
        let mut split = map(0, &[(0, 9, "a"), (10, 49, "a"), (50, 99, "b")]);
        split.assignments[0].state = ShardState::Fenced;
        assign_epoch(&mut split, Some(&stored), 4).expect("valid");
        assert_eq!(split.epoch, 4);
    }

    #[test]
    fn recreating_continues_after_the_highest_epoch() {
        let mut again = map(0, &[(0, 99, "a")]);
        assign_epoch(&mut again, None, 7).expect("valid");
        assert_eq!(again.epoch, 8);
    }

    /// Splits [0, 100) into ranges at `cuts`, owned by cells from `owners`.
    fn partition(cuts: &[u32], owners: &[u8]) -> ShardMapSpec {
        let mut bounds: Vec<u32> = cuts.iter().map(|c| c % 99 + 1).collect();
        bounds.sort_unstable();
        bounds.dedup();
        let mut ranges = Vec::new();
        let mut start = 0;
        for (i, bound) in bounds.iter().chain([100].iter()).enumerate() {
            let cell = format!("c{}", owners[i % owners.len()] % 3);
            ranges.push((start, bound - 1, cell));
            start = *bound;
        }
        let owned: Vec<(u32, u32, &str)> = ranges
            .iter()
            .map(|(a, b, c)| (*a, *b, c.as_str()))
            .collect();
        map(0, &owned)
    }

    proptest::proptest! {
        #[test]
        fn ownership_differs_agrees_with_a_shard_by_shard_comparison(
            cuts_a in proptest::collection::vec(0u32..200, 0..8),
            cuts_b in proptest::collection::vec(0u32..200, 0..8),
            owners_a in proptest::collection::vec(0u8..3, 1..4),
            owners_b in proptest::collection::vec(0u8..3, 1..4),
        ) {
            let a = partition(&cuts_a, &owners_a);
            let b = partition(&cuts_b, &owners_b);
            let owner = |m: &ShardMapSpec, shard: u32| {
                m.assignments.iter().find(|x| x.shards.contains(shard)).map(|x| x.cell.clone())
            };
            let expected = (0..100).any(|s| owner(&a, s) != owner(&b, s));
            proptest::prop_assert_eq!(a.ownership_differs(&b), expected);
            proptest::prop_assert!(!a.ownership_differs(&a));
        }
    }

    #[test]
    fn a_stale_epoch_is_refused_and_a_bump_allowed() {
        let stored = map(4, &[(0, 99, "a")]);
        let mut stale = map(3, &[(0, 99, "b")]);
        let err = assign_epoch(&mut stale, Some(&stored), 4).expect_err("stale");
        assert!(err.contains("this change makes it 5"), "{err}");
        let mut bumped = map(9, &[(0, 99, "a")]);
        assign_epoch(&mut bumped, Some(&stored), 4).expect("bump");
        assert_eq!(bumped.epoch, 9);
    }
}
