//! charge.lua's per-plan rate limit (GCRA), with the clock injected.

use super::*;

/// The stamp `ms` milliseconds after `start`, on the harness's calendar.
fn later(h: &Harness, start: &str, ms: i64) -> Stamp {
    let t: DateTime<Utc> = DateTime::parse_from_rfc3339(start)
        .expect("instant")
        .with_timezone(&Utc);
    h.calendar.at(t + chrono::Duration::milliseconds(ms))
}

fn rate_of(outcome: &ChargeOutcome) -> Option<(u32, u64)> {
    match outcome {
        ChargeOutcome::Charged(r) => r.rate.map(|s| (s.remaining, s.reset_ms)),
        _ => None,
    }
}

/// The test plan "limited": 30 calls per minute (one every 2 s), a burst
/// of 5. GCRA: the burst passes at once, the next call fits one interval
/// later, and a check answers without using the limit.
#[tokio::test]
async fn the_rate_limit_passes_a_burst_then_one_call_per_interval() {
    let h = Harness::new().await;
    const T0: &str = "2026-11-26T12:00:00Z";
    let at = |ms| later(&h, T0, ms);
    let user = h.seed("rita", "limited", 1000, 0, &at(0)).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(rate_of(
            &h.charge(&user, "rag", &at(0), None, Mode::Charge).await,
        ));
    }
    // What passes right now after each call, and until the burst is whole.
    assert_eq!(
        seen,
        [
            Some((4, 2000)),
            Some((3, 4000)),
            Some((2, 6000)),
            Some((1, 8000)),
            Some((0, 10000))
        ]
    );
    assert_eq!(
        h.charge(&user, "rag", &at(0), None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::RateLimited(2000))
    );
    assert_eq!(
        h.charge(&user, "rag", &at(1999), None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::RateLimited(1))
    );
    assert_eq!(
        rate_of(&h.charge(&user, "rag", &at(2000), None, Mode::Charge).await),
        Some((0, 10000))
    );
    // A check reports the limit without using it: refused now, and at
    // 4 s it says yes, and the charge right after it still passes.
    assert_eq!(
        h.charge(&user, "rag", &at(2000), None, Mode::Check).await,
        ChargeOutcome::Refused(Refusal::RateLimited(2000))
    );
    assert!(charged(&h.charge(&user, "rag", &at(4000), None, Mode::Check).await).is_some());
    assert!(charged(&h.charge(&user, "rag", &at(4000), None, Mode::Charge).await).is_some());
    // Seven calls served, seven credits; the refusals cost nothing.
    assert_eq!(h.hash(&user).await.0, 993);
    assert_eq!(h.event_kinds(&user).await.len(), 7);
}

/// A call refused for another reason (here: no credits left) neither
/// moves nor waits on the rate limit.
#[tokio::test]
async fn refused_calls_do_not_use_the_rate_limit() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("remy", "limited", 1, 0, &now).await;
    assert!(charged(&h.charge(&user, "rag", &now, None, Mode::Charge).await).is_some());
    for _ in 0..10 {
        assert!(matches!(
            h.charge(&user, "rag", &now, None, Mode::Charge).await,
            ChargeOutcome::Refused(Refusal::InsufficientCredits(_))
        ));
    }
}

/// The fixed one-minute window this replaced let a whole minute's calls
/// through on each side of a minute boundary. With GCRA a minute holds at
/// most the burst plus one call per interval, wherever it starts.
#[tokio::test]
async fn no_minute_boundary_lets_twice_the_rate_through() {
    let h = Harness::new().await;
    const T0: &str = "2026-11-26T12:00:30Z";
    let user = h.seed("bo", "limited", 1000, 0, &later(&h, T0, 0)).await;
    // One attempt every 100 ms for a minute that straddles 12:01:00.
    let mut served = Vec::new();
    for step in 0..600 {
        let ms = step * 100;
        let outcome = h
            .charge(&user, "rag", &later(&h, T0, ms), None, Mode::Charge)
            .await;
        match outcome {
            ChargeOutcome::Charged(_) => served.push(ms),
            ChargeOutcome::Refused(Refusal::RateLimited(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    // The burst of 5 at once, then one every 2 s from 12:00:32 to
    // 12:01:28: 5 + 29 = 34 in the minute, against 30 a minute on average
    // and 60 that a fixed window would have let through here.
    assert_eq!(served.len(), 34, "{served:?}");
    assert_eq!(&served[..5], &[0, 100, 200, 300, 400]);
    assert!(
        served[5..].windows(2).all(|w| w[1] - w[0] == 2000),
        "{served:?}"
    );
    let around_the_boundary = served
        .iter()
        .filter(|&&ms| (29_000..31_000).contains(&ms))
        .count();
    assert_eq!(around_the_boundary, 1);
}

/// Calls are decided in the order Redis runs them, not in their stamps'
/// order: two workers' batches, two gateways. A call stamped before the
/// last one served counts as arriving with it, so the burst still passes
/// whole; by their stamps alone the fifth call below was refused (the
/// first had moved the limit 10 ms past the others' stamps).
#[tokio::test]
async fn calls_decided_out_of_their_stamps_order_still_get_the_whole_burst() {
    let h = Harness::new().await;
    const T0: &str = "2026-11-26T12:00:00Z";
    let at = |ms| later(&h, T0, ms);
    let user = h.seed("olga", "limited", 1000, 0, &at(0)).await;
    assert!(charged(&h.charge(&user, "rag", &at(10), None, Mode::Charge).await).is_some());
    for i in 0..4 {
        let outcome = h.charge(&user, "rag", &at(0), None, Mode::Charge).await;
        assert!(
            charged(&outcome).is_some(),
            "call {} of the burst: {outcome:?}",
            i + 2
        );
    }
    // The sixth waits one interval from the latest arrival served (10 ms).
    assert_eq!(
        h.charge(&user, "rag", &at(0), None, Mode::Charge).await,
        ChargeOutcome::Refused(Refusal::RateLimited(2000))
    );
    assert_eq!(
        rate_of(&h.charge(&user, "rag", &at(2010), None, Mode::Charge).await),
        Some((0, 10000))
    );
    assert_eq!(h.hash(&user).await.0, 994);
}
