//! The spend log: the only copy of a leased call's event until Postgres
//! has it, and of which leases a gateway holds until it settles them.
//!
//! One per process (its workers share it: [`super::SharedLog`]), a
//! sequence of segment files `spend-<instance>-<seq>.log` beside a lock
//! file `spend-<instance>.lock` that the process holds while it lives.
//! Lines, tab-separated, text escaped as the usage rows are
//! (`\\ \t \n \r`):
//!
//! ```text
//! L <lease id> <user>                                   a lease taken (before any of its calls)
//! S <event> <lease> <user> <kind> <module> <action> <amount> <from monthly> <from bonus>
//!   <plan> <request id> <actor> <unix ms> <day>          a call spent (charge) or given back (refund)
//! X <lease id>                                          the lease settled in Redis
//! ```
//!
//! A segment is a file of `metering.leases.segment_bytes` reserved whole with
//! `posix_fallocate` and mapped shared: a line is copied into the map under
//! the log's lock, and the log's length published after it, with no
//! syscall, no task and no wait. There is no `fsync`. The map's pages are
//! the file's page cache, so a killed process's lines survive it; a lost
//! machine loses them, and its leases are closed as lost (their credits
//! stay spent: no call is ever free). The reserved blocks are why a full
//! disk refuses a new segment (leased calls then go to Redis) instead of
//! failing a page of the map with `SIGBUS`.
//!
//! Past the last line a segment holds zeros. A process killed in the middle
//! of a copy can leave a line with zeros in it: readers take a NUL as the
//! end of a segment's lines.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use memmap2::MmapMut;

use crate::domain::{ActionId, ModuleId, PlanId, RequestId, UserId};
use crate::ledger::Call;
use crate::ledger::event::{day, escape_field, unescape};
use crate::metering::rows::integer;

/// One parsed line.
pub enum Line<'a> {
    Lease { lease: &'a str, user: Cow<'a, str> },
    Spend(Call<'a>),
    Settled { lease: &'a str },
}

impl std::fmt::Debug for Line<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Line::Lease { lease, user } => write!(f, "Lease({lease}, {user})"),
            Line::Spend(call) => write!(f, "Spend({})", call.event_id),
            Line::Settled { lease } => write!(f, "Settled({lease})"),
        }
    }
}

pub fn lease_line(lease: &str, user: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(lease.len() + user.len() + 4);
    out.extend_from_slice(b"L\t");
    out.extend_from_slice(lease.as_bytes());
    out.push(b'\t');
    escape_field(&mut out, user);
    out.push(b'\n');
    out
}

pub fn settled_line(lease: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(lease.len() + 3);
    out.extend_from_slice(b"X\t");
    out.extend_from_slice(lease.as_bytes());
    out.push(b'\n');
    out
}

/// A call spent from (or given back to) a lease: what its ledger row needs.
/// Its ids are typed: users, modules, actions and plans are kept by their
/// types to characters a line never escapes, and the event id, the lease
/// id and the day are ours, so only the request id (any visible ASCII,
/// backslash included) goes through [`escape_field`].
pub struct Spend<'a> {
    pub event_id: &'a str,
    pub lease: &'a str,
    pub user: &'a UserId,
    /// "charge" or "refund".
    pub kind: &'a str,
    pub module: &'a ModuleId,
    pub action: Option<&'a ActionId>,
    pub amount: i64,
    pub from_monthly: i64,
    pub from_bonus: i64,
    pub plan: &'a PlanId,
    pub request_id: &'a RequestId,
    pub actor: &'a str,
    pub at_ms: i64,
    /// `YYYY-MM-DD`, the local day it counts for.
    pub day: &'a str,
}

/// The `S` line of a spend, written straight from borrowed parts: this
/// runs for every leased call.
pub fn spend_line(s: &Spend<'_>) -> Vec<u8> {
    // Sized for the whole line: 192 bytes were short of a usual line, and
    // growing it cost a reallocation and a copy (about 400 instructions).
    // The slack covers the tabs, the numbers and the request id's escapes.
    let text = s.event_id.len()
        + s.lease.len()
        + s.user.as_str().len()
        + s.kind.len()
        + s.module.as_str().len()
        + s.action.map_or(0, |a| a.as_str().len())
        + s.plan.as_str().len()
        + s.request_id.as_str().len()
        + s.actor.len()
        + s.day.len();
    let mut out = Vec::with_capacity(text + 128);
    out.push(b'S');
    for v in [
        s.event_id,
        s.lease,
        s.user.as_str(),
        s.kind,
        s.module.as_str(),
        s.action.map_or("", ActionId::as_str),
    ] {
        out.push(b'\t');
        out.extend_from_slice(v.as_bytes());
    }
    let mut n = itoa::Buffer::new();
    for v in [s.amount, s.from_monthly, s.from_bonus] {
        out.push(b'\t');
        out.extend_from_slice(n.format(v).as_bytes());
    }
    out.push(b'\t');
    out.extend_from_slice(s.plan.as_str().as_bytes());
    out.push(b'\t');
    escape_field(&mut out, s.request_id.as_str());
    out.push(b'\t');
    out.extend_from_slice(s.actor.as_bytes());
    out.push(b'\t');
    out.extend_from_slice(n.format(s.at_ms).as_bytes());
    out.push(b'\t');
    out.extend_from_slice(s.day.as_bytes());
    out.push(b'\n');
    out
}

