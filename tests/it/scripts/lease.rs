//! Credit leases in the scripts: charge.lua grants one with a charge,
//! lease.lua settles it or closes it as lost.

use super::*;

use std::time::Duration;

use creditgate::metering::{LeaseClosed, LeaseTaken, LeaseUse};

const T0: &str = "2026-11-27T10:00:00Z";

/// A lease of exactly `credits`, granted when the account keeps `room`
/// times it after it.
fn lease(credits: i64, room: i64) -> Mode {
    shrinkable(credits, credits, room)
}

/// A lease of at most `credits` and at least `least`.
fn shrinkable(credits: i64, least: i64, room: i64) -> Mode {
    Mode::Lease {
        credits,
        least,
        room,
        ttl_ms: 300,
        event: uuid::Uuid::now_v7(),
    }
}

fn taken(r: &Receipt) -> &LeaseTaken {
    match &r.lease {
        Some(LeaseUse::Took(t)) => t,
        other => panic!("no lease taken: {other:?}"),
    }
}

impl Harness {
    async fn lease_fields(&self, user: &UserId) -> Vec<String> {
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(self.meter.keys().account(user))
            .query_async(&mut self.redis.connection().await)
            .await
            .expect("HKEYS");
        fields
            .into_iter()
            .filter(|f| f.starts_with("lease:"))
            .collect()
    }
}

#[tokio::test]
async fn a_lease_comes_with_a_charge_from_the_monthly_part_first_and_only_with_room() {
    let h = Harness::new().await;
    let now = h.at(T0);
    let user = h.seed("lea", "enterprise", 50, 30, &now).await;

    // 79 left after the charge: a lease of 60 fits a room of once its size.
    let r = receipt(h.charge(&user, "rag", &now, None, lease(60, 1)).await);
    assert_eq!((r.charged, r.from_monthly, r.from_bonus), (1, 1, 0));
    let t = taken(&r);
    assert_eq!((t.credits, t.from_monthly, t.from_bonus), (60, 49, 11));
    assert!(t.id.ends_with(":lease"));
    assert_eq!(
        (r.balance.monthly.get(), r.balance.bonus.get()),
        (0, 19),
        "the balance after the lease"
    );
    let (monthly, bonus, used, _, _) = h.hash(&user).await;
    assert_eq!((monthly, bonus, used), (0, 19, 61));
    assert_eq!(h.lease_fields(&user).await, [format!("lease:{}", t.id)]);
    assert_eq!(h.event_kinds(&user).await, ["charge", "lease"]);
    let ended = h
        .meter
        .ended_leases(h.meter.keys().shard_of(&user), i64::MAX, 10)
        .await
        .expect("index");
    assert_eq!(ended, [(user.clone(), t.id.clone())]);

    // 18 left after the next charge: no room for a lease of 10 with room twice it.
    let r = receipt(h.charge(&user, "rag", &now, None, lease(10, 2)).await);
    assert_eq!(r.lease, None);
    assert_eq!(h.hash(&user).await.1, 18);

    // Never for a charge under a request id, nor for a plan with a rate limit.
    let rich = h.seed("rich", "enterprise", 90_000, 0, &now).await;
    let r = receipt(
        h.charge(&rich, "rag", &now, Some("r-1"), lease(10, 1))
            .await,
    );
    assert_eq!(r.lease, None);
    let limited = h.seed("rated", "limited", 1000, 0, &now).await;
    let r = receipt(h.charge(&limited, "rag", &now, None, lease(10, 1)).await);
    assert_eq!(r.lease, None);
    assert!(h.lease_fields(&rich).await.is_empty() && h.lease_fields(&limited).await.is_empty());
}

#[tokio::test]
async fn a_lease_needs_room_under_the_daily_limit_too() {
    let h = Harness::new().await;
    let now = h.at(T0);
    let user = h.seed("dee", "free", 100, 0, &now).await; // daily limit 20
    // After the charge, 19 of the day are left.
    let r = receipt(h.charge(&user, "rag", &now, None, lease(5, 4)).await);
    assert_eq!(r.lease, None);
    let r = receipt(h.charge(&user, "rag", &now, None, lease(5, 3)).await);
    assert_eq!(taken(&r).credits, 5);
    assert_eq!(
        h.hash(&user).await.2,
        7,
        "two calls and the lease count for the day"
    );
}

#[tokio::test]
async fn near_a_limit_a_lease_shrinks_to_what_fits_in_whole_calls_and_none_under_the_least() {
    let h = Harness::new().await;
    let now = h.at(T0);
    let user = h.seed("shr", "enterprise", 200, 0, &now).await;
    // "legal" costs 3. 197 left after the charge; a room of twice the
    // lease fits 98 credits, 96 in whole calls.
    let r = receipt(
        h.charge(&user, "legal", &now, None, shrinkable(300, 30, 2))
            .await,
    );
    assert_eq!(taken(&r).credits, 96);
    assert_eq!(h.hash(&user).await.0, 197 - 96);
    // 98 left after the next charge: 48 would fit, under the least of 60.
    let r = receipt(
        h.charge(&user, "legal", &now, None, shrinkable(300, 60, 2))
            .await,
    );
    assert_eq!(r.lease, None);
    assert_eq!(h.hash(&user).await.0, 98);
    // Far from the limit, what was asked for, no more.
    let rich = h.seed("far", "enterprise", 90_000, 0, &now).await;
    let r = receipt(
        h.charge(&rich, "legal", &now, None, shrinkable(300, 30, 2))
            .await,
    );
    assert_eq!(taken(&r).credits, 300);
}

