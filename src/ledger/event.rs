//! One usage event, as the Lua scripts write it to a stream and as the
//! ledger stores it.

use chrono::{DateTime, NaiveDate, Utc};

pub const KINDS: [&str; 7] = [
    "charge",
    "refund",
    "grant",
    "reset",
    "plan_change",
    "block",
    "unblock",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerEvent {
    pub event_id: String,
    pub user_id: String,
    pub kind: String,
    pub module: Option<String>,
    pub action: Option<String>,
    pub amount: i64,
    pub from_monthly: i64,
    pub from_bonus: i64,
    pub monthly_after: i64,
    pub bonus_after: i64,
    pub plan: Option<String>,
    pub request_id: Option<String>,
    pub actor: String,
    pub local_day: NaiveDate,
    pub occurred_at: DateTime<Utc>,
    pub stream_ms: i64,
    pub stream_seq: i64,
    /// The account's period, day and day counter after the event.
    pub account_period: String,
    pub account_day: String,
    pub account_day_used: i64,
    pub reason: Option<String>,
    /// The shard whose stream carried the event (0 when unknown): spreads
    /// the everyone-wide roll-up rows over the flusher workers.
    pub shard: i16,
}

/// Events of one stream entry (a call's charges) are numbered within it:
/// an event's position is `(ms, seq * EVENTS_PER_ENTRY + i)`, which keeps
/// stream order and gives every event its own place.
pub const EVENTS_PER_ENTRY: i64 = 1024;

/// Splits a stream entry id `"<ms>-<seq>"`.
pub fn parse_entry_id(id: &str) -> Option<(i64, i64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// `YYYY-MM-DD`, exactly. chrono's format-string parser cost 800
/// instructions per event, 6 % of reading one (examples/parse_cost.rs).
fn day(text: &str) -> Option<NaiveDate> {
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

/// Postgres text cannot hold NUL, and one unstorable event must never
/// stall the whole stream, so NULs become U+FFFD.
fn clean(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then(|| clean(s))
}

impl LedgerEvent {
    /// Parses one stream entry: one event (a JSON object) or a call's
    /// events (a JSON array). The error says what is wrong, and the entry
    /// then goes to `ledger_rejects` rather than blocking the stream.
    pub fn from_entry(entry_id: &str, v: Option<&[u8]>) -> Result<Vec<Self>, String> {
        let (stream_ms, stream_seq) =
            parse_entry_id(entry_id).ok_or_else(|| format!("bad entry id {entry_id}"))?;
        let raw = v.ok_or("missing field v")?;
        let wires: Vec<Wire> = if raw.trim_ascii_start().starts_with(b"[") {
            serde_json::from_slice(raw).map_err(|e| format!("field v: {e}"))?
        } else {
            vec![serde_json::from_slice(raw).map_err(|e| format!("field v: {e}"))?]
        };
        if wires.is_empty() || wires.len() as i64 > EVENTS_PER_ENTRY {
            return Err(format!("{} events in one entry", wires.len()));
        }
        let base = stream_seq
            .checked_mul(EVENTS_PER_ENTRY)
            .ok_or_else(|| format!("entry sequence {stream_seq} out of range"))?;
        wires
            .into_iter()
            .zip(0..)
            .map(|(w, i)| Self::from_wire(w, stream_ms, base + i))
            .collect()
    }

    fn from_wire(w: Wire, stream_ms: i64, stream_seq: i64) -> Result<Self, String> {
        if !KINDS.contains(&w.k.as_str()) {
            return Err(format!("unknown kind {:?}", w.k));
        }
        let local_day = day(&w.d).ok_or_else(|| format!("d is not a date: {:?}", w.d))?;
        let occurred_at = DateTime::<Utc>::from_timestamp_millis(w.t)
            .ok_or_else(|| "t is out of range".to_owned())?;
        if w.n < 0 {
            return Err("negative amount".into());
        }
        Ok(Self {
            event_id: clean(w.e),
            user_id: clean(w.u),
            kind: w.k,
            module: non_empty(w.m),
            action: non_empty(w.a),
            amount: w.n,
            from_monthly: w.fm,
            from_bonus: w.fb,
            monthly_after: w.mb,
            bonus_after: w.bb,
            plan: non_empty(w.p),
            request_id: non_empty(w.r),
            actor: clean(w.by),
            local_day,
            occurred_at,
            stream_ms,
            stream_seq,
            account_period: w.ap,
            account_day: w.ad,
            account_day_used: w.au,
            reason: non_empty(w.why),
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

    fn one(entry_id: &str, json: &str) -> Result<LedgerEvent, String> {
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
        assert_eq!(e.monthly_after, 99);
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

    #[test]
    fn a_calls_events_share_an_entry_in_order_each_with_its_place() {
        let second = CHARGE
            .replace("ev-1", "ev-2")
            .replace(r#""u":"alice""#, r#""u":"bob""#);
        let array = format!("[{CHARGE},{second}]");
        let events = LedgerEvent::from_entry("1795700000000-5", entry(&array)).expect("parse");
        let places: Vec<_> = events
            .iter()
            .map(|e| (e.event_id.as_str(), e.user_id.as_str(), e.stream_seq))
            .collect();
        assert_eq!(
            places,
            [
                ("ev-1", "alice", 5 * EVENTS_PER_ENTRY),
                ("ev-2", "bob", 5 * EVENTS_PER_ENTRY + 1)
            ]
        );
        // Each place is after every place of the entry before.
        let before = one("1795700000000-4", CHARGE).expect("parse");
        assert!(before.stream_seq < events[0].stream_seq);
        assert!(LedgerEvent::from_entry("1-0", entry("[]")).is_err());
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
