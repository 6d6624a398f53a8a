//! Atoll's audit chain: one [`AuditEntry`] per API call that changes or
//! could change state and per refusal, in one order for the whole replica
//! set, each holding the SHA-256 of the entry before it ([`AuditEntry::prev`])
//! and of its own content ([`AuditEntry::hash`]); the [`AuditHead`] names the
//! last one.
//!
//! [`Verifier`] reads a chain in order and names the first entry that was
//! removed, reordered or edited. What a chain alone cannot show is its end
//! cut off together with a head rewritten to match: an auditor keeps an
//! [`Anchor`] (the head's `seq:hash` at some time) elsewhere, and the
//! verifier checks the chain still holds that entry unchanged.
//!
//! The control plane writes entries (`atoll-control`); `atoll audit verify`
//! verifies them. See `docs/design/identity-and-access.md#the-chain-in-detail`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The version of the entry format, part of every hash.
pub const VERSION: u32 = 1;

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    /// The entry format ([`VERSION`]).
    pub v: u32,
    /// Its place in the chain, from 1.
    pub seq: u64,
    /// The hash of entry `seq - 1` ([`GENESIS`] for the first).
    pub prev: String,
    /// When the call was answered (RFC 3339, UTC).
    pub time: String,
    /// The replica that answered it (its advertised URL).
    pub replica: String,
    /// Who called, as verified (`olga`, `atoll://default/gateway/hz-a/gw-1`,
    /// `anonymous`, `bob (unverified)`).
    pub caller: String,
    /// How: `token <id>`, `certificate <identity>`, `none`.
    pub credential: String,
    /// From where (address and port), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// The HTTP method.
    pub method: String,
    /// The path with its query (never a body or a secret).
    pub path: String,
    /// The HTTP status answered.
    pub status: u16,
    /// `ok`, or the error code (`forbidden`, `unauthenticated`, `invalid`...).
    pub outcome: String,
    /// What came of it: the revision made and what changed, a switchover's
    /// name, a token's id; for a refusal, its reason.
    pub detail: String,
    /// The SHA-256 (hex) of everything above.
    pub hash: String,
}

/// The fields that are hashed, in a fixed order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Content<'a> {
    v: u32,
    seq: u64,
    prev: &'a str,
    time: &'a str,
    replica: &'a str,
    caller: &'a str,
    credential: &'a str,
    remote: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    status: u16,
    outcome: &'a str,
    detail: &'a str,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl AuditEntry {
    /// The SHA-256 of the entry's content (everything but `hash`).
    pub fn content_hash(&self) -> String {
        let content = Content {
            v: self.v,
            seq: self.seq,
            prev: &self.prev,
            time: &self.time,
            replica: &self.replica,
            caller: &self.caller,
            credential: &self.credential,
            remote: self.remote.as_deref(),
            method: &self.method,
            path: &self.path,
            status: self.status,
            outcome: &self.outcome,
            detail: &self.detail,
        };
        // Serializing a struct of strings and numbers cannot fail.
        let bytes = serde_json::to_vec(&content).unwrap_or_default();
        hex(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref())
    }

    /// Links the entry after `head` (none: the first) and seals it.
    pub fn seal(mut self, head: Option<&AuditHead>) -> Self {
        self.v = VERSION;
        self.seq = head.map_or(1, |h| h.seq + 1);
        self.prev = head.map_or_else(|| GENESIS.to_owned(), |h| h.hash.clone());
        self.hash = self.content_hash();
        self
    }

    /// The head that names this entry.
    pub fn head(&self) -> AuditHead {
        AuditHead {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }
}

/// The last entry of the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditHead {
    /// Its `seq`.
    pub seq: u64,
    /// Its `hash`.
    pub hash: String,
}

/// `GET /v1/audit/chain`: a page of the chain, in stored order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChainPage {
    /// The chain's head when read (none: no entry yet); the page holds no
    /// entry past it.
    pub head: Option<AuditHead>,
    /// Entries, in the order they are stored.
    pub entries: Vec<AuditEntry>,
    /// When entries after these exist: ask again with `after` set to this
    /// (the stored position of the last entry here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// An entry an auditor wrote down: `SEQ:HASH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    /// The entry's `seq`.
    pub seq: u64,
    /// Its `hash`.
    pub hash: String,
}

