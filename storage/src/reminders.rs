//! The reminders table: durable, periodic wake-ups of grains that survive restarts.
//!
//! A reminder belongs to a grain and has a name; it fires first at `start_at_ms` and then every `period_ms`,
//! on that grid. Each row also keeps `next_due_ms`, the due time of its next tick not yet delivered: the silo
//! that fires a reminder moves it forward after each delivery ([`ReminderTable::advance`]), so the silo that
//! takes the reminder over after a crash knows how many ticks were missed.
//!
//! Rows carry the grain's ring hash, so that the silo owning a set of ranges of the consistent-hash ring reads
//! exactly the reminders it is responsible for, and only those due soon ([`ReminderTable::read_due`]): the
//! table is read by ring range and due time (in Postgres, through an index on `(grain_hash, next_due)`), never
//! whole, and a reminder due in a year costs its owner nothing until its time comes near. Definition changes
//! (upsert, remove) are etag-checked like grain state; progress is applied only to the definition it was made
//! for.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{ETag, StorageError};

/// A reminder as written by a grain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReminderEntry {
    /// The grain type.
    pub grain_type: String,
    /// The grain key in its storage form, tagged by shape (`s:alice`, `i:42`; see `GrainKey::storage_key` in
    /// the `grains` crate), so keys of different shapes never share a row.
    pub grain_key: String,
    /// The reminder's name, unique per grain.
    pub name: String,
    /// The grain id's hash on the consistent-hash ring.
    pub grain_hash: u32,
    /// First due time (Unix ms).
    pub start_at_ms: i64,
    /// Period in milliseconds.
    pub period_ms: i64,
}

/// A reminder as read, with its etag and progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReminderRow {
    /// The reminder.
    pub entry: ReminderEntry,
    /// Its etag: changes when the reminder is registered again, not when it fires.
    pub etag: ETag,
    /// The due time (Unix ms) of the next tick not yet delivered; `start_at_ms` until the first delivery.
    pub next_due_ms: i64,
}

/// A delivered tick, to be recorded: the reminder's next undelivered tick is now due at `next_due_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReminderProgress {
    /// The grain type.
    pub grain_type: String,
    /// The grain key in its storage form.
    pub grain_key: String,
    /// The reminder's name.
    pub name: String,
    /// The etag of the definition the tick was fired for: progress on a reminder registered again since is
    /// dropped.
    pub etag: ETag,
    /// The due time (Unix ms) of the next tick not yet delivered.
    pub next_due_ms: i64,
}

/// How far a grain hash is shifted to give its bucket: the ring's 2^32 hashes fall in 1024 buckets. Providers
/// index reminders by (bucket, due time), so that a read of the reminders due in a set of ranges seeks each
/// bucket the ranges touch, up to the due time, and reads nothing further ahead.
pub const RING_BUCKET_SHIFT: u32 = 22;

/// A range of the consistent-hash ring: the hashes in `(begin, end]`, wrapping around zero when
/// `begin > end`; `begin == end` is the whole ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RingRange {
    /// Exclusive start.
    pub begin: u32,
    /// Inclusive end.
    pub end: u32,
}

impl RingRange {
    /// The range `(begin, end]`.
    pub const fn new(begin: u32, end: u32) -> Self {
        Self { begin, end }
    }

    /// Whether `hash` lies in the range.
    pub fn contains(&self, hash: u32) -> bool {
        in_ring_range(hash, self.begin, self.end)
    }

    /// The range as one or two intervals `[low, high]` (inclusive) that do not wrap: what an index over the
    /// hash can seek to.
    pub fn intervals(&self) -> impl Iterator<Item = (u32, u32)> {
        let (first, second) = match self.begin.cmp(&self.end) {
            std::cmp::Ordering::Less => (Some((self.begin + 1, self.end)), None),
            // Wrapping: (begin, MAX] then [0, end]; the first is empty when begin is MAX.
            std::cmp::Ordering::Greater => {
                ((self.begin < u32::MAX).then(|| (self.begin + 1, u32::MAX)), Some((0, self.end)))
            }
            std::cmp::Ordering::Equal => (Some((0, u32::MAX)), None),
        };
        first.into_iter().chain(second)
    }

