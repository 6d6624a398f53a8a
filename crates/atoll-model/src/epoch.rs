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
