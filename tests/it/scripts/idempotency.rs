//! charge.lua, complete.lua and refund.lua around a proxy `Idempotency-Key`.

use super::*;

#[tokio::test]
async fn a_proxy_idempotency_key_is_in_progress_then_replayed_never_charged_twice() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let lease = now.now_ms() + 10_000;
    let user = h.seed("kim", "free", 100, 0, &now).await;
    let first = h.keyed(&user, "k1", "fp-a", &now, lease).await;
    let receipt = receipt(first);
    assert_eq!(
        h.keyed(&user, "k1", "fp-a", &now, lease).await,
        ChargeOutcome::Repeat(Repeat::InProgress {
            original: "trace-fp-a".into()
        })
    );
    assert_eq!(
        h.keyed(&user, "k1", "fp-other", &now, lease).await,
        ChargeOutcome::Repeat(Repeat::KeyReused {
            original: "trace-fp-a".into()
        })
    );
    let key = IdempotencyKey::parse("k1").expect("key");
    let stored = StoredResponse {
        status: 201,
        headers: "content-type: text/plain\n".into(),
        body: bytes::Bytes::from_static(b"\x00binary\xffbody"),
    };
    // Only the charge that owns the record may complete it.
    assert!(
        !h.meter
            .complete(&user, &key, "someone-else", Some(&stored))
            .await
            .expect("complete.lua")
    );
    assert!(
        h.meter
            .complete(&user, &key, &receipt.event_id, Some(&stored))
            .await
            .expect("complete.lua")
    );
    match h.keyed(&user, "k1", "fp-a", &now, lease).await {
        ChargeOutcome::Repeat(Repeat::Replay {
            original,
            response,
            balance,
            ..
        }) => {
            assert_eq!(original, "trace-fp-a");
            assert_eq!(response, stored);
            assert_eq!(balance.remaining(), 99);
        }
        other => panic!("not a replay: {other:?}"),
    }
    assert_eq!(h.hash(&user).await.0, 99, "charged exactly once");
    // The credits API's request ids are another namespace: "k1" is new there.
    assert!(charged(&h.charge(&user, "rag", &now, Some("k1"), Mode::Charge).await).is_some());
}

#[tokio::test]
async fn a_pending_key_past_its_lease_or_unreplayable_is_refused_and_a_refund_frees_it() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("lou", "free", 100, 0, &now).await;
    // Lease already over: the gateway that owned it is presumed gone.
    let ChargeOutcome::Charged(_) = h.keyed(&user, "k2", "fp", &now, now.now_ms() - 1).await else {
        panic!("charged");
    };
    assert!(matches!(
        h.keyed(&user, "k2", "fp", &now, now.now_ms() + 10_000)
            .await,
        ChargeOutcome::Repeat(Repeat::NotReplayable { .. })
    ));
    // Completed but too long to keep.
    let ChargeOutcome::Charged(r) = h
        .keyed(&user, "k3", "fp", &now, now.now_ms() + 10_000)
        .await
    else {
        panic!("charged");
    };
    let k3 = IdempotencyKey::parse("k3").expect("key");
    assert!(
        h.meter
            .complete(&user, &k3, &r.event_id, None)
            .await
            .expect("complete")
    );
    assert!(matches!(
        h.keyed(&user, "k3", "fp", &now, now.now_ms() + 10_000)
            .await,
        ChargeOutcome::Repeat(Repeat::NotReplayable { .. })
    ));
    // A refund gives the credit back once and frees the key.
    let rid = RequestId::parse("ignored").expect("rid");
    let refund = h
        .meter
        .refund(&user, &rid, RefundOf::Idempotent(&k3), "test", &now)
        .await;
    assert!(matches!(
        refund,
        Ok(RefundOutcome::Refunded { amount: 1, .. })
    ));
    let again = h
        .meter
        .refund(&user, &rid, RefundOf::Idempotent(&k3), "test", &now)
        .await;
    assert!(matches!(again, Ok(RefundOutcome::NotFound)));
    assert!(matches!(
        h.keyed(&user, "k3", "fp", &now, now.now_ms() + 10_000)
            .await,
        ChargeOutcome::Charged(_)
    ));
    assert_eq!(h.hash(&user).await.0, 98);
}
