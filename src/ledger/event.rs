//! One usage event, as the Lua scripts write it to a stream and as the
//! ledger stores it.
//!
//! Two formats reach a stream. charge.lua, which writes nearly every
//! event, writes rows (field `rows`): one line per event, [`ROW_FIELDS`]
//! tab-separated fields, text escaped as `COPY` text is (`\\`, `\t`, `\n`,
//! `\r`), an empty field for an absent value. Reading a row is splitting a
//! line: events borrow their text from the entry. The rarer scripts
//! (refund, grant, reset) write JSON (field `v`), one object or an array,
//! which is also what entries queued by an older gateway hold.

use std::borrow::Cow;

use chrono::{DateTime, NaiveDate, Utc};

pub use crate::metering::rows::escape_field;
use crate::metering::rows::integer;

/// The kinds of event a usage stream carries (the scripts' `k` field).
/// Plan changes, blocks and unblocks are ledger rows too, but the admin
/// change writes them in its own transaction; they never pass a stream.
pub const STREAM_KINDS: [&str; 7] = [
    "charge",
    "refund",
    "grant",
    "reset",
    "lease",
    "lease_return",
    "lease_lost",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerEvent<'a> {
    pub event_id: Cow<'a, str>,
    pub user_id: Cow<'a, str>,
    /// One of [`STREAM_KINDS`].
    pub kind: &'static str,
    pub module: Option<Cow<'a, str>>,
    pub action: Option<Cow<'a, str>>,
    pub amount: i64,
    pub from_monthly: i64,
    pub from_bonus: i64,
    /// The balance after the event; `None` for a call spent from a lease,
    /// whose credits left the balance with the lease.
    pub monthly_after: Option<i64>,
    pub bonus_after: Option<i64>,
    pub plan: Option<Cow<'a, str>>,
    pub request_id: Option<Cow<'a, str>>,
    pub actor: Cow<'a, str>,
    pub local_day: NaiveDate,
    pub occurred_at: DateTime<Utc>,
    pub stream_ms: i64,
    pub stream_seq: i64,
    /// The account's period, day and day counter after the event.
    pub account_period: Cow<'a, str>,
    pub account_day: Cow<'a, str>,
    pub account_day_used: i64,
    pub reason: Option<Cow<'a, str>>,
    /// The lease the event belongs to: a lease's own events (its id is the
    /// `lease` event's id; `lease_return` and `lease_lost` append `:return`
    /// and `:lost`), and the calls spent from it.
    pub lease_id: Option<Cow<'a, str>>,
    /// The shard whose stream carried the event (0 when unknown): spreads
    /// the everyone-wide roll-up rows over the flusher workers.
    pub shard: i16,
}

/// Events of one stream entry (a call's charges) are numbered within it:
/// an event's position is `(ms, seq * EVENTS_PER_ENTRY + i)`, which keeps
/// stream order and gives every event its own place.
pub const EVENTS_PER_ENTRY: i64 = 1024;

/// The fields of a row, in order. The last seven are what every event of
/// one charge shares, written once per charge by the gateway.
pub const ROW_FIELDS: [&str; 19] = [
    "e", "k", "p", "m", "a", "n", "fm", "fb", "mb", "bb", "au", "why", "u", "r", "by", "t", "d",
    "ap", "ad",
];

