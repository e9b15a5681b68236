//! grant.lua: bonus credits, once per admin `Idempotency-Key`.

use super::*;

#[tokio::test]
async fn a_grant_adds_to_the_bonus_once_per_key_and_never_past_the_ceiling() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("gina", "free", 40, 5, &now).await;
    assert_eq!(
        h.meter
            .grant(&grant(&user, 10, "gift", None), &now)
            .await
            .ok(),
        Some(GrantOutcome::Granted {
            monthly: 40,
            bonus: 15
        })
    );
    // The same Idempotency-Key and the same grant: applied once, and the
    // repeat answers with the balances the first left.
    let k = IdempotencyKey::parse("grant-1").expect("key");
    let first = h
        .meter
        .grant(&grant(&user, 7, "promo", Some((&k, "7|promo"))), &now)
        .await
        .ok();
    let again = h
        .meter
        .grant(&grant(&user, 7, "promo", Some((&k, "7|promo"))), &now)
        .await
        .ok();
    assert_eq!(
        first,
        Some(GrantOutcome::Granted {
            monthly: 40,
            bonus: 22
        })
    );
    assert_eq!(
        again,
        Some(GrantOutcome::Repeat {
            monthly: 40,
            bonus: 22
        })
    );
    // The key with another grant: refused, nothing changes.
    assert_eq!(
        h.meter
            .grant(&grant(&user, 8, "promo", Some((&k, "8|promo"))), &now)
            .await
            .ok(),
        Some(GrantOutcome::KeyReused)
    );
    // Past the bonus ceiling: refused, nothing changes.
    let over = h
        .meter
        .grant(&grant(&user, Credits::MAX, "too much", None), &now)
        .await
        .ok();
    assert_eq!(over, Some(GrantOutcome::OverLimit { bonus: 22 }));
    let (monthly, bonus, ..) = h.hash(&user).await;
    assert_eq!((monthly, bonus), (40, 22));
    assert_eq!(h.event_kinds(&user).await, ["grant", "grant"]);
    // An account Redis does not hold is not invented.
    let ghost = UserId::parse("ghost").expect("id");
    assert_eq!(
        h.meter.grant(&grant(&ghost, 1, "x", None), &now).await.ok(),
        Some(GrantOutcome::Missing)
    );
}
