//! reset.lua: the monthly reset.

use super::*;

#[tokio::test]
async fn a_reset_starts_the_new_period_once_and_keeps_the_bonus() {
    let h = Harness::new().await;
    let october = h.at("2026-10-20T12:00:00Z");
    let user = h.seed("hugo", "free", 3, 9, &october).await;
    assert_eq!(
        h.meter.reset_period(&user, "cron", &october).await.ok(),
        Some(ResetOutcome::Current)
    );
    let november = h.at("2026-11-01T00:30:00Z"); // 01:30 in Algiers, the 1st
    assert_eq!(
        h.meter.reset_period(&user, "cron", &november).await.ok(),
        Some(ResetOutcome::Reset {
            monthly: 100,
            bonus: 9
        })
    );
    // Run again (cron retried, two instances): nothing more happens.
    assert_eq!(
        h.meter.reset_period(&user, "cron", &november).await.ok(),
        Some(ResetOutcome::Current)
    );
    let (monthly, bonus, _, _, period) = h.hash(&user).await;
    assert_eq!((monthly, bonus, period.as_str()), (100, 9, "2026-11"));
    assert_eq!(h.event_kinds(&user).await, ["reset"]);
    // October's reset run late (a cron retried after midnight, a clock
    // behind): the account is in a later period, which it keeps.
    assert_eq!(
        h.meter.reset_period(&user, "cron", &october).await.ok(),
        Some(ResetOutcome::Current)
    );
    assert_eq!(h.hash(&user).await.4, "2026-11");
    assert_eq!(h.event_kinds(&user).await, ["reset"]);
    let ghost = UserId::parse("ghost").expect("id");
    assert_eq!(
        h.meter.reset_period(&ghost, "cron", &november).await.ok(),
        Some(ResetOutcome::Missing)
    );
}