    /// The range as intervals `[low, high]` (inclusive) that each lie within one ring bucket (see
    /// [`RING_BUCKET_SHIFT`]), with that bucket: what an index by bucket can seek to, one bucket at a time.
    pub fn bucket_intervals(&self) -> impl Iterator<Item = (u32, u32, u32)> {
        self.intervals().flat_map(|(low, high)| {
            (low >> RING_BUCKET_SHIFT..=high >> RING_BUCKET_SHIFT).map(move |bucket| {
                let first = bucket << RING_BUCKET_SHIFT;
                let last = first | ((1 << RING_BUCKET_SHIFT) - 1);
                (bucket, low.max(first), high.min(last))
            })
        })
    }
}

/// Durable reminders.
#[async_trait]
pub trait ReminderTable: Send + Sync + 'static {
    /// Every reminder of one grain, by name.
    async fn read_grain(&self, grain_type: &str, grain_key: &str) -> Result<Vec<ReminderRow>, StorageError>;

    /// One reminder.
    async fn read_row(
        &self,
        grain_type: &str,
        grain_key: &str,
        name: &str,
    ) -> Result<Option<ReminderRow>, StorageError>;

    /// Every reminder whose grain hash lies in the ring range `(begin, end]`; when `begin >= end` the range
    /// wraps around zero (and `begin == end` is the whole ring). For tools and tests: a silo reads
    /// [`read_due`](Self::read_due).
    async fn read_range(&self, begin: u32, end: u32) -> Result<Vec<ReminderRow>, StorageError>;

    /// The reminders whose grain hash lies in one of `ranges` and whose next tick is due at or before
    /// `due_by_ms` (Unix ms), ordered by that due time: what the silo owning `ranges` must schedule soon.
    async fn read_due(&self, ranges: &[RingRange], due_by_ms: i64) -> Result<Vec<ReminderRow>, StorageError>;

    /// Creates or replaces a reminder, its next tick due at `start_at_ms`; returns its new etag.
    async fn upsert(&self, entry: &ReminderEntry) -> Result<ETag, StorageError>;

    /// Removes a reminder if its etag is `etag`; `Ok(false)` when it is absent or the etag differs.
    async fn remove(&self, grain_type: &str, grain_key: &str, name: &str, etag: &str) -> Result<bool, StorageError>;

    /// Records delivered ticks, all at once: each reminder's next tick becomes due at its `next_due_ms`, if the
    /// reminder still has the etag given and that moves its next tick later (progress never goes back, and
    /// never applies to a reminder registered again since).
    async fn advance(&self, progress: &[ReminderProgress]) -> Result<(), StorageError>;
}

/// Whether `hash` lies in the ring range `(begin, end]` (wrapping; `begin == end` is the whole ring).
pub fn in_ring_range(hash: u32, begin: u32, end: u32) -> bool {
    match begin.cmp(&end) {
        std::cmp::Ordering::Less => hash > begin && hash <= end,
        std::cmp::Ordering::Greater => hash > begin || hash <= end,
        std::cmp::Ordering::Equal => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_cover_exactly_the_range() {
        let cases = [(10, 20), (20, 10), (5, 5), (u32::MAX, 3), (3, u32::MAX), (0, 0), (u32::MAX - 1, u32::MAX)];
        let probes = [0, 1, 3, 4, 5, 6, 10, 11, 15, 20, 21, u32::MAX - 1, u32::MAX];
        for (begin, end) in cases {
            let range = RingRange::new(begin, end);
            let intervals: Vec<_> = range.intervals().collect();
            for hash in probes {
                let covered = intervals.iter().any(|&(low, high)| low <= hash && hash <= high);
                assert_eq!(covered, range.contains(hash), "({begin}, {end}] and {hash}: {intervals:?}");
                let buckets: Vec<_> = range.bucket_intervals().collect();
                let in_buckets = buckets
                    .iter()
                    .filter(|&&(b, low, high)| low <= hash && hash <= high && hash >> RING_BUCKET_SHIFT == b);
                assert_eq!(in_buckets.count(), usize::from(range.contains(hash)), "({begin}, {end}] and {hash}");
            }
        }
    }
}
