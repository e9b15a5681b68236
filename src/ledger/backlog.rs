//! How far behind the ledger is: entries waiting in the usage streams and
//! the age of the oldest (the flusher's gauges, `ledger verify`, health).

use futures_util::future::join_all;
use redis::Value;

use super::FlushError;
use super::event::parse_entry_id;
use crate::metering::RedisConn;

/// Entries in the usage streams and the age of the oldest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    pub entries: i64,
    pub oldest_age_ms: i64,
}

/// Entries and the oldest entry's age over `streams`, asked per stream (one
/// slot each on a cluster), all at once.
pub async fn backlog(con: &RedisConn, streams: &[String]) -> Result<Backlog, FlushError> {
    let replies = join_all(streams.iter().map(|s| {
        let mut con = con.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(s);
        pipe.cmd("XRANGE")
            .arg(s)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        async move { pipe.query_async::<Vec<Value>>(&mut con).await }
    }))
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    let mut out = Backlog::default();
    for pair in replies {
        let pair = pair?;
        if let Some(Value::Int(n)) = pair.first() {
            out.entries += n;
        }
        if let Some(oldest) = pair.get(1).and_then(first_entry_ms) {
            out.oldest_age_ms = out.oldest_age_ms.max(now - oldest);
        }
    }
    Ok(out)
}

fn first_entry_ms(reply: &Value) -> Option<i64> {
    let Value::Array(entries) = reply else {
        return None;
    };
    let Some(Value::Array(entry)) = entries.first() else {
        return None;
    };
    match entry.first() {
        Some(Value::BulkString(id)) => {
            parse_entry_id(std::str::from_utf8(id).ok()?).map(|(ms, _)| ms)
        }
        _ => None,
    }
}