/// Parses one line (without its newline). `shard` places the event's
/// roll-up rows, as the flusher's do. Fields are cut in one pass and text
/// is borrowed unless it holds an escape: the reader runs this for every
/// leased call.
pub fn parse_line(line: &str, shard: impl Fn(&str) -> i16) -> Result<Line<'_>, String> {
    const MOST: usize = 15;
    let mut f = [""; MOST];
    let Some((n, escaped)) = fields(line, &mut f) else {
        return Err(not_a_line(line));
    };
    // Most lines have no escape: their text is their fields' values.
    let unescape = |field| {
        if escaped {
            unescape(field)
        } else {
            Cow::Borrowed(field)
        }
    };
    match (f[0], n) {
        ("L", 3) => Ok(Line::Lease {
            lease: f[1],
            user: unescape(f[2]),
        }),
        ("X", 2) => Ok(Line::Settled { lease: f[1] }),
        ("S", MOST) => {
            let number =
                |name: &str, v: &str| integer(v.as_bytes()).ok_or_else(|| format!("{name}: {v:?}"));
            let charge = match f[4] {
                "charge" => true,
                "refund" => false,
                other => return Err(format!("unknown spend kind {other:?}")),
            };
            if f[5].is_empty() {
                return Err("a spend without a module".to_owned());
            }
            let t = number("t", f[13])?;
            let user = unescape(f[3]);
            let shard = shard(&user);
            Ok(Line::Spend(Call {
                escaped,
                event_id: f[1],
                user,
                charge,
                module: unescape(f[5]),
                action: f[6],
                amount: number("amount", f[7])?,
                from_monthly: number("from monthly", f[8])?,
                from_bonus: number("from bonus", f[9])?,
                plan: f[10],
                request_id: f[11],
                actor: f[12],
                day: day(f[14]).ok_or_else(|| format!("day {:?}", f[14]))?,
                at: DateTime::<Utc>::from_timestamp_millis(t)
                    .ok_or_else(|| format!("t out of range: {t}"))?,
                lease: f[2],
                shard,
            }))
        }
        _ => Err(not_a_line(line)),
    }
}

/// Cuts `line` at its tabs into `f`, and tells whether it holds a
/// backslash (an escape), in one pass of eight bytes at a time: a line's
/// fields are short, and `memchr2_iter` paid its set-up again for each of
/// the fifteen (about 1,000 instructions a line, the spend log's reader
/// runs this for every leased call). `None` when there are more fields
/// than `f` holds.
fn fields<'a, const N: usize>(line: &'a str, f: &mut [&'a str; N]) -> Option<(usize, bool)> {
    /// 0x80 in each byte of `x` that is zero, and nothing else: exact, with
    /// no borrow from one byte into the next.
    fn zeros(x: u64) -> u64 {
        const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
        !(((x & LOW7) + LOW7) | x | LOW7)
    }
    const ONES: u64 = 0x0101_0101_0101_0101;
    let bytes = line.as_bytes();
    let (mut n, mut start, mut escaped) = (0, 0, false);
    let mut cut = |end: usize, n: &mut usize, start: &mut usize| {
        let slot = f.get_mut(*n)?;
        *slot = line.get(*start..end)?;
        (*n, *start) = (*n + 1, end + 1);
        Some(())
    };
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in words.by_ref() {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        let w = u64::from_le_bytes(eight);
        escaped |= zeros(w ^ (ONES * u64::from(b'\\'))) != 0;
        let mut tabs = zeros(w ^ (ONES * u64::from(b'\t')));
        while tabs != 0 {
            cut(at + tabs.trailing_zeros() as usize / 8, &mut n, &mut start)?;
            tabs &= tabs - 1;
        }
        at += 8;
    }
    for (i, &b) in words.remainder().iter().enumerate() {
        match b {
            b'\t' => cut(at + i, &mut n, &mut start)?,
            b'\\' => escaped = true,
            _ => {}
        }
    }
    cut(bytes.len(), &mut n, &mut start)?;
    Some((n, escaped))
}

