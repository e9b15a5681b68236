//! The spend log: the only copy of a leased call's event until Postgres
//! has it, and of which leases a gateway holds until it settles them.
//!
//! One per worker, a sequence of segment files
//! `spend-<instance>-<seq>.log` beside a lock file `spend-<instance>.lock`
//! that the worker holds while it lives. Lines, tab-separated, text escaped
//! as the usage rows are (`\\ \t \n \r`):
//!
//! ```text
//! L <lease id> <user>                                   a lease taken (before any of its calls)
//! S <event> <lease> <user> <kind> <module> <action> <amount> <from monthly> <from bonus>
//!   <plan> <request id> <actor> <unix ms> <day>          a call spent (charge) or given back (refund)
//! X <lease id>                                          the lease settled in Redis
//! ```
//!
//! Appends that arrive while one is written share the next `write(2)`;
//! there is no `fsync`. A killed process's writes are in the page cache and
//! survive it; a lost machine loses them, and its leases are closed as lost
//! (their credits stay spent: no call is ever free).

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::ledger::event::{LedgerEvent, day, escape_field, unescape};
use crate::metering::rows::integer;

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// Appends waiting for the writer; past this, appenders wait.
const QUEUE: usize = 16 * 1024;

/// One parsed line.
#[derive(Debug)]
pub enum Line<'a> {
    Lease { lease: &'a str, user: Cow<'a, str> },
    Spend(Box<LedgerEvent<'a>>),
    Settled { lease: &'a str },
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
pub struct Spend<'a> {
    pub event_id: &'a str,
    pub lease: &'a str,
    pub user: &'a str,
    /// "charge" or "refund".
    pub kind: &'a str,
    pub module: &'a str,
    pub action: &'a str,
    pub amount: i64,
    pub from_monthly: i64,
    pub from_bonus: i64,
    pub plan: &'a str,
    pub request_id: &'a str,
    pub actor: &'a str,
    pub at_ms: i64,
    /// `YYYY-MM-DD`, the local day it counts for.
    pub day: &'a str,
}

/// The `S` line of a spend, written straight from borrowed parts: this
/// runs for every leased call.
pub fn spend_line(s: &Spend<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    out.push(b'S');
    for v in [s.event_id, s.lease, s.user, s.kind, s.module, s.action] {
        out.push(b'\t');
        escape_field(&mut out, v);
    }
    let mut n = itoa::Buffer::new();
    for v in [s.amount, s.from_monthly, s.from_bonus] {
        out.push(b'\t');
        out.extend_from_slice(n.format(v).as_bytes());
    }
    for v in [s.plan, s.request_id, s.actor] {
        out.push(b'\t');
        escape_field(&mut out, v);
    }
    out.push(b'\t');
    out.extend_from_slice(n.format(s.at_ms).as_bytes());
    out.push(b'\t');
    escape_field(&mut out, s.day);
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
    let (mut n, mut start) = (0, 0);
    // One memchr pass: `str::split` searched for each short field apart.
    for end in memchr::memchr_iter(b'\t', line.as_bytes()).chain([line.len()]) {
        if n == MOST {
            return Err(not_a_line(line));
        }
        f[n] = &line[start..end];
        (n, start) = (n + 1, end + 1);
    }
    match (f[0], n) {
        ("L", 3) => Ok(Line::Lease {
            lease: f[1],
            user: unescape(f[2]),
        }),
        ("X", 2) => Ok(Line::Settled { lease: f[1] }),
        ("S", MOST) => {
            let number =
                |name: &str, v: &str| integer(v.as_bytes()).ok_or_else(|| format!("{name}: {v:?}"));
            let kind = match f[4] {
                "charge" => "charge",
                "refund" => "refund",
                other => return Err(format!("unknown spend kind {other:?}")),
            };
            fn optional(s: &str) -> Option<Cow<'_, str>> {
                (!s.is_empty()).then(|| unescape(s))
            }
            let t = number("t", f[13])?;
            let user = unescape(f[3]);
            let shard = shard(&user);
            Ok(Line::Spend(Box::new(LedgerEvent {
                event_id: unescape(f[1]),
                kind,
                module: optional(f[5]),
                action: optional(f[6]),
                amount: number("amount", f[7])?,
                from_monthly: number("from monthly", f[8])?,
                from_bonus: number("from bonus", f[9])?,
                monthly_after: None,
                bonus_after: None,
                plan: optional(f[10]),
                request_id: optional(f[11]),
                actor: unescape(f[12]),
                local_day: day(f[14]).ok_or_else(|| format!("day {:?}", f[14]))?,
                occurred_at: DateTime::<Utc>::from_timestamp_millis(t)
                    .ok_or_else(|| format!("t out of range: {t}"))?,
                stream_ms: t,
                stream_seq: 0,
                account_period: Cow::Borrowed(""),
                account_day: Cow::Borrowed(""),
                account_day_used: 0,
                reason: None,
                lease_id: Some(unescape(f[2])),
                user_id: user,
                shard,
            })))
        }
        _ => Err(not_a_line(line)),
    }
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

struct Append {
    line: Vec<u8>,
    written: oneshot::Sender<Option<Position>>,
}

/// A place in a worker's log: its segment and the byte offset after a
/// line, as one ordered number (a segment never reaches 2^40 bytes).
pub type Position = u64;

pub fn position(segment: u64, offset: u64) -> Position {
    (segment << 40) | offset
}

/// The appending side, cheap to clone.
#[derive(Clone)]
pub struct SpendLog {
    tx: mpsc::Sender<Append>,
}

impl SpendLog {
    /// Creates this worker's lock and first segment and starts its writer
    /// on the current runtime.
    /// The returned lock file must live as long as the log: while it is
    /// held, no other process takes these files for a dead worker's.
    pub fn start(files: &Files) -> io::Result<(SpendLog, File)> {
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
        let segment = Segment::create(files.clone(), 0)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(rx, segment));
        Ok((SpendLog { tx }, lock))
    }

    /// Appends `line` and waits until it is written: where it ends, or
    /// `None` when it could not be written (the caller must then not count
    /// on it).
    pub async fn write(&self, line: Vec<u8>) -> Option<Position> {
        let (written, done) = oneshot::channel();
        self.tx.send(Append { line, written }).await.ok()?;
        done.await.ok().flatten()
    }
}

