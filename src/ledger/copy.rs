//! Events as Postgres `COPY` text rows: what the flusher sends straight
//! into `ledger_events` (or its staging table). Written by hand, without
//! `format!`, because this runs once per event at flush rates (the dates
//! and times are checked against chrono's own text by the test below).

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};

use super::LedgerEvent;

/// The events as `COPY` text rows: tab-separated, `\N` for NULL, and
/// backslash, tab, newline and carriage return escaped in text.
pub(crate) fn copy_rows(events: &[LedgerEvent<'_>], with_shard: bool) -> Vec<u8> {
    fn text(out: &mut Vec<u8>, value: &str) {
        super::event::escape_field(out, value);
        out.push(b'\t');
    }
    fn optional(out: &mut Vec<u8>, value: Option<&str>) {
        match value {
            Some(v) => text(out, v),
            None => out.extend_from_slice(b"\\N\t"),
        }
    }
    fn number(out: &mut Vec<u8>, n: i64) {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.push(b'\t');
    }
    let mut out = Vec::with_capacity(events.len() * 256);
    for e in events {
        text(&mut out, &e.event_id);
        text(&mut out, &e.user_id);
        text(&mut out, e.kind);
        optional(&mut out, e.module.as_deref());
        optional(&mut out, e.action.as_deref());
        number(&mut out, e.amount);
        number(&mut out, e.from_monthly);
        number(&mut out, e.from_bonus);
        match (e.monthly_after, e.bonus_after) {
            (Some(m), Some(b)) => {
                number(&mut out, m);
                number(&mut out, b);
            }
            _ => out.extend_from_slice(b"\\N\t\\N\t"),
        }
        optional(&mut out, e.plan.as_deref());
        optional(&mut out, e.request_id.as_deref());
        text(&mut out, &e.actor);
        date(&mut out, e.local_day);
        out.push(b'\t');
        timestamp(&mut out, e.occurred_at);
        out.push(b'\t');
        number(&mut out, e.stream_ms);
        number(&mut out, e.stream_seq);
        optional(&mut out, e.reason.as_deref());
        if with_shard {
            optional(&mut out, e.lease_id.as_deref());
            out.extend_from_slice(itoa::Buffer::new().format(e.shard).as_bytes());
        } else {
            // The row's last column ends it: no tab after it.
            match e.lease_id.as_deref() {
                Some(l) => {
                    text(&mut out, l);
                    out.pop();
                }
                None => out.extend_from_slice(b"\\N"),
            }
        }
        out.push(b'\n');
    }
    out
}

/// `YYYY-MM-DD`. chrono's `Display` goes through `fmt`: about 400
/// instructions a row, and the timestamp's RFC 3339 another 900
/// (bench/gateway_instructions.sh).
pub(super) fn date(out: &mut Vec<u8>, day: NaiveDate) {
    if !(1..=9999).contains(&day.year()) {
        // Writing into a Vec cannot fail.
        let _ = std::io::Write::write_fmt(out, format_args!("{day}"));
        return;
    }
    let year = day.year() as u32;
    digits(out, year / 100);
    digits(out, year % 100);
    out.push(b'-');
    digits(out, day.month());
    out.push(b'-');
    digits(out, day.day());
}

/// `YYYY-MM-DD HH:MM:SS.mmm+00`, which Postgres reads as a timestamptz.
pub(super) fn timestamp(out: &mut Vec<u8>, at: DateTime<Utc>) {
    if !(1..=9999).contains(&at.year()) {
        out.extend_from_slice(
            at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .as_bytes(),
        );
        return;
    }
    date(out, at.date_naive());
    out.push(b' ');
    digits(out, at.hour());
    out.push(b':');
    digits(out, at.minute());
    out.push(b':');
    digits(out, at.second());
    out.push(b'.');
    let ms = at.timestamp_subsec_millis().min(999);
    out.push(b'0' + (ms / 100) as u8);
    digits(out, ms % 100);
    out.extend_from_slice(b"+00");
}

/// [`timestamp`], remembering the last second's `YYYY-MM-DD HH:MM:SS`:
/// a batch's rows fall in a few seconds, and working out the date and the
/// time of day was most of a row's timestamp (about 500 instructions).
#[derive(Default)]
pub(super) struct Stamps {
    second: Option<i64>,
    text: Vec<u8>,
}

/// `YYYY-MM-DD HH:MM:SS`.
const SECOND_TEXT: usize = 19;

impl Stamps {
    pub(super) fn write(&mut self, out: &mut Vec<u8>, at: DateTime<Utc>) {
        let second = at.timestamp();
        if self.second != Some(second) {
            let from = out.len();
            timestamp(out, at);
            self.second = None;
            // Four-digit years only: others are written by chrono, another shape.
            if (1..=9999).contains(&at.year())
                && let Some(text) = out.get(from..from + SECOND_TEXT)
            {
                self.text.clear();
                self.text.extend_from_slice(text);
                self.second = Some(second);
            }
            return;
        }
        out.extend_from_slice(&self.text);
        out.push(b'.');
        let ms = at.timestamp_subsec_millis().min(999);
        out.push(b'0' + (ms / 100) as u8);
        digits(out, ms % 100);
        out.extend_from_slice(b"+00");
    }
}

/// Two decimal digits of `n` (< 100).
fn digits(out: &mut Vec<u8>, n: u32) {
    out.push(b'0' + (n / 10 % 10) as u8);
    out.push(b'0' + (n % 10) as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_dates_and_times_are_what_chrono_writes() {
        for ms in [
            0,
            1_795_700_000_007,
            1_795_786_399_999,
            253_402_300_799_999,
            -62_135_596_800_000,
        ] {
            let at = DateTime::<Utc>::from_timestamp_millis(ms).expect("in range");
            let mut out = Vec::new();
            timestamp(&mut out, at);
            let text = String::from_utf8(out).expect("ASCII");
            let expected = at.format("%Y-%m-%d %H:%M:%S%.3f+00").to_string();
            assert_eq!(text, expected, "{ms}");
            let mut out = Vec::new();
            date(&mut out, at.date_naive());
            assert_eq!(out, at.date_naive().to_string().as_bytes());
        }
        // The same text through the remembered seconds, in and out of order.
        let mut stamps = Stamps::default();
        for ms in [
            1_795_700_000_007,
            1_795_700_000_999,
            1_795_700_000_000,
            1_795_700_001_000,
            1_795_700_000_500,
            300_000_000_000_000,
            300_000_000_000_001,
            1_795_700_000_501,
        ] {
            let at = DateTime::<Utc>::from_timestamp_millis(ms).expect("in range");
            let (mut out, mut want) = (b"x".to_vec(), b"x".to_vec());
            stamps.write(&mut out, at);
            timestamp(&mut want, at);
            assert_eq!(out, want, "{ms}");
        }
        // Outside four-digit years, chrono's own text (Postgres reads it).
        let far = DateTime::<Utc>::from_timestamp_millis(300_000_000_000_000).expect("in range");
        let mut out = Vec::new();
        timestamp(&mut out, far);
        assert_eq!(
            out,
            far.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .as_bytes()
        );
    }
}