fn not_a_line(line: &str) -> String {
    format!(
        "not a spend log line: {:?}",
        line.chars().take(80).collect::<String>()
    )
}

/// A worker's log files, named after its instance id.
#[derive(Clone, Debug)]
pub struct Files {
    pub dir: PathBuf,
    pub instance: String,
}

impl Files {
    pub fn segment(&self, seq: u64) -> PathBuf {
        self.dir
            .join(format!("spend-{}-{seq:08}.log", self.instance))
    }

    pub fn lock(&self) -> PathBuf {
        self.dir.join(format!("spend-{}.lock", self.instance))
    }

    /// The sequence numbers of this instance's segments on disk, in order.
    pub fn segments(&self) -> io::Result<Vec<u64>> {
        let prefix = format!("spend-{}-", self.instance);
        let mut seqs: Vec<u64> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_prefix(&prefix)?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// Instances with files in `dir` (their own or dead workers').
    pub fn instances(dir: &Path) -> io::Result<Vec<String>> {
        let mut found: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let rest = name.strip_prefix("spend-")?;
                let id = rest
                    .strip_suffix(".lock")
                    .or_else(|| rest.strip_suffix(".log")?.rsplit_once('-').map(|(i, _)| i))?;
                Some(id.to_owned())
            })
            .collect();
        found.sort_unstable();
        found.dedup();
        Ok(found)
    }
}

/// A place in a worker's log: its segment and the byte offset after a
/// line, as one ordered number (a segment never reaches 2^40 bytes).
pub type Position = u64;

const OFFSET_BITS: u32 = 40;

pub fn position(segment: u64, offset: u64) -> Position {
    (segment << OFFSET_BITS) | offset
}

/// A position's segment and offset, as [`position`] joined them.
pub fn split(at: Position) -> (u64, u64) {
    (at >> OFFSET_BITS, at & ((1 << OFFSET_BITS) - 1))
}

/// The appending side, cheap to clone.
#[derive(Clone)]
pub struct SpendLog {
    writer: Arc<Mutex<Writer>>,
    /// The end of the last whole line: what a reader of the live log may
    /// read (a line being copied is beyond it).
    published: Arc<AtomicU64>,
}

impl SpendLog {
    /// Creates the log's lock file and, if it can, its first segment.
    /// The returned lock file must live as long as the log: while it is
    /// held, no other process takes these files for a dead worker's.
    /// A line that does not fit a segment of `segment_bytes` starts the
    /// next one.
    pub fn start(files: &Files, segment_bytes: u64) -> io::Result<(SpendLog, File)> {
        std::fs::create_dir_all(&files.dir)?;
        // Locked before it has its name: another gateway looking for dead
        // workers' logs never finds this one's lock file free.
        let unnamed = files.dir.join(format!("spend-{}.lock.new", files.instance));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&unnamed)?;
        lock.try_lock()
            .map_err(|e| io::Error::other(format!("{}: {e}", unnamed.display())))?;
        std::fs::rename(&unnamed, files.lock())?;
        let mut writer = Writer {
            files: files.clone(),
            size: segment_bytes,
            segment: None,
            next_seq: 0,
            retry_at: None,
        };
        // No first segment (a full disk, say) is no reason not to serve:
        // leased calls go to Redis until one can be started.
        writer.start_segment();
        Ok((
            SpendLog {
                published: Arc::new(AtomicU64::new(position(0, 0))),
                writer: Arc::new(Mutex::new(writer)),
            },
            lock,
        ))
    }

    /// Appends `line` (one whole line, newline included): where it ends,
    /// or `None` when it could not be written (the caller must then not
    /// count on it).
    pub fn write(&self, line: &[u8]) -> Option<Position> {
        let len = line.len() as u64;
        // A NUL would end the segment's lines for its readers. Lines hold
        // validated ids and numbers, so this is a guard, not a path.
        if len == 0 || memchr::memchr(0, line).is_some() {
            return None;
        }
        // A panic while holding it leaves the segment as it was: go on.
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if len > writer.size {
            return None;
        }
        let full = writer
            .segment
            .as_ref()
            .is_none_or(|s| s.len + len > writer.size);
        if full && !writer.start_segment() {
            return None;
        }
        let segment = writer.segment.as_mut()?;
        let start = usize::try_from(segment.len).ok()?;
        segment.map[start..start + line.len()].copy_from_slice(line);
        segment.len += len;
        let end = position(segment.seq, segment.len);
        self.published.store(end, Ordering::Release);
        Some(end)
    }

    /// Where the last whole line ends, for the live log's reader.
    pub fn published(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.published)
    }
}

