//! Shard ranges as written in manifests: `"0-49"`, `7`, `"0-9,50-59"`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An inclusive range of shards, `start..=end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardRange {
    /// First shard of the range.
    pub start: u32,
    /// Last shard of the range (inclusive).
    pub end: u32,
}

impl ShardRange {
    /// A range of one shard.
    pub fn single(shard: u32) -> Self {
        Self {
            start: shard,
            end: shard,
        }
    }

    /// Whether `shard` is in the range.
    pub fn contains(&self, shard: u32) -> bool {
        self.start <= shard && shard <= self.end
    }

    /// Number of shards in the range.
    pub fn len(&self) -> u64 {
        u64::from(self.end) - u64::from(self.start) + 1
    }

    /// Ranges are never empty; present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl fmt::Display for ShardRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// Why a shard range did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a shard range: {reason}; write it like \"0-49\" or \"7\"")]
pub struct ShardRangeError {
    text: String,
    reason: &'static str,
}

impl FromStr for ShardRange {
    type Err = ShardRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason| ShardRangeError {
            text: text.to_owned(),
            reason,
        };
        let number = |part: &str| -> Result<u32, ShardRangeError> {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(error("shards are non-negative whole numbers"));
            }
            part.parse().map_err(|_| error("shard number too large"))
        };
        match text.split_once('-') {
            None => Ok(ShardRange::single(number(text)?)),
            Some((start, end)) => {
                let range = ShardRange {
                    start: number(start)?,
                    end: number(end)?,
                };
                if range.start > range.end {
                    return Err(error("the first shard is after the last"));
                }
                Ok(range)
            }
        }
    }
}

impl Serialize for ShardRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ShardRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match RangeText::deserialize(d)? {
            RangeText::Number(n) => u32::try_from(n)
                .map(ShardRange::single)
                .map_err(|_| serde::de::Error::custom(format!("shard {n} is too large"))),
            RangeText::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "a shard range such as \"0-49\" or 7")]
enum RangeText {
    Number(u64),
    Text(String),
}

/// A set of shard ranges, written `"0-9,50-59"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShardSet {
    /// The ranges, in the order written.
    pub ranges: Vec<ShardRange>,
}

impl ShardSet {
    /// Whether any range contains `shard`.
    pub fn contains(&self, shard: u32) -> bool {
        self.ranges.iter().any(|r| r.contains(shard))
    }
}

impl fmt::Display for ShardSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, range) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{range}")?;
        }
        Ok(())
    }
}

impl FromStr for ShardSet {
    type Err = ShardRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let ranges = text
            .split(',')
            .map(|part| part.trim().parse())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ShardSet { ranges })
    }
}

impl Serialize for ShardSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ShardSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match RangeText::deserialize(d)? {
            RangeText::Number(n) => u32::try_from(n)
                .map(|n| ShardSet {
                    ranges: vec![ShardRange::single(n)],
                })
                .map_err(|_| serde::de::Error::custom(format!("shard {n} is too large"))),
            RangeText::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_single_shards() {
        assert_eq!(
            "0-49".parse::<ShardRange>(),
            Ok(ShardRange { start: 0, end: 49 })
        );
        assert_eq!("7".parse::<ShardRange>(), Ok(ShardRange::single(7)));
        assert_eq!(
            " 3 - 5 ".trim().parse::<ShardRange>(),
            Ok(ShardRange { start: 3, end: 5 })
        );
    }

    #[test]
    fn refuses_bad_ranges_with_a_reason() {
        for bad in ["", "-", "5-3", "a-b", "1-", "-1", "1--2", "99999999999"] {
            let err = bad.parse::<ShardRange>().expect_err(bad);
            assert!(err.to_string().contains("write it like"), "{err}");
        }
    }

    #[test]
    fn sets_round_trip() {
        let set: ShardSet = "0-9,50-59, 99".parse().expect("valid set");
        assert_eq!(set.to_string(), "0-9,50-59,99");
        assert!(set.contains(55) && set.contains(99) && !set.contains(10));
    }
}
