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
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::ledger::event::{LedgerEvent, escape_field};
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

/// A call spent from (or given back to) a lease, as its ledger row.
pub fn spend_line(e: &LedgerEvent<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"S");
    let text = |out: &mut Vec<u8>, v: &str| {
        out.push(b'\t');
        escape_field(out, v);
    };
    text(&mut out, &e.event_id);
    text(&mut out, e.lease_id.as_deref().unwrap_or(""));
    text(&mut out, &e.user_id);
    text(&mut out, e.kind);
    text(&mut out, e.module.as_deref().unwrap_or(""));
    text(&mut out, e.action.as_deref().unwrap_or(""));
    let mut n = itoa::Buffer::new();
    for v in [e.amount, e.from_monthly, e.from_bonus] {
        text(&mut out, n.format(v));
    }
    text(&mut out, e.plan.as_deref().unwrap_or(""));
    text(&mut out, e.request_id.as_deref().unwrap_or(""));
    text(&mut out, &e.actor);
    text(&mut out, n.format(e.occurred_at.timestamp_millis()));
    text(&mut out, &e.local_day.to_string());
    out.push(b'\n');
    out
}

/// Parses one line (without its newline). `shard` places the event's
/// roll-up rows, as the flusher's do.
pub fn parse_line(line: &str, shard: impl Fn(&str) -> i16) -> Result<Line<'_>, String> {
    let f: Vec<&str> = line.split('\t').collect();
    let text = unescape;
    match f.as_slice() {
        ["L", lease, user] => Ok(Line::Lease {
            lease,
            user: text(user),
        }),
        ["X", lease] => Ok(Line::Settled { lease }),
        [
            "S",
            event,
            lease,
            user,
            kind,
            module,
            action,
            amount,
            fm,
            fb,
            plan,
            request,
            actor,
            t,
            day,
        ] => {
            let number =
                |name: &str, v: &str| integer(v.as_bytes()).ok_or_else(|| format!("{name}: {v:?}"));
            let kind = match *kind {
                "charge" => "charge",
                "refund" => "refund",
                other => return Err(format!("unknown spend kind {other:?}")),
            };
            let t = number("t", t)?;
            let user = text(user);
            let shard = shard(&user);
            fn optional(s: &str) -> Option<Cow<'_, str>> {
                (!s.is_empty()).then(|| unescape(s))
            }
            Ok(Line::Spend(Box::new(LedgerEvent {
                event_id: text(event),
                kind,
                module: optional(module),
                action: optional(action),
                amount: number("amount", amount)?,
                from_monthly: number("from monthly", fm)?,
                from_bonus: number("from bonus", fb)?,
                monthly_after: None,
                bonus_after: None,
                plan: optional(plan),
                request_id: optional(request),
                actor: text(actor),
                local_day: NaiveDate::parse_from_str(day, "%Y-%m-%d")
                    .map_err(|e| format!("day {day:?}: {e}"))?,
                occurred_at: DateTime::<Utc>::from_timestamp_millis(t)
                    .ok_or_else(|| format!("t out of range: {t}"))?,
                stream_ms: t,
                stream_seq: 0,
                account_period: Cow::Borrowed(""),
                account_day: Cow::Borrowed(""),
                account_day_used: 0,
                reason: None,
                lease_id: Some(text(lease)),
                user_id: user,
                shard,
            })))
        }
        _ => Err(format!(
            "not a spend log line: {:?}",
            line.chars().take(80).collect::<String>()
        )),
    }
}

fn unescape(field: &str) -> Cow<'_, str> {
    if !field.contains('\\') {
        return Cow::Borrowed(field);
    }
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    Cow::Owned(out)
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
    written: Option<oneshot::Sender<bool>>,
}

/// The appending side, cheap to clone.
#[derive(Clone)]
pub struct SpendLog {
    tx: mpsc::Sender<Append>,
}

impl SpendLog {
    /// Creates this worker's lock and first segment and starts its writer
    /// on the current runtime. `appended` is notified after each write.
    /// The returned lock file must live as long as the log: while it is
    /// held, no other process takes these files for a dead worker's.
    pub fn start(files: &Files, appended: Arc<Notify>) -> io::Result<(SpendLog, File)> {
        std::fs::create_dir_all(&files.dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(files.lock())?;
        lock.try_lock()
            .map_err(|e| io::Error::other(format!("{}: {e}", files.lock().display())))?;
        let segment = Segment::create(files.clone(), 0)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(rx, segment, appended));
        Ok((SpendLog { tx }, lock))
    }

    /// Appends `line` and waits until it is written: false when it could
    /// not be (the caller must then not count on it).
    pub async fn write(&self, line: Vec<u8>) -> bool {
        let (written, done) = oneshot::channel();
        let append = Append {
            line,
            written: Some(written),
        };
        if self.tx.send(append).await.is_err() {
            return false;
        }
        done.await.unwrap_or(false)
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

async fn write(mut rx: mpsc::Receiver<Append>, mut segment: Segment, appended: Arc<Notify>) {
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
        for a in &batch {
            buf.extend_from_slice(&a.line);
        }
        let ok = match segment.append(&buf) {
            Ok(()) => true,
            Err(error) => {
                tracing::error!(%error, "spend log: write failed; leased calls fall back to Redis");
                false
            }
        };
        for a in batch.drain(..) {
            if let Some(w) = a.written {
                let _ = w.send(ok);
            }
        }
        if segment.len >= SEGMENT_BYTES {
            match Segment::create(segment.files.clone(), segment.seq + 1) {
                Ok(next) => segment = next,
                Err(error) => tracing::error!(%error, "spend log: cannot start a new segment"),
            }
        }
        appended.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spend_line_reads_back_as_its_event() {
        let event = LedgerEvent {
            event_id: "ev-1".into(),
            user_id: "alice@x".into(),
            kind: "charge",
            module: Some("rag".into()),
            action: None,
            amount: 3,
            from_monthly: 2,
            from_bonus: 1,
            monthly_after: None,
            bonus_after: None,
            plan: Some("pro".into()),
            request_id: Some("req\twith\\tab\nand newline".into()),
            actor: "proxy".into(),
            local_day: NaiveDate::from_ymd_opt(2026, 11, 29).expect("day"),
            occurred_at: DateTime::<Utc>::from_timestamp_millis(1_795_900_000_123).expect("t"),
            stream_ms: 1_795_900_000_123,
            stream_seq: 0,
            account_period: "".into(),
            account_day: "".into(),
            account_day_used: 0,
            reason: None,
            lease_id: Some("ev-0:lease".into()),
            shard: 7,
        };
        let line = spend_line(&event);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let text = std::str::from_utf8(&line).expect("utf8");
        let parsed = parse_line(text.trim_end_matches('\n'), |_| 7).expect("parses");
        match parsed {
            Line::Spend(back) => assert_eq!(*back, event),
            other => panic!("{other:?}"),
        }
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