impl fmt::Display for Anchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

impl std::str::FromStr for Anchor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (seq, hash) = text.trim().split_once(':').ok_or_else(|| {
            format!("`{text}` is not SEQ:HASH (as `atoll audit verify` prints it)")
        })?;
        let seq = seq
            .parse::<u64>()
            .map_err(|_| format!("`{seq}` in `{text}` is not an entry number"))?;
        let is_hash = hash.len() == 64
            && hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !is_hash {
            return Err(format!(
                "`{hash}` in `{text}` is not a SHA-256 in hex (64 digits)"
            ));
        }
        Ok(Self {
            seq,
            hash: hash.to_owned(),
        })
    }
}

/// What is wrong with a chain, at the first entry found bad.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The first bad entry (for entries missing at the end: the first one
    /// missing).
    pub seq: u64,
    /// What was done to it.
    pub kind: ProblemKind,
    /// The whole sentence.
    pub message: String,
}

/// What was done to an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// It is gone.
    Removed,
    /// It is not where it was.
    Reordered,
    /// Its content changed.
    Edited,
}

impl ProblemKind {
    /// `removed`, `reordered`, `edited`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Removed => "removed",
            ProblemKind::Reordered => "reordered",
            ProblemKind::Edited => "edited",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Checks a chain entry by entry, in the order it is stored.
///
/// [`push`](Self::push) returns the first problem it can be sure of;
/// a gap in `seq` is only known to be a removal at the end (the missing
/// entry may be stored further on: moved), so [`finish`](Self::finish)
/// must always be called.
#[derive(Debug, Default)]
pub struct Verifier {
    last: Option<AuditEntry>,
    anchor: Option<Anchor>,
    anchor_seen: bool,
    checked: u64,
    /// Entries missing where they should be: (first, last, the entry
    /// found in their place).
    gap: Option<(u64, u64, u64)>,
}

fn problem(seq: u64, kind: ProblemKind, message: String) -> Problem {
    Problem { seq, kind, message }
}

impl Verifier {
    /// A verifier that also checks `anchor`.
    pub fn new(anchor: Option<Anchor>) -> Self {
        Self {
            anchor,
            ..Self::default()
        }
    }

    /// How many entries were checked and found good.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// Checks the next entry.
    pub fn push(&mut self, entry: AuditEntry) -> Result<(), Problem> {
        if let Some((first, last, found)) = self.gap {
            // Past a gap only the missing entries matter: stored later,
            // they were moved; never seen, removed.
            if (first..=last).contains(&entry.seq) {
                return Err(problem(
                    entry.seq,
                    ProblemKind::Reordered,
                    format!(
                        "entry {} was moved: it should follow entry {}, and is stored after entry {found}",
                        entry.seq,
                        entry.seq - 1
                    ),
                ));
            }
            return Ok(());
        }
        let expected = self.last.as_ref().map_or(1, |l| l.seq + 1);
        if entry.seq > expected {
            self.gap = Some((expected, entry.seq - 1, entry.seq));
            return Ok(());
        }
        if entry.seq < expected {
            return Err(problem(
                entry.seq,
                ProblemKind::Reordered,
                format!(
                    "entry {} was moved: it is stored after entry {}",
                    entry.seq,
                    expected - 1
                ),
            ));
        }
        let prev = self
            .last
            .as_ref()
            .map_or_else(|| GENESIS.to_owned(), |l| l.hash.clone());
        if entry.prev != prev {
            // The entry before it is not the one it was written after:
            // that one was changed (its hash recomputed to hide it), or
            // this one was moved here.
            return Err(match &self.last {
                Some(last) => problem(
                    last.seq,
                    ProblemKind::Edited,
                    format!(
                        "entry {} was changed after entry {} was written: entry {} records {} as the hash of the entry before it, but entry {} now hashes to {}",
                        last.seq, entry.seq, entry.seq, entry.prev, last.seq, last.hash
                    ),
                ),
                None => problem(
                    entry.seq,
                    ProblemKind::Edited,
                    format!(
                        "entry 1 was edited: the first entry must follow nothing ({GENESIS}), but it records {}",
                        entry.prev
                    ),
                ),
            });
        }
        if entry.v != VERSION {
            return Err(problem(
                entry.seq,
                ProblemKind::Edited,
                format!(
                    "entry {} has format version {}, which this verifier does not know (it knows {VERSION}); upgrade atoll",
                    entry.seq, entry.v
                ),
            ));
        }
        let content = entry.content_hash();
        if content != entry.hash {
            return Err(problem(
                entry.seq,
                ProblemKind::Edited,
                format!(
                    "entry {} was edited: its content hashes to {content}, not to the {} it was sealed with",
                    entry.seq, entry.hash
                ),
            ));
        }
        if let Some(anchor) = &self.anchor
            && anchor.seq == entry.seq
        {
            if anchor.hash != entry.hash {
                return Err(problem(
                    entry.seq,
                    ProblemKind::Edited,
                    format!(
                        "entry {} is not the one anchored: it hashes to {}, the anchor says {} (the chain was rewritten from here on)",
                        entry.seq, entry.hash, anchor.hash
                    ),
                ));
            }
            self.anchor_seen = true;
        }
        self.checked += 1;
        self.last = Some(entry);
        Ok(())
    }

