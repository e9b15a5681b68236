//! seed.lua and sync.lua: rebuilding and mirroring an account.

use super::*;

#[tokio::test]
async fn sync_never_creates_a_partial_account_nor_goes_back_to_an_older_version() {
    let h = Harness::new().await;
    let ghost = UserId::parse("ghost").expect("id");
    assert_eq!(
        h.sync(&ghost, 1, "free", true, &[]).await,
        SyncOutcome::NotInRedis
    );
    let now = h.at("2026-11-26T12:00:00Z");
    assert_eq!(
        h.charge(&ghost, "rag", &now, None, Mode::Charge).await,
        ChargeOutcome::Missing
    );
    // Version 5 (blocked) lands, then a late version 4 (unblocked) must
    // not undo it.
    let user = h.seed("hal", "free", 100, 0, &now).await;
    assert_eq!(
        h.sync(&user, 5, "free", true, &[key().hash()]).await,
        SyncOutcome::Applied
    );
    assert_eq!(
        h.sync(&user, 4, "free", false, &[key().hash()]).await,
        SyncOutcome::AlreadyNewer
    );
    assert_eq!(
        h.charge(&user, "rag", &now, None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::Blocked)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_rebuilds_write_the_account_once() {
    let h = Arc::new(Harness::new().await);
    let now = h.at("2026-11-26T12:00:00Z");
    let user = UserId::parse("henry").expect("id");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (h, user, now) = (Arc::clone(&h), user.clone(), now.clone());
            tokio::spawn(async move {
                h.meter
                    .seed(&AccountSeed {
                        user,
                        plan: PlanId::parse("free").expect("plan"),
                        monthly: Credits::new(100 - i).expect("credits"),
                        bonus: Credits::ZERO,
                        period: now.period.to_string(),
                        day: now.day.to_string(),
                        day_used: Credits::ZERO,
                        blocked: false,
                        keys: vec![LiveKey::unrestricted(KeyHash::from_stored("x".into()))],
                    })
                    .await
                    .expect("seed")
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        created += usize::from(t.await.expect("task"));
    }
    assert_eq!(created, 1);
}