/// Splits a stream entry id `"<ms>-<seq>"`.
pub fn parse_entry_id(id: &str) -> Option<(i64, i64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// `YYYY-MM-DD`, exactly. chrono's format-string parser cost 800
/// instructions per event, 6 % of reading one (examples/parse_cost.rs).
pub(crate) fn day(text: &str) -> Option<NaiveDate> {
    let b = text.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b.get(r)?.iter().try_fold(0u32, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year = i32::try_from(digits(0..4)?).ok()?;
    NaiveDate::from_ymd_opt(year, digits(5..7)?, digits(8..10)?)
}

/// A row's text field as its value: borrowed unless it holds an escape or
/// a NUL (Postgres text cannot hold NUL, and one unstorable event must
/// never stall the whole stream, so NULs become U+FFFD).
pub(crate) fn unescape(field: &str) -> Cow<'_, str> {
    // No early exit, as in `escape_field`: the test then compiles to a
    // vector loop, and almost every field has nothing to unescape.
    let maybe = field
        .bytes()
        .fold(false, |seen, b| seen | (b == b'\\') | (b == 0));
    if !maybe {
        return Cow::Borrowed(field);
    }
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('t') => out.push('\t'),
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some(other) => out.push(other),
                None => {}
            },
            '\0' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The JSON object a script writes as the entry's single field `v`.
#[derive(serde::Deserialize)]
struct Wire {
    e: String,
    u: String,
    k: String,
    #[serde(default)]
    p: String,
    #[serde(default)]
    m: String,
    #[serde(default)]
    a: String,
    n: i64,
    fm: i64,
    fb: i64,
    mb: i64,
    bb: i64,
    #[serde(default)]
    ap: String,
    #[serde(default)]
    ad: String,
    #[serde(default)]
    au: i64,
    #[serde(default)]
    r: String,
    by: String,
    t: i64,
    d: String,
    #[serde(default)]
    why: String,
}

fn clean(s: String) -> Cow<'static, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Owned(s)
    }
}

fn non_empty(s: String) -> Option<Cow<'static, str>> {
    (!s.is_empty()).then(|| clean(s))
}

fn kind(k: &str) -> Result<&'static str, String> {
    STREAM_KINDS
        .iter()
        .find(|&&known| known == k)
        .copied()
        .ok_or_else(|| format!("unknown kind {k:?}"))
}

/// The lease a lease event belongs to, from its id (see
/// [`LedgerEvent::lease_id`]).
fn lease_of<'s>(kind: &str, event_id: &'s str) -> Option<&'s str> {
    match kind {
        "lease" => Some(event_id),
        "lease_return" => event_id.strip_suffix(":return"),
        "lease_lost" => event_id.strip_suffix(":lost"),
        _ => None,
    }
}

/// The place of an entry's first event: its stream time, and its sequence
/// number scaled by [`EVENTS_PER_ENTRY`].
fn first_place(entry_id: &str) -> Result<(i64, i64), String> {
    let (stream_ms, stream_seq) =
        parse_entry_id(entry_id).ok_or_else(|| format!("bad entry id {entry_id}"))?;
    let base = stream_seq
        .checked_mul(EVENTS_PER_ENTRY)
        .ok_or_else(|| format!("entry sequence {stream_seq} out of range"))?;
    Ok((stream_ms, base))
}

impl LedgerEvent<'static> {
    /// Parses one JSON stream entry: one event (an object) or a call's
    /// events (an array). The error says what is wrong, and the entry then
    /// goes to `ledger_rejects` rather than blocking the stream.
    pub fn from_entry(entry_id: &str, v: Option<&[u8]>) -> Result<Vec<Self>, String> {
        let raw = v.ok_or("missing field v")?;
        let wires: Vec<Wire> = if raw.trim_ascii_start().starts_with(b"[") {
            serde_json::from_slice(raw).map_err(|e| format!("field v: {e}"))?
        } else {
            vec![serde_json::from_slice(raw).map_err(|e| format!("field v: {e}"))?]
        };
        if wires.is_empty() || wires.len() as i64 > EVENTS_PER_ENTRY {
            return Err(format!("{} events in one entry", wires.len()));
        }
        let (stream_ms, base) = first_place(entry_id)?;
        wires
            .into_iter()
            .zip(0..)
            .map(|(w, i)| Self::from_wire(w, stream_ms, base + i))
            .collect()
    }

    fn from_wire(w: Wire, stream_ms: i64, stream_seq: i64) -> Result<Self, String> {
        let kind = kind(&w.k)?;
        let local_day = day(&w.d).ok_or_else(|| format!("d is not a date: {:?}", w.d))?;
        let occurred_at = DateTime::<Utc>::from_timestamp_millis(w.t)
            .ok_or_else(|| "t is out of range".to_owned())?;
        if w.n < 0 {
            return Err("negative amount".into());
        }
        let lease_id = lease_of(kind, &w.e).map(|l| Cow::Owned(l.to_owned()));
        Ok(Self {
            event_id: clean(w.e),
            user_id: clean(w.u),
            kind,
            module: non_empty(w.m),
            action: non_empty(w.a),
            amount: w.n,
            from_monthly: w.fm,
            from_bonus: w.fb,
            monthly_after: Some(w.mb),
            bonus_after: Some(w.bb),
            plan: non_empty(w.p),
            request_id: non_empty(w.r),
            actor: clean(w.by),
            local_day,
            occurred_at,
            stream_ms,
            stream_seq,
            account_period: Cow::Owned(w.ap),
            account_day: Cow::Owned(w.ad),
            account_day_used: w.au,
            reason: non_empty(w.why),
            lease_id,
            shard: 0,
        })
    }
}