    /// Checks the end of the chain against its head.
    pub fn finish(&self, head: Option<&AuditHead>) -> Result<(), Problem> {
        if let Some((first, last, found)) = self.gap {
            let before = first.saturating_sub(1);
            let message = if first == 1 {
                format!("entries 1 to {last} were removed: the chain starts at entry {found}")
            } else if first == last {
                format!("entry {first} was removed: entry {before} is followed by entry {found}")
            } else {
                format!(
                    "entries {first} to {last} were removed: entry {before} is followed by entry {found}"
                )
            };
            return Err(problem(first, ProblemKind::Removed, message));
        }
        let last = self.last.as_ref().map(AuditEntry::head);
        match (head, &last) {
            (None, None) => {}
            (None, Some(last)) => {
                return Err(problem(
                    last.seq,
                    ProblemKind::Edited,
                    format!(
                        "the chain has entries up to {} but no head: the head was removed",
                        last.seq
                    ),
                ));
            }
            (Some(head), last) => {
                let end = last.as_ref().map_or(0, |l| l.seq);
                if head.seq > end {
                    let message = if head.seq == end + 1 {
                        format!(
                            "entry {} was removed: the head names it, and the chain ends at entry {end}",
                            head.seq
                        )
                    } else {
                        format!(
                            "entries {} to {} were removed: the head names entry {}, and the chain ends at entry {end}",
                            end + 1,
                            head.seq,
                            head.seq
                        )
                    };
                    return Err(problem(end + 1, ProblemKind::Removed, message));
                }
                if head.seq < end {
                    return Err(problem(
                        head.seq + 1,
                        ProblemKind::Reordered,
                        format!(
                            "entries after {} are not covered by the head (it names entry {}, the chain ends at entry {end}): they were added by hand, or the head was rolled back",
                            head.seq, head.seq
                        ),
                    ));
                }
                if last.as_ref().is_some_and(|l| l.hash != head.hash) {
                    return Err(problem(
                        end,
                        ProblemKind::Edited,
                        format!(
                            "the head's hash {} is not entry {end}'s {}: the last entry or the head was changed",
                            head.hash,
                            last.as_ref().map_or("", |l| l.hash.as_str())
                        ),
                    ));
                }
            }
        }
        if let Some(anchor) = &self.anchor
            && !self.anchor_seen
        {
            return Err(problem(
                anchor.seq,
                ProblemKind::Removed,
                format!(
                    "the anchored entry {} is not in the chain any more (it ends at entry {}): entries were removed",
                    anchor.seq,
                    last.as_ref().map_or(0, |l| l.seq)
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
