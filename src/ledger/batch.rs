//! A batch as the flusher reads it from the streams: the entries to
//! acknowledge, their events (borrowing their text from the entries) and
//! what could not be read (kept aside as rejects).

use std::collections::HashMap;

use redis::Value;

use super::event::LedgerEvent;
use super::store::Reject;

/// One batch read from Redis, kept until it is safely in Postgres.
#[derive(Default)]
pub(super) struct Batch {
    /// stream → entry ids to acknowledge
    pub(super) ids: HashMap<String, Vec<String>>,
    entries: Vec<Entry>,
    /// Entries without events at all (deleted while pending).
    pub(super) rejects: Vec<Reject>,
}

/// A stream entry as Redis sent it. Its events are read when the batch is
/// written, borrowing their text from it.
struct Entry {
    stream: String,
    id: String,
    shard: i16,
    fields: Vec<Value>,
}

impl Batch {
    pub(super) fn len(&self) -> usize {
        self.ids.values().map(Vec::len).sum()
    }

    /// One stream entry: its id and its field/value list as Redis sent it.
    pub(super) fn add(&mut self, stream: &str, id: &str, fields: &[Value]) {
        // Once per stream and batch, not per entry.
        match self.ids.get_mut(stream) {
            Some(ids) => ids.push(id.to_owned()),
            None => {
                self.ids.insert(stream.to_owned(), vec![id.to_owned()]);
            }
        }
        if fields.is_empty() {
            self.rejects
                .push(reject(stream, id, fields, "no fields".into()));
            return;
        }
        self.entries.push(Entry {
            stream: stream.to_owned(),
            id: id.to_owned(),
            shard: shard_of_stream(stream),
            fields: fields.to_vec(),
        });
    }

    /// The batch's events, in stream order within each stream, and the
    /// entries that hold none that can be stored.
    pub(super) fn events(&self) -> (Vec<LedgerEvent<'_>>, Vec<Reject>) {
        let mut events = Vec::with_capacity(self.entries.len());
        let mut rejects = Vec::new();
        for entry in &self.entries {
            let parsed = match field(&entry.fields, b"rows") {
                Some(rows) => LedgerEvent::from_rows(&entry.id, rows),
                None => LedgerEvent::from_entry(&entry.id, field(&entry.fields, b"v")),
            };
            match parsed {
                Ok(list) => events.extend(list.into_iter().map(|e| LedgerEvent {
                    shard: entry.shard,
                    ..e
                })),
                Err(error) => {
                    tracing::error!(stream = %entry.stream, entry = %entry.id, %error, "unparseable usage event");
                    rejects.push(reject(&entry.stream, &entry.id, &entry.fields, error));
                }
            }
        }
        (events, rejects)
    }

    /// Entries of a stream reply (`[id, [field, value, ...]]` each), as
    /// Redis sent them: walking the raw reply costs a fraction of building
    /// redis-rs's `StreamId` (a map per entry) for thousands of entries.
    pub(super) fn add_entries(&mut self, stream: &str, entries: &[Value]) {
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let (Some(Value::BulkString(id)), fields) = (parts.first(), parts.get(1)) else {
                continue;
            };
            let Ok(id) = std::str::from_utf8(id) else {
                continue;
            };
            match fields {
                Some(Value::Array(fields)) => self.add(stream, id, fields),
                // Deleted while pending (XAUTOCLAIM before Redis 7): kept
                // as a reject, so its id is acknowledged all the same.
                _ => self.add(stream, id, &[]),
            }
        }
    }
}

/// An entry kept aside in `ledger_rejects`, with every field it had.
fn reject(stream: &str, id: &str, fields: &[Value], error: String) -> Reject {
    let fields: serde_json::Map<String, serde_json::Value> = fields
        .chunks(2)
        .map(|kv| {
            let text = |v: Option<&Value>| match v {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                other => format!("{other:?}"),
            };
            (text(kv.first()), serde_json::Value::String(text(kv.get(1))))
        })
        .collect();
    Reject {
        stream: stream.to_owned(),
        entry_id: id.to_owned(),
        fields: serde_json::Value::Object(fields),
        error,
    }
}

/// The value of `name` in a field/value list.
fn field<'a>(fields: &'a [Value], name: &[u8]) -> Option<&'a [u8]> {
    fields.chunks(2).find_map(|kv| match kv {
        [Value::BulkString(k), Value::BulkString(v)] if k.as_slice() == name => Some(v.as_slice()),
        [Value::BulkString(k), Value::SimpleString(v)] if k.as_slice() == name => {
            Some(v.as_bytes())
        }
        _ => None,
    })
}

/// `{cg:7}:events` → 7 (0 for anything else).
fn shard_of_stream(stream: &str) -> i16 {
    stream
        .split_once(':')
        .and_then(|(_, rest)| rest.split_once('}'))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0)
}

/// XREADGROUP replies: nil, or per stream `[name, entries]` (a map from
/// name to entries under RESP3).
pub(super) fn add_reply(batch: &mut Batch, replies: Vec<Value>) {
    for reply in &replies {
        let mut add = |name: &Value, entries: &Value| {
            if let (Value::BulkString(name), Value::Array(entries)) = (name, entries)
                && let Ok(name) = std::str::from_utf8(name)
            {
                batch.add_entries(name, entries);
            }
        };
        match reply {
            Value::Array(streams) => {
                for stream in streams {
                    if let Value::Array(pair) = stream
                        && let [name, entries] = pair.as_slice()
                    {
                        add(name, entries);
                    }
                }
            }
            Value::Map(streams) => {
                for (name, entries) in streams {
                    add(name, entries);
                }
            }
            _ => {}
        }
    }
}
