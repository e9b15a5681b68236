//! The Redis key layout, all of it.
//!
//! ```text
//! {<prefix>:<shard>}:acct:<user>          hash   plan monthly bonus period day used blocked sv (admin sync version)
//!                                                tat (per-plan rate limit, GCRA: theoretical arrival, unix us)
//!                                                rn (the rate limit's latest arrival served, unix us)
//! {<prefix>:<shard>}:apikeys:<user>       hash   sha256 hex of each live API key -> "<expires ms>|<,modules,>"
//! {<prefix>:<shard>}:keys:<user>          set    the same hashes alone, for builds before key details
//! {<prefix>:<shard>}:req:<user>:<request> string "from_monthly,from_bonus,day,period,module,action,event id[,told]"
//!                                                (credits API request_id record + refund data, TTL 24 h)
//! {<prefix>:<shard>}:idem:<user>:<key>    hash   proxy Idempotency-Key record: split (as above),
//!                                                fp st lease rid ev status hdrs body (TTL 24 h)
//! {<prefix>:<shard>}:grant:<user>:<key>   string "fingerprint|monthly|bonus": an admin grant's
//!                                                Idempotency-Key (TTL 24 h)
//! {<prefix>:<shard>}:void:<user>:<event>  string a charge whose answer was lost, voided once (TTL 24 h)
//! {<prefix>:<shard>}:events               stream usage events of every account in the shard
//! {<prefix>:<shard>}:leases               zset   open credit leases of the shard's accounts,
//!                                                "<user> <lease id>" scored by their end (unix ms);
//!                                                each lease itself is the account hash's field
//!                                                "lease:<lease id>" (docs/LEASES.md)
//! ```
//!
//! `shard = fnv1a64(user) % redis.shards`. Everything about one account
//! carries the same hash tag `{<prefix>:<shard>}`, so each script touches
//! one Redis Cluster slot, and the account's events land in the stream of
//! that same slot, appended atomically with the balance change. The shard
//! count must stay fixed for a deployment's Redis data: changing it moves
//! accounts to other tags (they would be rebuilt from Postgres).

use crate::domain::{IdempotencyKey, RequestId, UserId};

#[derive(Clone, Debug)]
pub struct KeyLayout {
    prefix: String,
    shards: u16,
    /// `{<prefix>:<shard>}` and its stream's name, per shard: built once,
    /// as every charge names three keys of its shard.
    tags: Vec<String>,
    streams: Vec<String>,
}

