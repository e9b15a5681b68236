//! Local calendar of the deployment: which day and which billing period an
//! instant belongs to in `server.timezone`, and when they end.
//!
//! The gateway computes these and passes them to the Lua scripts, so Redis
//! never needs to know the time zone and tests can put any instant on the
//! clock.

use std::sync::{Arc, RwLock};

use chrono::{DateTime, Datelike, Days, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

/// Cheap to clone: clones share the cached day.
#[derive(Clone, Debug)]
pub struct Calendar {
    tz: Tz,
    /// The local day last asked about, with its first instant. Every
    /// request needs its day and period as text; working them out (time
    /// zone look-ups, formatting) once per day instead of once per request
    /// keeps that off the hot path. A lock held for one clone only.
    day: Arc<RwLock<Option<CachedDay>>>,
}

/// A local day's stamp and the instant the day starts.
#[derive(Debug)]
struct CachedDay {
    starts: DateTime<Utc>,
    stamp: Stamp,
}

/// A local day: the daily limit's counter. Its text (`YYYY-MM-DD`, what
/// the scripts and the ledger store) is made once per day and shared, so a
/// request's stamp costs no allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalDay {
    date: NaiveDate,
    text: Arc<str>,
}

impl LocalDay {
    pub fn new(date: NaiveDate) -> Self {
        Self {
            date,
            text: date.format("%Y-%m-%d").to_string().into(),
        }
    }

    /// A day as the scripts write it (`YYYY-MM-DD`).
    pub fn parse(text: &str) -> Option<Self> {
        let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
        Some(Self::new(date))
    }

    pub fn date(&self) -> NaiveDate {
        self.date
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A local month (`YYYY-MM`): the monthly allowance's period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Period {
    first_day: NaiveDate,
    text: Arc<str>,
}

impl Period {
    /// The period `date` falls in.
    pub fn of(date: NaiveDate) -> Self {
        let first_day = date.with_day(1).unwrap_or(date);
        Self {
            first_day,
            text: first_day.format("%Y-%m").to_string().into(),
        }
    }

    /// A period as the scripts write it (`YYYY-MM`).
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 7 {
            return None;
        }
        let first_day = NaiveDate::parse_from_str(&format!("{text}-01"), "%Y-%m-%d").ok()?;
        Some(Self::of(first_day))
    }

