//! In-process cache of key hash → user, so the common request makes no
//! Postgres query. Known keys stay cached (revocation is checked in Redis by
//! charge.lua); unknown keys are remembered briefly so a flood of random
//! keys cannot turn into a flood of queries, while a key created on another
//! instance works within `negative_ttl`.
//!
//! Storage and eviction are moka's (bounded, concurrent, TinyLFU: a flood of
//! one-off keys does not push out the keys in daily use). The expiry of an
//! "unknown" answer is checked here against the caller's clock, so the rule
//! is tested without sleeping.

use std::time::{Duration, Instant};

use moka::sync::Cache;

use crate::domain::{KeyHash, UserId};

#[derive(Clone)]
enum Entry {
    Known(UserId),
    Unknown(Instant),
}

pub struct KeyCache {
    map: Cache<KeyHash, Entry, foldhash::quality::RandomState>,
    negative_ttl: Duration,
}

impl KeyCache {
    pub fn new(capacity: u64, negative_ttl: Duration) -> Self {
        Self {
            // foldhash, not SipHash: the keys are SHA-256 digests, and the
            // hash is taken on every request (bench/gateway_instructions.sh).
            map: Cache::builder()
                .max_capacity(capacity)
                .build_with_hasher(foldhash::quality::RandomState::default()),
            negative_ttl,
        }
    }

    /// `Some(Some(user))` known, `Some(None)` recently unknown, `None` miss.
    pub fn get(&self, hash: &KeyHash) -> Option<Option<UserId>> {
        self.get_at(hash, Instant::now)
    }

    /// The clock is read only for an unknown key's entry: a known key's
    /// lookup, on every request, needs no time.
    fn get_at(&self, hash: &KeyHash, now: impl FnOnce() -> Instant) -> Option<Option<UserId>> {
        match self.map.get(hash)? {
            Entry::Known(user) => Some(Some(user)),
            Entry::Unknown(at) if now().saturating_duration_since(at) < self.negative_ttl => {
                Some(None)
            }
            Entry::Unknown(_) => None,
        }
    }

    pub fn put(&self, hash: KeyHash, user: Option<UserId>) {
        self.put_at(hash, user, Instant::now());
    }

    fn put_at(&self, hash: KeyHash, user: Option<UserId>, now: Instant) {
        let entry = match user {
            Some(u) => Entry::Known(u),
            None => Entry::Unknown(now),
        };
        self.map.insert(hash, entry);
    }

    pub fn forget(&self, hash: &KeyHash) {
        self.map.invalidate(hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> KeyHash {
        KeyHash::from_stored(s.to_owned())
    }

    #[test]
    fn unknown_keys_are_remembered_for_the_negative_ttl_only() {
        let cache = KeyCache::new(100, Duration::from_secs(1));
        let alice = UserId::parse("alice").expect("id");
        let t0 = Instant::now();
        cache.put_at(h("a"), Some(alice.clone()), t0);
        cache.put_at(h("b"), None, t0);
        assert_eq!(cache.get_at(&h("a"), || t0), Some(Some(alice.clone())));
        assert_eq!(cache.get_at(&h("b"), || t0), Some(None));
        let later = t0 + Duration::from_millis(999);
        assert_eq!(cache.get_at(&h("b"), || later), Some(None));
        // A second on, the key is asked about again (it may exist now).
        let expired = t0 + Duration::from_secs(1);
        assert_eq!(cache.get_at(&h("b"), || expired), None);
        // Known keys do not expire; revocation is Redis's job.
        let much_later = t0 + Duration::from_secs(86_400);
        assert_eq!(cache.get_at(&h("a"), || much_later), Some(Some(alice)));
        cache.forget(&h("a"));
        assert_eq!(cache.get_at(&h("a"), || much_later), None);
    }

    #[test]
    fn the_cache_stays_within_its_capacity() {
        let cache = KeyCache::new(50, Duration::from_secs(1));
        let alice = UserId::parse("alice").expect("id");
        for i in 0..1000 {
            cache.put(h(&format!("k{i}")), Some(alice.clone()));
        }
        // moka applies evictions in the background; settle them first.
        cache.map.run_pending_tasks();
        assert!(
            cache.map.entry_count() <= 50,
            "{} entries held",
            cache.map.entry_count()
        );
    }
}