#[tokio::test]
async fn settling_gives_back_what_was_not_spent_once() {
    let h = Harness::new().await;
    let now = h.at(T0);
    let user = h.seed("sam", "enterprise", 50, 30, &now).await;
    let r = receipt(h.charge(&user, "rag", &now, None, lease(60, 1)).await);
    let id = taken(&r).id.clone();

    // 25 spent: 25 of the 49 monthly; back 24 monthly and all 11 bonus.
    let closed = h
        .meter
        .settle_lease(&user, &id, 25, "test")
        .await
        .expect("settle");
    assert_eq!(
        closed,
        LeaseClosed::Settled {
            returned_monthly: 24,
            returned_bonus: 11
        }
    );
    let (monthly, bonus, used, _, _) = h.hash(&user).await;
    assert_eq!((monthly, bonus, used), (24, 30, 26));
    assert!(h.lease_fields(&user).await.is_empty());
    assert_eq!(
        h.event_kinds(&user).await,
        ["charge", "lease", "lease_return"]
    );
    // Once only.
    let again = h
        .meter
        .settle_lease(&user, &id, 0, "test")
        .await
        .expect("settle");
    assert_eq!(again, LeaseClosed::Gone);
    assert_eq!(h.hash(&user).await.0, 24);
    // More than the lease held counts as all of it.
    let r = receipt(h.charge(&user, "rag", &now, None, lease(10, 1)).await);
    let id = taken(&r).id.clone();
    h.meter
        .settle_lease(&user, &id, 99, "test")
        .await
        .expect("settle");
    assert_eq!(
        h.hash(&user).await.0 + h.hash(&user).await.1,
        24 + 30 - 1 - 10
    );
}

#[tokio::test]
async fn a_lease_settled_in_the_next_period_keeps_its_monthly_part() {
    let h = Harness::new().await;
    let november = h.at("2026-11-30T22:00:00Z"); // 23:00 in Algiers
    let user = h.seed("pat", "enterprise", 100, 5, &november).await;
    let r = receipt(h.charge(&user, "rag", &november, None, lease(50, 1)).await);
    let t = taken(&r).clone();
    assert_eq!((t.from_monthly, t.from_bonus), (50, 0));
    // December begins: the allowance is refilled by the next charge.
    let december = h.at("2026-11-30T23:30:00Z");
    receipt(h.charge(&user, "rag", &december, None, Mode::Charge).await);
    let (monthly, _, used, day, period) = h.hash(&user).await;
    assert_eq!(
        (monthly, used, period.as_str()),
        (99_999, 1, "2026-12"),
        "{day}"
    );
    let closed = h
        .meter
        .settle_lease(&user, &t.id, 10, "test")
        .await
        .expect("settle");
    assert_eq!(
        closed,
        LeaseClosed::Settled {
            returned_monthly: 0,
            returned_bonus: 0
        }
    );
    let (monthly, bonus, used, _, _) = h.hash(&user).await;
    assert_eq!(
        (monthly, bonus, used),
        (99_999, 5, 1),
        "November's rest stays gone"
    );
}

#[tokio::test]
async fn a_lease_nobody_settles_is_closed_as_lost_only_past_its_grace() {
    let h = Harness::new().await;
    let now = h.at(T0);
    let user = h.seed("lou", "enterprise", 1000, 0, &now).await;
    let r = receipt(h.charge(&user, "rag", &now, None, lease(40, 1)).await);
    let id = taken(&r).id.clone();
    let early = h
        .meter
        .close_lost_lease(&user, &id, Duration::from_secs(60))
        .await
        .expect("lost");
    assert_eq!(early, LeaseClosed::Early);
    tokio::time::sleep(Duration::from_millis(350)).await; // past its 300 ms
    let lost = h
        .meter
        .close_lost_lease(&user, &id, Duration::ZERO)
        .await
        .expect("lost");
    assert_eq!(lost, LeaseClosed::Lost { held: 40 });
    assert_eq!(
        h.hash(&user).await.0,
        1000 - 1 - 40,
        "its credits stay spent"
    );
    assert!(h.lease_fields(&user).await.is_empty());
    assert_eq!(
        h.event_kinds(&user).await,
        ["charge", "lease", "lease_lost"]
    );
    // Its gateway coming back later finds nothing to settle.
    let late = h
        .meter
        .settle_lease(&user, &id, 3, "test")
        .await
        .expect("settle");
    assert_eq!(late, LeaseClosed::Gone);
    let ended = h
        .meter
        .ended_leases(h.meter.keys().shard_of(&user), i64::MAX, 10)
        .await
        .expect("index");
    assert!(ended.is_empty());
}