impl KeyLayout {
    pub fn new(prefix: &str, shards: u16) -> Self {
        let shards = shards.max(1);
        let tags: Vec<String> = (0..shards).map(|s| format!("{{{prefix}:{s}}}")).collect();
        let streams = tags.iter().map(|t| format!("{t}:events")).collect();
        Self {
            prefix: prefix.to_owned(),
            shards,
            tags,
            streams,
        }
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    pub fn shard_of(&self, user: &UserId) -> u16 {
        self.shard_of_id(user.as_str())
    }

    /// [`KeyLayout::shard_of`] for a user id already known to be one
    /// (read back from the gateway's own spend log).
    pub fn shard_of_id(&self, user: &str) -> u16 {
        // FNV-1a: stable across Rust versions and platforms, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in user.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % u64::from(self.shards)) as u16
    }

    fn tag(&self, shard: u16) -> &str {
        &self.tags[usize::from(shard) % self.tags.len()]
    }

    /// `{tag}:<kind>:<user>[:<part>...]`, built by appending: a charge names
    /// three of these, and `format!` cost twice as many instructions.
    fn key(&self, kind: &str, user: &UserId, parts: &[&str]) -> String {
        let tag = self.tag(self.shard_of(user));
        let len = tag.len() + kind.len() + user.as_str().len() + 2;
        let mut key = String::with_capacity(len + parts.iter().map(|p| p.len() + 1).sum::<usize>());
        key.push_str(tag);
        key.push(':');
        key.push_str(kind);
        key.push(':');
        key.push_str(user.as_str());
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    pub fn account(&self, user: &UserId) -> String {
        self.key("acct", user, &[])
    }

    /// The account's live API keys and their details (a hash).
    pub fn api_keys(&self, user: &UserId) -> String {
        self.key("apikeys", user, &[])
    }

    /// The live keys' hashes alone (a set), as builds before key details
    /// read them: still written, so that they keep working during a
    /// rolling upgrade.
    pub fn legacy_key_set(&self, user: &UserId) -> String {
        self.key("keys", user, &[])
    }

    pub fn request(&self, user: &UserId, request: &RequestId) -> String {
        self.key("req", user, &[request.as_str()])
    }

    /// A proxy `Idempotency-Key`'s record: apart from [`Self::request`], so
    /// the two namespaces never collide.
    pub fn idempotency(&self, user: &UserId, key: &IdempotencyKey) -> String {
        self.key("idem", user, &[key.as_str()])
    }

    /// The mark of a charge whose answer was lost, once voided (refund.lua).
    pub fn void(&self, user: &UserId, event_id: &str) -> String {
        self.key("void", user, &[event_id])
    }

    /// An admin grant's `Idempotency-Key`, scoped to the account granted.
    pub fn grant_record(&self, user: &UserId, key: &IdempotencyKey) -> String {
        self.key("grant", user, &[key.as_str()])
    }

    /// The stream that receives `user`'s events.
    /// The lease index of `user`'s shard.
    pub fn leases_of(&self, user: &UserId) -> String {
        self.leases(self.shard_of(user))
    }

    pub fn leases(&self, shard: u16) -> String {
        format!("{}:leases", self.tag(shard))
    }

    pub fn stream_of(&self, user: &UserId) -> String {
        self.stream(self.shard_of(user))
    }

    pub fn stream(&self, shard: u16) -> String {
        self.streams[usize::from(shard) % self.streams.len()].clone()
    }

    /// Every usage stream, for the flusher.
    pub fn streams(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.shards).map(|s| self.stream(s))
    }

    /// SCAN pattern matching every account hash.
    pub fn account_pattern(&self) -> String {
        format!("{{{}:*}}:acct:*", self.prefix)
    }

    /// The user id inside an account hash's key name.
    pub fn user_of_account_key<'a>(&self, key: &'a str) -> Option<&'a str> {
        let (tag, user) = key.split_once("}:acct:")?;
        tag.strip_prefix(&format!("{{{}:", self.prefix))?;
        Some(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag_of(key: &str) -> &str {
        let start = key.find('{').expect("tag open");
        let end = key.find('}').expect("tag close");
        &key[start..=end]
    }

    #[test]
    fn every_key_of_an_account_shares_one_hash_tag() {
        let keys = KeyLayout::new("cg", 16);
        for name in ["alice", "bob", "usr_0192", "hub-42"] {
            let user = UserId::parse(name).expect("id");
            let rid = RequestId::parse("r-1").expect("rid");
            let all = [
                keys.account(&user),
                keys.api_keys(&user),
                keys.legacy_key_set(&user),
                keys.request(&user, &rid),
                keys.idempotency(&user, &IdempotencyKey::parse("k").expect("key")),
                keys.grant_record(&user, &IdempotencyKey::parse("k").expect("key")),
                keys.stream_of(&user),
            ];
            assert!(all.iter().all(|k| tag_of(k) == tag_of(&all[0])), "{all:?}");
        }
    }

    #[test]
    fn account_keys_round_trip_to_their_user() {
        let keys = KeyLayout::new("cg", 16);
        let user = UserId::parse("hub-42").expect("id");
        assert_eq!(
            keys.user_of_account_key(&keys.account(&user)),
            Some("hub-42")
        );
        assert_eq!(keys.user_of_account_key("{other:1}:acct:x"), None);
        assert_eq!(keys.account_pattern(), "{cg:*}:acct:*");
    }

    #[test]
    fn shards_are_stable_and_spread() {
        let keys = KeyLayout::new("cg", 16);
        // The shard is part of the stored data: a build that hashed
        // differently would look for accounts under other tags.
        let shard = |id: &str| keys.shard_of(&UserId::parse(id).expect("id"));
        assert_eq!((shard("alice"), shard("bob"), shard("u-1234")), (7, 4, 7));
        let used: std::collections::HashSet<u16> = (0..200)
            .map(|i| keys.shard_of(&UserId::parse(&format!("u{i}")).expect("id")))
            .collect();
        assert_eq!(used.len(), 16);
        assert_eq!(keys.streams().count(), 16);
    }

    /// The names are the deployment's Redis data: a build that spelled them
    /// differently would find no account.
    #[test]
    fn key_names_are_exactly_the_documented_layout() {
        let keys = KeyLayout::new("cg", 16);
        let user = UserId::parse("alice").expect("user");
        let tag = format!("{{cg:{}}}", keys.shard_of(&user));
        let request = RequestId::parse("r-1").expect("request id");
        let idem = IdempotencyKey::parse("k-1").expect("key");
        assert_eq!(keys.account(&user), format!("{tag}:acct:alice"));
        assert_eq!(keys.api_keys(&user), format!("{tag}:apikeys:alice"));
        assert_eq!(keys.legacy_key_set(&user), format!("{tag}:keys:alice"));
        assert_eq!(
            keys.request(&user, &request),
            format!("{tag}:req:alice:r-1")
        );
        assert_eq!(
            keys.idempotency(&user, &idem),
            format!("{tag}:idem:alice:k-1")
        );
        assert_eq!(
            keys.grant_record(&user, &idem),
            format!("{tag}:grant:alice:k-1")
        );
        assert_eq!(keys.stream_of(&user), format!("{tag}:events"));
    }
}
