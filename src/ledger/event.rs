//! One usage event, as the Lua scripts write it to a stream and as the
//! ledger stores it.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use redis::Value;

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
}

/// Splits a stream entry id `"<ms>-<seq>"`.
pub fn parse_entry_id(id: &str) -> Option<(i64, i64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// A field as text. Postgres text cannot hold NUL, and one unstorable
/// event must never stall the whole stream, so NULs become U+FFFD (and
/// invalid UTF-8 is replaced the same way).
fn text(v: &Value) -> Option<String> {
    let s = match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        _ => return None,
    };
    Some(if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s
    })
}

impl LedgerEvent {
    /// Parses the fields of one stream entry. The error names the field, and
    /// the entry then goes to `ledger_rejects` rather than blocking the stream.
    pub fn from_entry(entry_id: &str, fields: &HashMap<String, Value>) -> Result<Self, String> {
        let get = |k: &str| fields.get(k).and_then(text);
        let need = |k: &str| get(k).ok_or_else(|| format!("missing field {k}"));
        let int = |k: &str| -> Result<i64, String> {
            need(k)?
                .parse::<i64>()
                .map_err(|_| format!("field {k} is not an integer"))
        };
        let optional = |k: &str| get(k).filter(|s| !s.is_empty());
        let (stream_ms, stream_seq) =
            parse_entry_id(entry_id).ok_or_else(|| format!("bad entry id {entry_id}"))?;
        let kind = need("k")?;
        if !KINDS.contains(&kind.as_str()) {
            return Err(format!("unknown kind {kind:?}"));
        }
        let day = need("d")?;
        let local_day = NaiveDate::parse_from_str(&day, "%Y-%m-%d")
            .map_err(|_| format!("field d is not a date: {day:?}"))?;
        let occurred_at = DateTime::<Utc>::from_timestamp_millis(int("t")?)
            .ok_or_else(|| "field t is out of range".to_owned())?;
        let amount = int("n")?;
        if amount < 0 {
            return Err("negative amount".into());
        }
        Ok(Self {
            event_id: need("e")?,
            user_id: need("u")?,
            kind,
            module: optional("m"),
            action: optional("a"),
            amount,
            from_monthly: int("fm")?,
            from_bonus: int("fb")?,
            monthly_after: int("mb")?,
            bonus_after: int("bb")?,
            plan: optional("p"),
            request_id: optional("r"),
            actor: need("by")?,
            local_day,
            occurred_at,
            stream_ms,
            stream_seq,
            account_period: get("ap").unwrap_or_default(),
            account_day: get("ad").unwrap_or_default(),
            account_day_used: get("au").and_then(|s| s.parse().ok()).unwrap_or(0),
            reason: optional("why"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::BulkString(v.as_bytes().to_vec())))
            .collect()
    }

    const CHARGE: [(&str, &str); 18] = [
        ("e", "ev-1"),
        ("u", "alice"),
        ("k", "charge"),
        ("p", "free"),
        ("m", "rag"),
        ("a", ""),
        ("n", "1"),
        ("fm", "1"),
        ("fb", "0"),
        ("mb", "99"),
        ("bb", "0"),
        ("ap", "2026-11"),
        ("ad", "2026-11-26"),
        ("au", "1"),
        ("r", "req-1"),
        ("by", "proxy"),
        ("t", "1795700000000"),
        ("d", "2026-11-26"),
    ];

    #[test]
    fn parses_a_charge_entry() {
        let e = LedgerEvent::from_entry("1795700000000-3", &fields(&CHARGE)).expect("parse");
        assert_eq!((e.stream_ms, e.stream_seq), (1_795_700_000_000, 3));
        assert_eq!(e.kind, "charge");
        assert_eq!(e.action, None);
        assert_eq!(e.monthly_after, 99);
        assert_eq!(e.local_day.to_string(), "2026-11-26");
    }

    #[test]
    fn nul_bytes_cannot_make_an_event_unstorable() {
        let mut f = fields(&CHARGE);
        f.insert("why".into(), Value::BulkString(b"bad\0reason".to_vec()));
        f.insert("r".into(), Value::BulkString(vec![b'r', 0xff, 0]));
        let e = LedgerEvent::from_entry("1-0", &f).expect("parse");
        assert_eq!(e.reason.as_deref(), Some("bad\u{FFFD}reason"));
        assert!(!e.request_id.unwrap_or_default().contains('\0'));
    }

    #[test]
    fn rejects_name_the_problem() {
        let mut bad = fields(&CHARGE);
        bad.insert("k".into(), Value::BulkString(b"steal".to_vec()));
        assert!(
            LedgerEvent::from_entry("1-0", &bad)
                .unwrap_err()
                .contains("kind")
        );
        let mut bad = fields(&CHARGE);
        bad.remove("u");
        assert!(
            LedgerEvent::from_entry("1-0", &bad)
                .unwrap_err()
                .contains("u")
        );
        assert!(LedgerEvent::from_entry("nope", &fields(&CHARGE)).is_err());
    }
}
