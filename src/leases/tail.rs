//! Reading a spend log back: its calls into the ledger, and which of its
//! leases are still open and how much of each was spent.
//!
//! The same reader follows a live worker's log (a few milliseconds behind
//! it) and replays a dead worker's log at start, so the replay path is the
//! one exercised by every leased call.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use sqlx::PgPool;

use super::log::{Files, Line, parse_line, position, split};
use crate::ledger::Calls;
use crate::ledger::store;
use crate::metering::KeyLayout;

/// The most events in one ledger write.
const BATCH: usize = 4096;

/// The most bytes one step reads.
const CHUNK: u64 = 4 * 1024 * 1024;

/// A lease the log shows taken and not settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenLease {
    pub user: String,
    /// Credits spent from it, net of calls given back.
    pub spent: i64,
    /// The segment its `L` line is in: that segment and every later one
    /// stay on disk until it is settled.
    segment: u64,
}

pub struct Tailer {
    files: Files,
    pool: PgPool,
    keys: KeyLayout,
    segment: u64,
    offset: u64,
    /// Segments read to their end, not yet deleted.
    done: BTreeSet<u64>,
    open: HashMap<String, OpenLease>,
    /// Bad lines skipped (logged once each).
    pub skipped: u64,
    /// How far the ledger has this log: every call before it is written.
    written: Arc<std::sync::atomic::AtomicU64>,
    /// For a live log, where its writer's last whole line ends: nothing
    /// past it is read (a line may be in the middle of its copy).
    published: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// What one step found.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Read and wrote something; there may be more.
    Moved,
    /// At the end of the newest segment.
    AtEnd,
}

impl Tailer {
    /// Reads `files` from its oldest segment on disk.
    pub fn new(files: Files, pool: PgPool, keys: KeyLayout) -> std::io::Result<Self> {
        let first = files.segments()?.first().copied().unwrap_or(0);
        Ok(Self {
            files,
            pool,
            keys,
            segment: first,
            offset: 0,
            done: BTreeSet::new(),
            open: HashMap::new(),
            skipped: 0,
            written: Arc::new(std::sync::atomic::AtomicU64::new(position(first, 0))),
            published: None,
        })
    }

    /// Reads a live log: only up to where `published` says its writer's
    /// last whole line ends ([`super::log::SpendLog::published`]).
    pub fn following(mut self, published: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.published = Some(published);
        self
    }

    /// Publishes how far the ledger has this log into `written`, kept up
    /// to date by [`Tailer::step`].
    pub fn sharing_progress(mut self, written: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.written = written;
        self.publish();
        self
    }

    fn publish(&self) {
        self.written.store(
            position(self.segment, self.offset),
            std::sync::atomic::Ordering::Release,
        );
    }

    pub fn open_leases(&self) -> &HashMap<String, OpenLease> {
        &self.open
    }

    /// Reads what was appended since the last step (up to one batch of
    /// calls), writes its calls to the ledger, and only then moves on: a
    /// failed write is read and written again next time.
    pub async fn step(&mut self) -> Result<Progress, TailError> {
        // Whether a next segment exists is asked before reading to the end
        // of this one: once it exists, this one is complete.
        let next_exists = self.files.segment(self.segment + 1).exists();
        let mut file = match std::fs::File::open(self.files.segment(self.segment)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && next_exists => {
                self.segment += 1;
                self.offset = 0;
                self.publish();
                return Ok(Progress::Moved);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Progress::AtEnd),
            Err(e) => return Err(TailError::Io(e)),
        };
        // A live log is read up to its last published line while its
        // writer is in this segment; a segment it has left is whole.
        let bound = self.published.as_ref().and_then(|p| {
            let (segment, end) = split(p.load(std::sync::atomic::Ordering::Acquire));
            (segment == self.segment).then_some(end)
        });
        let want = bound.map_or(CHUNK, |end| end.saturating_sub(self.offset).min(CHUNK));
        file.seek(SeekFrom::Start(self.offset))?;
        // Sized for what is there: grown from empty, a step's megabyte was
        // copied again at each doubling. A live log says how much; a
        // whole segment is read up to its length (zeros past its lines).
        let there = match bound {
            Some(_) => want,
            None => file
                .metadata()
                .map_or(0, |m| m.len().saturating_sub(self.offset))
                .min(want),
        };
        let mut buf = Vec::with_capacity(usize::try_from(there).unwrap_or(0) + 1);
        file.take(want).read_to_end(&mut buf)?;
        let (data, whole) = whole_lines(&buf);
        let ended = data < buf.len();
        buf.truncate(data);
        let bytes = &buf[..whole];
        let mut calls = Calls::default();
        // The log's order, which the lease accounting follows: a lease's
        // calls come after its `L` line.
        let mut order: Vec<Op<'_>> = Vec::new();
        let mut consumed = 0usize;
        for (line, next) in lines(bytes) {
            if calls.len() >= BATCH {
                break;
            }
            consumed = next;
            let Some(line) = line else {
                self.skipped += 1;
                tracing::error!(
                    segment = self.segment,
                    "spend log: a line is not UTF-8, skipped"
                );
                continue;
            };
            if line.is_empty() {
                continue;
            }
            let keys = &self.keys;
            match parse_line(line, |user| {
                i16::try_from(keys.shard_of_id(user)).unwrap_or(0)
            }) {
                Ok(Line::Spend(call)) => {
                    let amount = if call.charge {
                        call.amount
                    } else {
                        -call.amount
                    };
                    // A lease's calls come in runs: one entry a run, one
                    // lookup of the lease below.
                    match order.last_mut() {
                        Some(Op::Spend(lease, sum)) if *lease == call.lease => *sum += amount,
                        _ => order.push(Op::Spend(call.lease, amount)),
                    }
                    calls.push(call);
                }
                Ok(Line::Lease { lease, user }) => order.push(Op::Lease(lease, user)),
                Ok(Line::Settled { lease }) => order.push(Op::Settled(lease)),
                Err(error) => {
                    self.skipped += 1;
                    tracing::error!(segment = self.segment, %error, "spend log: line skipped");
                }
            }
        }
        if !calls.is_empty() {
            store::write_calls(&self.pool, &mut calls).await?;
        }
        let mut settled = false;
        for op in order {
            match op {
                Op::Spend(lease, amount) => {
                    if let Some(open) = self.open.get_mut(lease) {
                        open.spent += amount;
                    }
                }
                Op::Lease(lease, user) => {
                    let segment = self.segment;
                    self.open.insert(
                        lease.to_owned(),
                        OpenLease {
                            user: user.into_owned(),
                            spent: 0,
                            segment,
                        },
                    );
                }
                Op::Settled(lease) => {
                    settled |= self.open.remove(lease).is_some();
                }
            }
        }
        self.offset += consumed as u64;
        // This segment is complete once a next one exists: read to its end
        // (a half line a failed write left at its end is dropped), go on.
        let read_all = consumed == whole && (ended || (buf.len() as u64) < want);
        self.publish();
        if next_exists && read_all {
            if whole < buf.len() {
                self.skipped += 1;
                tracing::error!(
                    segment = self.segment,
                    "spend log: half a line at a segment's end, skipped"
                );
            }
            self.done.insert(self.segment);
            self.segment += 1;
            self.offset = 0;
            self.publish();
            self.delete_finished();
            return Ok(Progress::Moved);
        }
        if settled {
            self.delete_finished();
        }
        Ok(if consumed == 0 {
            Progress::AtEnd
        } else {
            Progress::Moved
        })
    }

