//! Events as Postgres binary `COPY` rows: what the flusher and the spend
//! log's reader send straight into `ledger_events` (or its staging table).
//! Binary, because Postgres then reads numbers, days and times as they are
//! stored instead of parsing their text: a row cost it 0.9 µs to load
//! against 1.6 µs from text (docs/BENCHMARKS.md), most of it the
//! timestamp's parser.

use chrono::{DateTime, Datelike, NaiveDate, Utc};

use super::LedgerEvent;

/// What a binary `COPY` starts with: the signature, no flags, no header
/// extension.
pub(super) const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// What it ends with: a row of -1 fields.
pub(super) const TRAILER: &[u8] = &[0xff, 0xff];

/// The columns of a row of `ledger_events` as written here; the staging
/// table has one more, the shard.
pub(super) const COLUMNS: i16 = 19;

/// The events as binary `COPY` rows (without [`HEADER`] and [`TRAILER`]),
/// `with_shard` for the staging table.
pub(crate) fn copy_rows(events: &[LedgerEvent<'_>], with_shard: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.len() * 320);
    for e in events {
        fields(&mut out, COLUMNS + i16::from(with_shard));
        text(&mut out, &e.event_id);
        text(&mut out, &e.user_id);
        text(&mut out, e.kind);
        optional(&mut out, e.module.as_deref());
        optional(&mut out, e.action.as_deref());
        int8(&mut out, e.amount);
        int8(&mut out, e.from_monthly);
        int8(&mut out, e.from_bonus);
        match (e.monthly_after, e.bonus_after) {
            (Some(m), Some(b)) => {
                int8(&mut out, m);
                int8(&mut out, b);
            }
            _ => {
                null(&mut out);
                null(&mut out);
            }
        }
        optional(&mut out, e.plan.as_deref());
        optional(&mut out, e.request_id.as_deref());
        text(&mut out, &e.actor);
        date(&mut out, e.local_day);
        timestamp(&mut out, e.occurred_at);
        int8(&mut out, e.stream_ms);
        int8(&mut out, e.stream_seq);
        optional(&mut out, e.reason.as_deref());
        optional(&mut out, e.lease_id.as_deref());
        if with_shard {
            int2(&mut out, e.shard);
        }
    }
    out
}

/// A row's start: how many fields follow.
pub(super) fn fields(out: &mut Vec<u8>, n: i16) {
    out.extend_from_slice(&n.to_be_bytes());
}

/// Text as it is: Postgres checks it is UTF-8 (a `&str` is) and holds no
/// NUL (the ledger's text fields have theirs replaced when read).
pub(super) fn text(out: &mut Vec<u8>, value: &str) {
    // A field is at most a row: far below 2 GiB.
    out.extend_from_slice(&(value.len() as i32).to_be_bytes());
    out.extend_from_slice(value.as_bytes());
}

pub(super) fn optional(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(v) => text(out, v),
        None => null(out),
    }
}

pub(super) fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i32).to_be_bytes());
}

pub(super) fn int8(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(&8i32.to_be_bytes());
    out.extend_from_slice(&n.to_be_bytes());
}

pub(super) fn int2(out: &mut Vec<u8>, n: i16) {
    out.extend_from_slice(&2i32.to_be_bytes());
    out.extend_from_slice(&n.to_be_bytes());
}

/// Days since Postgres's epoch, 2000-01-01.
pub(super) fn date(out: &mut Vec<u8>, day: NaiveDate) {
    /// 2000-01-01's `num_days_from_ce`.
    const EPOCH: i32 = 730_120;
    out.extend_from_slice(&4i32.to_be_bytes());
    out.extend_from_slice(&(day.num_days_from_ce() - EPOCH).to_be_bytes());
}

/// Microseconds since Postgres's epoch, 2000-01-01 00:00:00 UTC.
pub(super) fn timestamp(out: &mut Vec<u8>, at: DateTime<Utc>) {
    const EPOCH_MICROS: i64 = 946_684_800_000_000;
    int8(out, at.timestamp_micros() - EPOCH_MICROS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_times_count_from_postgres_epoch_big_endian() {
        let at = |ms| DateTime::<Utc>::from_timestamp_millis(ms).expect("in range");
        let mut out = Vec::new();
        timestamp(&mut out, at(946_684_800_001));
        assert_eq!(
            out,
            [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x03, 0xe8],
            "1 ms after"
        );
        let mut out = Vec::new();
        timestamp(&mut out, at(946_684_799_999));
        assert_eq!(&out[4..], (-1000i64).to_be_bytes(), "1 ms before");
        let day = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).expect("date");
        let mut out = Vec::new();
        date(&mut out, day(2000, 1, 1));
        date(&mut out, day(2026, 11, 29));
        date(&mut out, day(1999, 12, 31));
        let days: Vec<i32> = out
            .chunks(8)
            .map(|c| {
                assert_eq!(c[..4], 4i32.to_be_bytes());
                i32::from_be_bytes(c[4..].try_into().expect("4 bytes"))
            })
            .collect();
        // 2026-11-29 is day 9,829 (26 years with 7 leap days, then 332).
        assert_eq!(days, [0, 9829, -1]);
    }

    #[test]
    fn a_row_is_its_field_count_then_each_field_length_prefixed() {
        let mut out = Vec::new();
        fields(&mut out, 3);
        text(&mut out, "hé");
        null(&mut out);
        int2(&mut out, -2);
        assert_eq!(
            out,
            [
                0, 3, // fields
                0, 0, 0, 3, b'h', 0xc3, 0xa9, // text, UTF-8
                0xff, 0xff, 0xff, 0xff, // NULL
                0, 0, 0, 2, 0xff, 0xfe, // int2
            ]
        );
    }
}