impl<'a> LedgerEvent<'a> {
    /// Parses one rows entry (field `rows`), borrowing its text. Errors
    /// as [`LedgerEvent::from_entry`].
    pub fn from_rows(entry_id: &str, rows: &'a [u8]) -> Result<Vec<Self>, String> {
        let rows = std::str::from_utf8(rows).map_err(|e| format!("field rows: {e}"))?;
        let (stream_ms, base) = first_place(entry_id)?;
        let mut events = Vec::new();
        for (line, i) in rows.split('\n').zip(0..) {
            if i == EVENTS_PER_ENTRY {
                return Err(format!("more than {EVENTS_PER_ENTRY} events in one entry"));
            }
            let event =
                Self::from_row(line, stream_ms, base + i).map_err(|e| format!("row {i}: {e}"))?;
            events.push(event);
        }
        Ok(events)
    }

    fn from_row(line: &'a str, stream_ms: i64, stream_seq: i64) -> Result<Self, String> {
        // One pass over the line, which memchr makes a vector search:
        // fields cut at tabs, and whether each holds anything to unescape.
        // `str::split` searched for every short field apart and cost twice
        // a byte loop, which cost twice this (examples/parse_cost.rs).
        let mut f = [""; ROW_FIELDS.len()];
        let mut plain = [true; ROW_FIELDS.len()];
        let (mut n, mut start, mut clean) = (0, 0, true);
        for i in memchr::memchr3_iter(b'\t', b'\\', 0, line.as_bytes()) {
            if line.as_bytes()[i] != b'\t' {
                clean = false;
                continue;
            }
            if n + 1 == f.len() {
                return Err(format!("more than {} fields", f.len()));
            }
            (f[n], plain[n]) = (&line[start..i], clean);
            (n, start, clean) = (n + 1, i + 1, true);
        }
        if n + 1 != f.len() {
            return Err(format!("{} fields, not {}", n + 1, f.len()));
        }
        (f[n], plain[n]) = (&line[start..], clean);
        let text = |i: usize| {
            if plain[i] {
                Cow::Borrowed(f[i])
            } else {
                unescape(f[i])
            }
        };
        let optional = |i: usize| (!f[i].is_empty()).then(|| text(i));
        let [_, k, _, _, _, n, fm, fb, mb, bb, au, _, _, _, _, t, d, _, _] = f;
        let number = |name: &str, v: &str| {
            integer(v.as_bytes()).ok_or_else(|| format!("{name} is not an integer: {v:?}"))
        };
        let amount = number("n", n)?;
        if amount < 0 {
            return Err("negative amount".into());
        }
        let t = number("t", t)?;
        let kind = kind(k)?;
        Ok(Self {
            event_id: text(0),
            user_id: text(12),
            kind,
            module: optional(3),
            action: optional(4),
            amount,
            from_monthly: number("fm", fm)?,
            from_bonus: number("fb", fb)?,
            monthly_after: Some(number("mb", mb)?),
            bonus_after: Some(number("bb", bb)?),
            plan: optional(2),
            request_id: optional(13),
            actor: text(14),
            local_day: day(d).ok_or_else(|| format!("d is not a date: {d:?}"))?,
            occurred_at: DateTime::<Utc>::from_timestamp_millis(t)
                .ok_or_else(|| "t is out of range".to_owned())?,
            stream_ms,
            stream_seq,
            account_period: text(17),
            account_day: text(18),
            account_day_used: if au.is_empty() { 0 } else { number("au", au)? },
            reason: optional(11),
            lease_id: match lease_of(kind, f[0]) {
                Some(_) if !plain[0] => return Err("a lease id holds an escape".into()),
                lease => lease.map(Cow::Borrowed),
            },
            shard: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHARGE: &str = r#"{"e":"ev-1","u":"alice","k":"charge","p":"free","m":"rag","a":"",
        "n":1,"fm":1,"fb":0,"mb":99,"bb":0,"ap":"2026-11","ad":"2026-11-26","au":1,
        "r":"req-1","by":"proxy","t":1795700000000,"d":"2026-11-26"}"#;

    fn entry(json: &str) -> Option<&[u8]> {
        Some(json.as_bytes())
    }

    fn one(entry_id: &str, json: &str) -> Result<LedgerEvent<'static>, String> {
        let mut all = LedgerEvent::from_entry(entry_id, entry(json))?;
        assert_eq!(all.len(), 1);
        Ok(all.remove(0))
    }

    #[test]
    fn days_are_exactly_iso_dates() {
        assert_eq!(day("2026-02-28"), NaiveDate::from_ymd_opt(2026, 2, 28));
        for bad in [
            "2026-02-30",
            "2026-2-28",
            "2026-02-28 ",
            "+026-02-28",
            "2026/02/28",
            "",
        ] {
            assert_eq!(day(bad), None, "{bad}");
        }
    }

    #[test]
    fn parses_a_charge_entry() {
        let e = one("1795700000000-3", CHARGE).expect("parse");
        assert_eq!(
            (e.stream_ms, e.stream_seq),
            (1_795_700_000_000, 3 * EVENTS_PER_ENTRY)
        );
        assert_eq!(e.kind, "charge");
        assert_eq!(e.action, None);
        assert_eq!(e.monthly_after, Some(99));
        assert_eq!(e.local_day.to_string(), "2026-11-26");
    }

    #[test]
    fn nul_bytes_cannot_make_an_event_unstorable() {
        let json = CHARGE.replace(
            r#""r":"req-1""#,
            r#""r":"r\u0000x","why":"bad\u0000reason""#,
        );
        let e = one("1-0", &json).expect("parse");
        assert_eq!(e.reason.as_deref(), Some("bad\u{FFFD}reason"));
        assert_eq!(e.request_id.as_deref(), Some("r\u{FFFD}x"));
    }

    /// ev-1 (alice) then ev-2 (bob), the two events of entry `…-5`, each
    /// in its own place.
    fn assert_alice_then_bob_of_entry_5(events: &[LedgerEvent<'_>]) {
        let places: Vec<_> = events
            .iter()
            .map(|e| (e.event_id.as_ref(), e.user_id.as_ref(), e.stream_seq))
            .collect();
        assert_eq!(
            places,
            [
                ("ev-1", "alice", 5 * EVENTS_PER_ENTRY),
                ("ev-2", "bob", 5 * EVENTS_PER_ENTRY + 1)
            ]
        );
    }

    #[test]
    fn a_calls_events_share_an_entry_in_order_each_with_its_place() {
        let second = CHARGE
            .replace("ev-1", "ev-2")
            .replace(r#""u":"alice""#, r#""u":"bob""#);
        let array = format!("[{CHARGE},{second}]");
        let events = LedgerEvent::from_entry("1795700000000-5", entry(&array)).expect("parse");
        assert_alice_then_bob_of_entry_5(&events);
        // Each place is after every place of the entry before.
        let before = one("1795700000000-4", CHARGE).expect("parse");
        assert!(before.stream_seq < events[0].stream_seq);
        assert!(LedgerEvent::from_entry("1-0", entry("[]")).is_err());
    }

    /// A charge row as charge.lua writes it, with the gateway's tail.
    const ROW: &str = "ev-1\tcharge\tfree\trag\t\t1\t1\t0\t99\t0\t1\t\talice\treq-1\tproxy\t1795700000000\t2026-11-26\t2026-11\t2026-11-26";

    #[test]
    fn a_row_reads_as_its_json_twin() {
        let rows = LedgerEvent::from_rows("1795700000000-3", ROW.as_bytes()).expect("row");
        assert_eq!(rows, vec![one("1795700000000-3", CHARGE).expect("json")]);
        assert!(
            matches!(rows[0].user_id, Cow::Borrowed(_)),
            "text is borrowed"
        );
    }

    #[test]
    fn row_fields_are_unescaped_and_nul_free() {
        let mut escaped = Vec::new();
        escape_field(&mut escaped, "a\\t\tb\nc\rd\\");
        assert_eq!(escaped, b"a\\\\t\\tb\\nc\\rd\\\\");
        let field = std::str::from_utf8(&escaped).expect("utf-8");
        assert_eq!(unescape(field), "a\\t\tb\nc\rd\\");
        let row = ROW
            .replace("req-1", &format!("{field}\0"))
            .replace("\tproxy\t", "\tpro\\\\xy\t");
        let e = &LedgerEvent::from_rows("1-0", row.as_bytes()).expect("row")[0];
        assert_eq!(e.request_id.as_deref(), Some("a\\t\tb\nc\rd\\\u{FFFD}"));
        assert_eq!(e.actor, "pro\\xy");
    }

    #[test]
    fn a_calls_rows_are_its_lines_in_order() {
        let second = ROW.replace("ev-1", "ev-2").replace("\talice\t", "\tbob\t");
        let rows = format!("{ROW}\n{second}");
        let events = LedgerEvent::from_rows("1795700000000-5", rows.as_bytes()).expect("rows");
        assert_alice_then_bob_of_entry_5(&events);
    }

    #[test]
    fn bad_rows_name_the_problem() {
        let cases = [
            (ROW.replace("\tcharge\t", "\tsteal\t"), "kind"),
            (ROW.replacen("\t1\t", "\tx\t", 1), "n is not an integer"),
            (ROW.replacen("\t1\t", "\t-1\t", 1), "negative"),
            (
                ROW.replace("\t2026-11-26\t", "\t2026-13-26\t"),
                "not a date",
            ),
            (ROW.replace("\tproxy", ""), "18 fields"),
            (format!("{ROW}\textra"), "more than 19"),
            (format!("{ROW}\n"), "row 1"),
            (
                ROW.replace("1795700000000", "99999999999999999999"),
                "t is not",
            ),
        ];
        for (row, problem) in cases {
            let error = LedgerEvent::from_rows("1-0", row.as_bytes()).expect_err(&row);
            assert!(error.contains(problem), "{row}: {error}");
        }
        assert!(LedgerEvent::from_rows("1-0", b"\xff").is_err());
        assert!(LedgerEvent::from_rows("nope", ROW.as_bytes()).is_err());
    }

    #[test]
    fn rejects_name_the_problem() {
        let bad = CHARGE.replace(r#""k":"charge""#, r#""k":"steal""#);
        assert!(
            LedgerEvent::from_entry("1-0", entry(&bad))
                .unwrap_err()
                .contains("kind")
        );
        let bad = CHARGE.replace(r#""u":"alice","#, "");
        assert!(
            LedgerEvent::from_entry("1-0", entry(&bad))
                .unwrap_err()
                .contains("`u`")
        );
        assert!(LedgerEvent::from_entry("nope", entry(CHARGE)).is_err());
        assert!(LedgerEvent::from_entry("1-0", None).is_err());
    }
}