    /// Deletes the segments read to their end that no open lease needs.
    fn delete_finished(&mut self) {
        let oldest_open = self.open.values().map(|o| o.segment).min();
        let deletable: Vec<u64> = self
            .done
            .iter()
            .copied()
            .filter(|&s| oldest_open.is_none_or(|o| s < o))
            .collect();
        for s in deletable {
            match std::fs::remove_file(self.files.segment(s)) {
                Ok(()) => {
                    self.done.remove(&s);
                }
                Err(error) => tracing::warn!(%error, segment = s, "spend log: cannot delete"),
            }
        }
    }

    /// Every segment of a dead worker read and written; its files can go
    /// once its open leases are settled.
    pub fn remove_all(&self) -> std::io::Result<()> {
        for s in self.files.segments()? {
            std::fs::remove_file(self.files.segment(s))?;
        }
        match std::fs::remove_file(self.files.lock()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The whole lines of `bytes`, without their newline, each with where the
/// next one starts. Offsets stay those of the file: a line that is not
/// UTF-8 is `None`, to be skipped whole, never repaired. The chunk is
/// checked at once, and line by line only when some line is not UTF-8.
fn lines(bytes: &[u8]) -> impl Iterator<Item = (Option<&str>, usize)> {
    let text = std::str::from_utf8(bytes).ok();
    let mut start = 0;
    memchr::memchr_iter(b'\n', bytes).map(move |end| {
        let line = match text {
            Some(text) => Some(&text[start..end]),
            None => std::str::from_utf8(&bytes[start..end]).ok(),
        };
        start = end + 1;
        (line, start)
    })
}

/// Where a segment's lines end in `buf` (read from it): at its first NUL,
/// since past its last line a segment is zeros and a line a killed writer
/// left half copied has zeros in it; and where the last whole line ends
/// before that (the writer may be in the middle of the next one).
fn whole_lines(buf: &[u8]) -> (usize, usize) {
    let data = memchr::memchr(0, buf).unwrap_or(buf.len());
    let whole = memchr::memrchr(b'\n', &buf[..data]).map_or(0, |i| i + 1);
    (data, whole)
}

enum Op<'a> {
    /// Calls spent from (refunds: given back to) a lease, net.
    Spend(&'a str, i64),
    Lease(&'a str, Cow<'a, str>),
    Settled(&'a str),
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("spend log: {0}")]
    Io(#[from] std::io::Error),
    #[error("ledger: {0}")]
    Postgres(#[from] sqlx::Error),
}

#[cfg(test)]
mod tests {
    use super::{lines, whole_lines};

    #[test]
    fn a_line_that_is_not_utf8_is_skipped_whole_and_the_others_read() {
        let got: Vec<_> = lines(b"S\ta\n\xff\xfe\nX\tb\n\nhalf").collect();
        assert_eq!(
            got,
            [
                (Some("S\ta"), 4),
                (None, 7),
                (Some("X\tb"), 11),
                (Some(""), 12)
            ]
        );
        let got: Vec<_> = lines("é\nL\n".as_bytes()).collect();
        assert_eq!(got, [(Some("é"), 3), (Some("L"), 5)]);
    }

    #[test]
    fn a_segment_ends_at_its_first_nul_and_a_half_copied_line_is_never_read() {
        // Lines, then the reserved segment's zeros.
        assert_eq!(whole_lines(b"L\ta\tu\nX\ta\n\0\0\0"), (10, 10));
        // A line being written: its end is not there yet.
        assert_eq!(whole_lines(b"X\ta\nX\tb"), (7, 4));
        // A killed writer's last copy, its newline stored before its
        // middle: the zeros end the segment before that newline.
        assert_eq!(whole_lines(b"X\ta\nX\0\0b\n\0"), (5, 4));
        // An old segment written with write(2): no zeros at all.
        assert_eq!(whole_lines(b"X\ta\n"), (4, 4));
        assert_eq!(whole_lines(b""), (0, 0));
    }
}
