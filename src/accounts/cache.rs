//! In-process cache of key hash → user, so the common request makes no
//! Postgres query. Known keys stay cached (revocation is checked in Redis by
//! charge.lua); unknown keys are remembered briefly so a flood of random
//! keys cannot turn into a flood of queries, while a key created on another
//! instance works within `negative_ttl`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain::{KeyHash, UserId};

enum Entry {
    Known(UserId),
    Unknown(Instant),
}

pub struct KeyCache {
    // A std Mutex: held for one hash-map operation, never across an await.
    map: Mutex<HashMap<KeyHash, Entry>>,
    capacity: usize,
    negative_ttl: Duration,
}

impl KeyCache {
    pub fn new(capacity: usize, negative_ttl: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            capacity,
            negative_ttl,
        }
    }

    /// `Some(Some(user))` known, `Some(None)` recently unknown, `None` miss.
    pub fn get(&self, hash: &KeyHash) -> Option<Option<UserId>> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(hash)? {
            Entry::Known(user) => Some(Some(user.clone())),
            Entry::Unknown(at) if at.elapsed() < self.negative_ttl => Some(None),
            Entry::Unknown(_) => None,
        }
    }

    pub fn put(&self, hash: KeyHash, user: Option<UserId>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity {
            // Crude but bounded: drop the negatives first, everything if
            // that is not enough. Refilling costs one query per live key.
            map.retain(|_, e| matches!(e, Entry::Known(_)));
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        let entry = match user {
            Some(u) => Entry::Known(u),
            None => Entry::Unknown(Instant::now()),
        };
        map.insert(hash, entry);
    }

    pub fn forget(&self, hash: &KeyHash) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> KeyHash {
        KeyHash::from_stored(s.to_owned())
    }

    #[test]
    fn negative_entries_expire_and_capacity_is_bounded() {
        let cache = KeyCache::new(2, Duration::from_millis(30));
        let alice = UserId::parse("alice").expect("id");
        cache.put(h("a"), Some(alice.clone()));
        cache.put(h("b"), None);
        assert_eq!(cache.get(&h("a")), Some(Some(alice.clone())));
        assert_eq!(cache.get(&h("b")), Some(None));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get(&h("b")), None);
        cache.put(h("c"), Some(alice.clone()));
        cache.put(h("d"), Some(alice));
        let held = ["a", "b", "c", "d"]
            .iter()
            .filter(|k| cache.get(&h(k)).is_some())
            .count();
        assert!(held <= 2, "{held} entries held");
    }
}