struct Segment {
    files: Files,
    seq: u64,
    file: File,
    len: u64,
}

impl Segment {
    fn create(files: Files, seq: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(files.segment(seq))?;
        let len = file.metadata()?.len();
        Ok(Self {
            files,
            seq,
            file,
            len,
        })
    }

    /// Appends `buf` whole or not at all: a failed write is cut back, so a
    /// half line never sits before the next one.
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        match self.file.write_all(buf) {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                if self.file.set_len(self.len).is_err() {
                    // Cannot cut it back: leave it, start a new segment
                    // (the reader stops at the half line's segment end).
                    *self = Segment::create(self.files.clone(), self.seq + 1)?;
                }
                Err(e)
            }
        }
    }
}

async fn write(mut rx: mpsc::Receiver<Append>, mut segment: Segment) {
    let mut batch: Vec<Append> = Vec::new();
    let mut buf = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        buf.clear();
        let mut ends = Vec::with_capacity(batch.len());
        for a in &batch {
            buf.extend_from_slice(&a.line);
            ends.push(segment.len + buf.len() as u64);
        }
        let ok = match segment.append(&buf) {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, "spend log: write failed; leased calls fall back to Redis");
                false
            }
        };
        for (a, end) in batch.drain(..).zip(ends) {
            let _ = a.written.send(ok.then(|| position(segment.seq, end)));
        }
        if segment.len >= SEGMENT_BYTES {
            match Segment::create(segment.files.clone(), segment.seq + 1) {
                Ok(next) => segment = next,
                Err(error) => tracing::error!(%error, "spend log: cannot start a new segment"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spend_line_reads_back_as_its_event() {
        let spend = Spend {
            event_id: "ev-1",
            lease: "ev-0:lease",
            user: "alice@x",
            kind: "charge",
            module: "rag",
            action: "",
            amount: 3,
            from_monthly: 2,
            from_bonus: 1,
            plan: "pro",
            request_id: "req\twith\\tab\nand newline",
            actor: "proxy",
            at_ms: 1_795_900_000_123,
            day: "2026-11-29",
        };
        let line = spend_line(&spend);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let text = std::str::from_utf8(&line).expect("utf8");
        let parsed = parse_line(text.trim_end_matches('\n'), |_| 7).expect("parses");
        let Line::Spend(e) = parsed else {
            panic!("{parsed:?}");
        };
        assert_eq!(
            (
                &*e.event_id,
                &*e.user_id,
                e.kind,
                e.module.as_deref(),
                e.action.as_deref()
            ),
            ("ev-1", "alice@x", "charge", Some("rag"), None)
        );
        assert_eq!((e.amount, e.from_monthly, e.from_bonus), (3, 2, 1));
        assert_eq!((e.monthly_after, e.bonus_after), (None, None));
        assert_eq!(e.request_id.as_deref(), Some(spend.request_id));
        assert_eq!(e.lease_id.as_deref(), Some("ev-0:lease"));
        assert_eq!(e.local_day.to_string(), "2026-11-29");
        assert_eq!(e.occurred_at.timestamp_millis(), 1_795_900_000_123);
        assert_eq!(
            (e.stream_ms, e.shard, e.account_period.as_ref()),
            (1_795_900_000_123, 7, "")
        );
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
        ] {
            assert!(parse_line(bad, |_| 0).is_err(), "{bad:?}");
        }
    }
}
