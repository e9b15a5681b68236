//! refund.lua: once per charge, and to the part of the balance it came from.

use super::*;

#[tokio::test]
async fn refund_by_record_happens_once() {
    let h = Harness::new().await;
    let now = h.at("2026-11-26T12:00:00Z");
    let user = h.seed("erin", "tiny", 10, 0, &now).await;
    let rid = RequestId::parse("req-1").expect("rid");
    charged(
        &h.charge(&user, "legal", &now, Some("req-1"), Mode::Charge)
            .await,
    )
    .expect("charged");
    let dup = h
        .charge(&user, "legal", &now, Some("req-1"), Mode::Charge)
        .await;
    assert!(matches!(dup, ChargeOutcome::Duplicate { .. }));
    let first = h
        .meter
        .refund(&user, &rid, RefundOf::Record, "test", &now)
        .await;
    assert!(matches!(
        first,
        Ok(RefundOutcome::Refunded {
            amount: 3,
            monthly: 10,
            ..
        })
    ));
    let second = h
        .meter
        .refund(&user, &rid, RefundOf::Record, "test", &now)
        .await;
    assert!(matches!(second, Ok(RefundOutcome::NotFound)));
    assert_eq!(h.hash(&user).await.0, 10);
    assert_eq!(h.event_kinds(&user).await, ["charge", "refund"]);
}

#[tokio::test]
async fn a_refund_after_the_month_rolled_over_returns_only_the_bonus_part() {
    let h = Harness::new().await;
    let november = h.at("2026-11-30T22:59:59Z");
    let user = h.seed("fay", "tiny", 1, 5, &november).await;
    let outcome = h
        .charge(&user, "legal", &november, None, Mode::Charge)
        .await;
    let ChargeOutcome::Charged(receipt) = outcome else {
        panic!("not charged: {outcome:?}");
    };
    assert_eq!((receipt.from_monthly, receipt.from_bonus), (1, 2));
    // A December call rolls the period over before the refund arrives.
    let december = h.at("2026-11-30T23:00:01Z");
    charged(&h.charge(&user, "rag", &december, None, Mode::Charge).await).expect("charged");
    let module = h.catalog.module("legal").expect("legal").id.clone();
    let refund = h
        .meter
        .refund(
            &user,
            &RequestId::parse("anon").expect("rid"),
            RefundOf::Receipt {
                receipt: &receipt,
                module: &module,
                action: None,
                charged_at: &november,
            },
            "test",
            &december,
        )
        .await;
    assert!(matches!(
        refund,
        Ok(RefundOutcome::Refunded { amount: 2, .. })
    ));
    // December: 10 - 1 (rag) = 9 monthly; bonus 3 + 2 back = 5; day counter
    // of December untouched by a November refund.
    let (monthly, bonus, used, _, _) = h.hash(&user).await;
    assert_eq!((monthly, bonus, used), (9, 5, 1));
}
