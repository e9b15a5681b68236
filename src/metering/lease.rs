//! lease.lua: closing the credit leases charge.lua grants
//! (docs/LEASES.md), and finding the ones nobody came back for.

use super::reply::{Reply, protocol};
use super::*;

pub(super) static LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/lease.lua")));

/// What closing a lease did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseClosed {
    /// Settled: what went back to the balance, and the balance after.
    Settled {
        returned_monthly: i64,
        returned_bonus: i64,
    },
    /// Closed as lost: the lease's credits stay spent.
    Lost { held: i64 },
    /// No such open lease (settled or lost already, or its account rebuilt).
    Gone,
    /// Not yet past its end by the grace asked: left open.
    Early,
}

impl Meter {
    /// Gives back what was not spent of `lease`: `spent` credits, net of
    /// the calls it refunded. Closing twice is harmless: the second finds
    /// nothing.
    pub async fn settle_lease(
        &self,
        user: &UserId,
        lease: &str,
        spent: i64,
        actor: &str,
    ) -> Result<LeaseClosed, MeterError> {
        self.close_lease(user, lease, "settle", spent, actor).await
    }

    /// Closes `lease` as lost if it ended more than `grace` ago: its
    /// gateway never settled it.
    pub async fn close_lost_lease(
        &self,
        user: &UserId,
        lease: &str,
        grace: std::time::Duration,
    ) -> Result<LeaseClosed, MeterError> {
        let grace = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        self.close_lease(user, lease, "lost", grace, "lease-sweeper")
            .await
    }

    async fn close_lease(
        &self,
        user: &UserId,
        lease: &str,
        op: &str,
        n: i64,
        actor: &str,
    ) -> Result<LeaseClosed, MeterError> {
        let mut con = self.redis.clone();
        let mut inv = LEASE.prepare_invoke();
        inv.key(self.keys.stream_of(user))
            .key(self.keys.account(user))
            .key(self.keys.leases_of(user))
            .arg(op)
            .arg(lease)
            .arg(user.as_str())
            .arg(n)
            .arg(chrono::Utc::now().timestamp_millis())
            .arg(actor);
        let reply: Value = self.run("lease", inv.invoke_async(&mut con)).await?;
        let r = Reply::parse("lease.lua", reply)?;
        Ok(match r.status.as_str() {
            "settled" => LeaseClosed::Settled {
                returned_monthly: r.int(0)?,
                returned_bonus: r.int(1)?,
            },
            "lost" => LeaseClosed::Lost { held: r.int(0)? },
            "gone" => LeaseClosed::Gone,
            "early" => LeaseClosed::Early,
            other => return Err(protocol(r.script, format!("unknown status {other:?}"))),
        })
    }

    /// Leases of `shard` that ended before `before` (unix ms on Redis's
    /// clock, as charge.lua scored them), oldest first, at most `limit`:
    /// (user, lease id).
    pub async fn ended_leases(
        &self,
        shard: u16,
        before: i64,
        limit: usize,
    ) -> Result<Vec<(UserId, String)>, MeterError> {
        let mut con = self.redis.clone();
        let members: Vec<String> = self
            .run(
                "lease_index",
                redis::cmd("ZRANGE")
                    .arg(self.keys.leases(shard))
                    .arg("-inf")
                    .arg(before)
                    .arg("BYSCORE")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit)
                    .query_async(&mut con),
            )
            .await?;
        Ok(members
            .iter()
            .filter_map(|m| {
                let (user, lease) = m.split_once(' ')?;
                Some((UserId::parse(user).ok()?, lease.to_owned()))
            })
            .collect())
    }

    /// Redis's clock now, unix ms (the lease index's scores are on it).
    pub async fn redis_now_ms(&self) -> Result<i64, MeterError> {
        let mut con = self.redis.clone();
        let (secs, micros): (i64, i64) = self
            .run("time", redis::cmd("TIME").query_async(&mut con))
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }
}