    /// Its first local day.
    pub fn first_day(&self) -> NaiveDate {
        self.first_day
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Stored text (an account's `day` or `period` field) against the
/// calendar's value.
macro_rules! text_eq {
    ($t:ty) => {
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
        impl PartialEq<String> for $t {
            fn eq(&self, other: &String) -> bool {
                self.as_str() == other
            }
        }
        impl PartialEq<$t> for String {
            fn eq(&self, other: &$t) -> bool {
                self == other.as_str()
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
text_eq!(LocalDay);
text_eq!(Period);

/// Where one instant falls on the local calendar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub now: DateTime<Utc>,
    pub day: LocalDay,
    pub period: Period,
    /// Next local midnight, when the daily counter resets.
    pub day_ends: DateTime<Utc>,
    /// First instant of the period.
    pub period_starts: DateTime<Utc>,
    /// First instant of the next period (1st of next month, local midnight).
    pub period_ends: DateTime<Utc>,
}

impl Stamp {
    /// The local day as a date.
    pub fn local_date(&self) -> NaiveDate {
        self.day.date()
    }

    /// The first local day of the period: where the month's reports start.
    pub fn period_first_day(&self) -> NaiveDate {
        self.period.first_day()
    }

    pub fn now_ms(&self) -> i64 {
        self.now.timestamp_millis()
    }

    /// `Retry-After` for the daily limit: whole seconds to local midnight,
    /// at least 1.
    pub fn secs_to_day_end(&self) -> u64 {
        let ms = (self.day_ends - self.now).num_milliseconds().max(0) as u64;
        ms.div_ceil(1000).max(1)
    }
}

impl Calendar {
    /// The deployment's time zone (`server.timezone`).
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    pub fn new(tz: Tz) -> Self {
        Self {
            tz,
            day: Arc::new(RwLock::new(None)),
        }
    }

    pub fn now(&self) -> Stamp {
        self.at(Utc::now())
    }

    pub fn at(&self, now: DateTime<Utc>) -> Stamp {
        if let Ok(cached) = self.day.read()
            && let Some(day) = cached.as_ref()
            && day.starts <= now
            && now < day.stamp.day_ends
        {
            return Stamp {
                now,
                ..day.stamp.clone()
            };
        }
        let stamp = self.compute(now);
        let local = now.with_timezone(&self.tz).date_naive();
        if let Ok(mut cached) = self.day.write() {
            *cached = Some(CachedDay {
                starts: self.midnight(local),
                stamp: stamp.clone(),
            });
        }
        stamp
    }

    fn compute(&self, now: DateTime<Utc>) -> Stamp {
        let local = now.with_timezone(&self.tz).date_naive();
        let month_start = local.with_day(1).unwrap_or(local);
        let next_month = month_start
            .checked_add_months(chrono::Months::new(1))
            .unwrap_or(month_start);
        Stamp {
            now,
            day: LocalDay::new(local),
            period: Period::of(local),
            day_ends: self.midnight(local.checked_add_days(Days::new(1)).unwrap_or(local)),
            period_starts: self.midnight(month_start),
            period_ends: self.midnight(next_month),
        }
    }

    /// The first instant of `date` in the zone. Where a DST change skips
    /// midnight, the day starts at the first local time that exists.
    /// The first instant of period `YYYY-MM` and of the next one, local
    /// midnights; `None` when `period` is not a month.
    pub fn period_bounds(&self, period: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let first = NaiveDate::parse_from_str(&format!("{period}-01"), "%Y-%m-%d").ok()?;
        if period.len() != 7 {
            return None;
        }
        let next = first.checked_add_months(chrono::Months::new(1))?;
        Some((self.midnight(first), self.midnight(next)))
    }

    /// The period (`YYYY-MM`) an instant falls in, locally.
    pub fn period_of(&self, at: DateTime<Utc>) -> String {
        at.with_timezone(&self.tz).format("%Y-%m").to_string()
    }

    fn midnight(&self, date: NaiveDate) -> DateTime<Utc> {
        let mut t = date.and_hms_opt(0, 0, 0).unwrap_or_default();
        for _ in 0..4 {
            if let Some(dt) = self.tz.from_local_datetime(&t).earliest() {
                return dt.with_timezone(&Utc);
            }
            t += chrono::Duration::minutes(30);
        }
        Utc.from_utc_datetime(&t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test instant")
            .with_timezone(&Utc)
    }

    #[test]
    fn algiers_days_start_at_2300_utc() {
        let cal = Calendar::new(chrono_tz::Africa::Algiers);
        // (instant, local day, local period, seconds to local midnight)
        let table = [
            ("2026-11-26T22:59:59Z", "2026-11-26", "2026-11", 1),
            ("2026-11-26T23:00:00Z", "2026-11-27", "2026-11", 86_400),
            ("2026-11-26T12:00:00Z", "2026-11-26", "2026-11", 11 * 3600),
            ("2026-11-30T23:00:00Z", "2026-12-01", "2026-12", 86_400),
            ("2026-11-30T22:59:59.500Z", "2026-11-30", "2026-11", 1),
            ("2026-12-31T23:30:00Z", "2027-01-01", "2027-01", 84_600),
        ];
        for (instant, day, period, secs) in table {
            let s = cal.at(utc(instant));
            assert_eq!(
                (s.day.as_str(), s.period.as_str(), s.secs_to_day_end()),
                (day, period, secs),
                "at {instant}"
            );
        }
    }

    #[test]
    fn periods_span_local_months() {
        let cal = Calendar::new(chrono_tz::Africa::Algiers);
        let s = cal.at(utc("2026-02-15T10:00:00Z"));
        assert_eq!(s.period_starts, utc("2026-01-31T23:00:00Z"));
        assert_eq!(s.period_ends, utc("2026-02-28T23:00:00Z"));
    }

    #[test]
    fn the_cached_day_gives_the_same_stamps_as_working_them_out() {
        let cal = Calendar::new(chrono_tz::Africa::Algiers);
        // Back and forth across a local midnight (23:00 UTC) and a month end.
        for instant in [
            "2026-11-30T12:00:00Z",
            "2026-11-30T22:59:59Z",
            "2026-11-30T23:00:00Z",
            "2026-11-30T12:00:01Z",
            "2026-12-01T05:00:00Z",
            "2026-11-30T22:59:59.999Z",
        ] {
            let t = utc(instant);
            assert_eq!(cal.at(t), cal.compute(t), "{instant}");
        }
    }

    #[test]
    fn dst_zones_still_get_a_day_end() {
        // Europe/Paris skips 02:00 but not midnight; America/Santiago has
        // skipped midnight itself in some years. Both must yield a later instant.
        for tz in [chrono_tz::Europe::Paris, chrono_tz::America::Santiago] {
            let cal = Calendar::new(tz);
            let s = cal.at(utc("2026-09-05T12:00:00Z"));
            assert!(s.day_ends > s.now);
        }
    }
}