struct Writer {
    files: Files,
    /// Every segment's size.
    size: u64,
    /// Where lines go; `None` until one could be started.
    segment: Option<Segment>,
    next_seq: u64,
    /// After a segment could not be started: when to try again (once a
    /// second, not at every call).
    retry_at: Option<Instant>,
}

impl Writer {
    /// Starts the next segment; false if it cannot be, or was tried less
    /// than a second ago.
    fn start_segment(&mut self) -> bool {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        match Segment::create(&self.files, self.next_seq, self.size) {
            Ok(next) => {
                self.segment = Some(next);
                self.next_seq += 1;
                self.retry_at = None;
                true
            }
            Err(error) => {
                tracing::error!(%error, "spend log: cannot start a segment; leased calls fall back to Redis");
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                false
            }
        }
    }
}

struct Segment {
    seq: u64,
    map: MmapMut,
    len: u64,
}

impl Segment {
    /// A new segment file, its blocks reserved and mapped. Never an
    /// existing file (`create_new`): only the process that started a
    /// segment ever writes into it.
    fn create(files: &Files, seq: u64, size: u64) -> io::Result<Self> {
        let path = files.segment(seq);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let reserve = || -> io::Result<MmapMut> {
            let bytes = libc::off_t::try_from(size).map_err(io::Error::other)?;
            // SAFETY: a plain call on a file descriptor this function owns.
            match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, bytes) } {
                0 => {}
                errno => return Err(io::Error::from_raw_os_error(errno)),
            }
            // SAFETY: the file is this process's own, created above, never
            // truncated while mapped; other processes only read it (a
            // gateway replaying a dead worker's log takes it only once this
            // one's lock is free, that is, once this process is gone).
            unsafe { MmapMut::map_mut(&file) }
        };
        match reserve() {
            Ok(map) => Ok(Self { seq, map, len: 0 }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The eight-bytes-at-a-time cut against `str::split`, for tabs and
    /// backslashes at every position around the words' edges, empty fields,
    /// non-ASCII text and too many fields.
    #[test]
    fn fields_are_the_lines_split_at_its_tabs() {
        let mut lines: Vec<String> = vec![
            String::new(),
            "\t".into(),
            "\t\t\t".into(),
            "S\té\t\\t\tx".into(),
        ];
        for len in 0..40 {
            for at in 0..len {
                let mut bytes = vec![b'a'; len];
                bytes[at] = b'\t';
                lines.push(String::from_utf8(bytes.clone()).expect("ascii"));
                bytes[(at * 7) % len] = b'\\';
                lines.push(String::from_utf8(bytes).expect("ascii"));
            }
        }
        for line in &lines {
            let mut f = [""; 4];
            let want: Vec<&str> = line.split('\t').collect();
            match fields(line, &mut f) {
                Some((n, escaped)) => {
                    assert_eq!(&f[..n], &want[..], "{line:?}");
                    assert_eq!(escaped, line.contains('\\'), "{line:?}");
                }
                None => assert!(want.len() > 4, "{line:?}"),
            }
            let mut wide = [""; 64];
            let (n, _) = fields(line, &mut wide).expect("64 fields are enough");
            assert_eq!(&wide[..n], &want[..], "{line:?}");
        }
    }

    /// A test's own spend log directory (removed at its end).
    fn temp_files() -> Files {
        Files {
            dir: std::env::temp_dir().join(format!("cg-spend-{}", uuid::Uuid::now_v7())),
            instance: "test".into(),
        }
    }

    #[test]
    fn lines_are_copied_into_reserved_segments_and_published_after_the_copy() {
        let files = temp_files();
        // Three 10-byte lines fit a 32-byte segment; the fourth starts
        // the next one.
        let (log, _lock) = SpendLog::start(&files, 32).expect("start");
        let published = log.published();
        let mut ends = Vec::new();
        for i in 0..4 {
            let line = format!("X\tlease-{i}\n");
            assert_eq!(line.len(), 10);
            ends.push(log.write(line.as_bytes()).expect("written"));
            assert_eq!(
                published.load(Ordering::Acquire),
                *ends.last().expect("end")
            );
        }
        assert_eq!(
            ends,
            [
                position(0, 10),
                position(0, 20),
                position(0, 30),
                position(1, 10)
            ]
        );
        assert_eq!(files.segments().expect("segments"), [0, 1]);
        let first = std::fs::read(files.segment(0)).expect("read");
        assert_eq!(first.len(), 32, "the whole segment is reserved");
        assert_eq!(&first[..30], b"X\tlease-0\nX\tlease-1\nX\tlease-2\n");
        assert_eq!(&first[30..], [0, 0], "zeros past the last line");
        let second = std::fs::read(files.segment(1)).expect("read");
        assert_eq!(&second[..10], b"X\tlease-3\n");
        // A line larger than a segment is refused, not split; one with a
        // NUL, which would end the segment for its readers, too.
        assert_eq!(log.write(&[b'x'; 40]), None);
        assert_eq!(log.write(b"X\tl\0\n"), None);
        assert_eq!(published.load(Ordering::Acquire), position(1, 10));
        let _ = std::fs::remove_dir_all(&files.dir);
    }

    #[test]
    fn a_segment_that_cannot_be_started_fails_writes_not_the_start_and_is_tried_again() {
        let files = temp_files();
        std::fs::create_dir_all(&files.dir).expect("dir");
        // A file in the first segment's place: it is never reused, so the
        // segment cannot be started (as on a full disk).
        std::fs::write(files.segment(0), b"").expect("squat");
        let (log, _lock) = SpendLog::start(&files, 4096).expect("starts anyway");
        assert_eq!(log.write(b"X\tl\n"), None);
        std::fs::remove_file(files.segment(0)).expect("unsquat");
        // Not tried again at every call: a second later.
        assert_eq!(log.write(b"X\tl\n"), None);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(log.write(b"X\tl\n"), Some(position(0, 4)));
        let _ = std::fs::remove_dir_all(&files.dir);
    }

    #[test]
    fn a_spend_line_reads_back_as_its_event() {
        let (user, module, plan) = (
            UserId::parse("alice@x").expect("user"),
            ModuleId::parse("rag").expect("module"),
            PlanId::parse("pro").expect("plan"),
        );
        let request_id = RequestId::parse("req\\with\\\\backslashes\\t").expect("request id");
        let spend = Spend {
            event_id: "ev-1",
            lease: "ev-0:lease",
            user: &user,
            kind: "charge",
            module: &module,
            action: None,
            amount: 3,
            from_monthly: 2,
            from_bonus: 1,
            plan: &plan,
            request_id: &request_id,
            actor: "proxy",
            at_ms: 1_795_900_000_123,
            day: "2026-11-29",
        };
        let line = spend_line(&spend);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let text = std::str::from_utf8(&line).expect("utf8");
        let parsed = parse_line(text.trim_end_matches('\n'), |_| 7).expect("parses");
        let Line::Spend(c) = parsed else {
            panic!("{parsed:?}");
        };
        assert_eq!(
            (c.event_id, &*c.user, c.charge, &*c.module, c.action),
            ("ev-1", "alice@x", true, "rag", "")
        );
        assert_eq!((c.amount, c.from_monthly, c.from_bonus), (3, 2, 1));
        // Text fields stay as the line holds them, escaped as COPY reads them.
        assert_eq!(c.request_id, "req\\\\with\\\\\\\\backslashes\\\\t");
        assert!(c.escaped);
        assert_eq!(unescape(c.request_id), request_id.as_str());
        assert_eq!((c.plan, c.actor, c.lease), ("pro", "proxy", "ev-0:lease"));
        assert_eq!(c.day.to_string(), "2026-11-29");
        assert_eq!(c.at.timestamp_millis(), 1_795_900_000_123);
        assert_eq!(c.shard, 7);
        let lease = lease_line("ev-0:lease", "alice@x");
        assert!(matches!(
            parse_line(std::str::from_utf8(&lease).expect("utf8").trim_end(), |_| 0),
            Ok(Line::Lease { lease: "ev-0:lease", user }) if user == "alice@x"
        ));
        assert!(matches!(
            parse_line("X\tev-0:lease", |_| 0),
            Ok(Line::Settled {
                lease: "ev-0:lease"
            })
        ));
        for bad in [
            "",
            "S\tshort",
            "Q\tx",
            "S\te\tl\tu\tgrant\trag\t\t1\t1\t0\tp\tr\tproxy\t1\t2026-11-29",
            "S\te\tl\tu\tcharge\t\t\t1\t1\t0\tp\tr\tproxy\t1\t2026-11-29",
            "S\te\tl\tu\tcharge\trag\t\tx\t1\t0\tp\tr\tproxy\t1\t2026-11-29",
            "S\te\tl\tu\tcharge\trag\t\t1\t1\t0\tp\tr\tproxy\t1\t2026-11-31",
        ] {
            assert!(parse_line(bad, |_| 0).is_err(), "{bad:?}");
        }
    }
}
