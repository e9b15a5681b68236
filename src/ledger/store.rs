//! Postgres side of the ledger, writing: the batch write (events,
//! aggregates and snapshots in one transaction). What is read back lives
//! in [`super::reports`].

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use chrono::{Datelike, NaiveDate};
use sqlx::{PgPool, Postgres, Transaction};

use super::BatchHook;
use super::calls::Calls;
use super::copy::copy_rows;
use super::event::LedgerEvent;

/// An entry that could not be parsed, kept for people to look at.
#[derive(Clone)]
pub struct Reject {
    pub stream: String,
    pub entry_id: String,
    pub fields: serde_json::Value,
    pub error: String,
}

/// What an insert does with an event already in the ledger.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Present {
    /// Fail the batch: the common case has no such event, and a `COPY`
    /// straight into the ledger costs Postgres a third less per event than
    /// staging the rows for `ON CONFLICT` (bench/flush.sh).
    Fail,
    /// Skip it (`ON CONFLICT DO NOTHING`).
    Skip,
}

/// Writes one batch atomically and returns how many events were new.
///
/// Events already present (a redelivered batch, two flushers racing on a
/// reclaimed entry) are skipped, and only the rows actually inserted feed
/// the aggregates, so replaying a batch changes nothing. Snapshots only
/// move forward in stream order.
pub async fn write_batch(
    pool: &PgPool,
    events: &[LedgerEvent<'_>],
    rejects: &[Reject],
    hook: Option<&dyn BatchHook>,
) -> Result<u64, sqlx::Error> {
    write(pool, Rows::Events(events), rejects, hook).await
}

/// Writes calls spent from leases ([`Calls`]) atomically, as
/// [`write_batch`] writes events; returns how many were new.
pub async fn write_calls(pool: &PgPool, calls: &mut Calls<'_>) -> Result<u64, sqlx::Error> {
    calls.close_run();
    write(pool, Rows::Calls(calls), &[], None).await
}

/// What one ledger write holds.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// Events from the streams: any kind, with their balances.
    Events(&'a [LedgerEvent<'a>]),
    /// Calls from a spend log: charges and refunds with no balance after
    /// them (it moved with their lease), so no snapshot, hook or audit.
    Calls(&'a Calls<'a>),
}

impl<'a> Rows<'a> {
    fn events(self) -> &'a [LedgerEvent<'a>] {
        match self {
            Rows::Events(events) => events,
            Rows::Calls(_) => &[],
        }
    }

    fn is_empty(self) -> bool {
        match self {
            Rows::Events(events) => events.is_empty(),
            Rows::Calls(calls) => calls.is_empty(),
        }
    }

    /// The rows as `COPY` text, `with_shard` for the staging table.
    fn copy_text(self, with_shard: bool) -> Cow<'a, [u8]> {
        match self {
            Rows::Events(events) => copy_rows(events, with_shard).into(),
            Rows::Calls(calls) if with_shard => calls.with_shard().into(),
            Rows::Calls(calls) => calls.text().into(),
        }
    }

    fn days(self) -> std::collections::BTreeSet<NaiveDate> {
        match self {
            Rows::Events(events) => events.iter().map(|e| e.local_day).collect(),
            Rows::Calls(calls) => calls.days().clone(),
        }
    }
}

async fn write(
    pool: &PgPool,
    rows: Rows<'_>,
    rejects: &[Reject],
    hook: Option<&dyn BatchHook>,
) -> Result<u64, sqlx::Error> {
    let mut present = Present::Fail;
    let mut created = false;
    loop {
        match write_batch_once(pool, rows, rejects, present, hook).await {
            // Some event is stored already: the batch again, skipping those.
            Err(e) if present == Present::Fail && is_unique_violation(&e) => {
                present = Present::Skip;
            }
            // A month without a partition (an event replayed from long ago,
            // or a gateway that has not run its daily check): create, retry.
            Err(e) if !created && super::partitions::is_missing_partition(&e) => {
                for day in rows.days() {
                    super::partitions::ensure(pool, day).await?;
                }
                created = true;
            }
            other => return other,
        }
    }
}

/// Only the events' primary key can raise it: every other insert of the
/// batch has its own `ON CONFLICT`.
fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.code().as_deref() == Some("23505"))
}

async fn write_batch_once(
    pool: &PgPool,
    rows: Rows<'_>,
    rejects: &[Reject],
    present: Present,
    hook: Option<&dyn BatchHook>,
) -> Result<u64, sqlx::Error> {
    let events = rows.events();
    let mut tx = pool.begin().await?;
    let inserted = insert_events(&mut tx, rows, present).await?;
    upsert_snapshots(&mut tx, events).await?;
    // After the roll-ups: the thresholds read the period's use from them.
    let after = match hook {
        Some(hook) if hook.active() => Some(hook.in_batch(&mut tx, events).await?),
        _ => None,
    };
    for r in rejects {
        sqlx::query(
            "INSERT INTO ledger_rejects (stream, entry_id, fields, error) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .bind(&r.stream)
        .bind(&r.entry_id)
        .bind(&r.fields)
        .bind(&r.error)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    if let (Some(hook), Some(keys)) = (hook, after) {
        hook.committed(keys);
    }
    Ok(inserted)
}

/// The staged batch into the ledger, skipping stored events, and the
/// roll-ups from the rows actually inserted.
const INSERT_SKIPPING: &str = "WITH ins AS (
            INSERT INTO ledger_events (event_id, user_id, kind, module, action, amount,
                from_monthly, from_bonus, monthly_after, bonus_after, plan, request_id, actor,
                local_day, occurred_at, stream_ms, stream_seq, reason, lease_id)
            SELECT event_id, user_id, kind, module, action, amount, from_monthly,
                from_bonus, monthly_after, bonus_after, plan, request_id, actor, local_day,
                occurred_at, stream_ms, stream_seq, reason, lease_id
            FROM ledger_stage
            ON CONFLICT (event_id, local_day) DO NOTHING
            RETURNING event_id, user_id, local_day, module, kind, amount, actor, reason,
                request_id, occurred_at
         ), audit AS (
            -- A grant's audit row comes from its event, so it exists exactly
            -- when the grant does, whatever the API saw of Postgres.
            INSERT INTO admin_audit (at, actor, action, user_id, details, event_id)
            SELECT occurred_at, actor, 'grant', user_id,
                jsonb_strip_nulls(jsonb_build_object('credits', amount, 'reason', reason,
                    'idempotency_key', request_id)),
                event_id
            FROM ins WHERE kind = 'grant'
            ON CONFLICT (event_id) DO NOTHING
         ), agg AS (
            INSERT INTO usage_daily AS u (user_id, day, module, charged_credits, charges,
                refunded_credits, refunds)
            SELECT user_id, local_day, module,
                COALESCE(SUM(amount) FILTER (WHERE kind = 'charge'), 0),
                COUNT(*) FILTER (WHERE kind = 'charge'),
                COALESCE(SUM(amount) FILTER (WHERE kind = 'refund'), 0),
                COUNT(*) FILTER (WHERE kind = 'refund')
            FROM ins
            WHERE kind IN ('charge', 'refund') AND module IS NOT NULL
            GROUP BY user_id, local_day, module
            ON CONFLICT (user_id, day, module) DO UPDATE SET
                charged_credits = u.charged_credits + EXCLUDED.charged_credits,
                charges = u.charges + EXCLUDED.charges,
                refunded_credits = u.refunded_credits + EXCLUDED.refunded_credits,
                refunds = u.refunds + EXCLUDED.refunds
         ), usage AS (
            SELECT ins.*, s.shard FROM ins
            JOIN (SELECT DISTINCT event_id, shard FROM ledger_stage) s USING (event_id)
            WHERE kind IN ('charge', 'refund') AND module IS NOT NULL
         ), by_module AS (
            -- Rows in key order: two writers never lock them crosswise.
            INSERT INTO usage_module_daily AS u (day, module, shard, charged_credits, charges,
                refunded_credits, refunds)
            SELECT local_day, module, shard,
                COALESCE(SUM(amount) FILTER (WHERE kind = 'charge'), 0),
                COUNT(*) FILTER (WHERE kind = 'charge'),
                COALESCE(SUM(amount) FILTER (WHERE kind = 'refund'), 0),
                COUNT(*) FILTER (WHERE kind = 'refund')
            FROM usage GROUP BY local_day, module, shard ORDER BY local_day, module, shard
            ON CONFLICT (day, module, shard) DO UPDATE SET
                charged_credits = u.charged_credits + EXCLUDED.charged_credits,
                charges = u.charges + EXCLUDED.charges,
                refunded_credits = u.refunded_credits + EXCLUDED.refunded_credits,
                refunds = u.refunds + EXCLUDED.refunds
         ), by_month AS (
            INSERT INTO usage_monthly AS u (user_id, month, charged_credits, charges,
                refunded_credits, refunds)
            SELECT user_id, date_trunc('month', local_day)::date,
                COALESCE(SUM(amount) FILTER (WHERE kind = 'charge'), 0),
                COUNT(*) FILTER (WHERE kind = 'charge'),
                COALESCE(SUM(amount) FILTER (WHERE kind = 'refund'), 0),
                COUNT(*) FILTER (WHERE kind = 'refund')
            FROM usage GROUP BY 1, 2
            ON CONFLICT (user_id, month) DO UPDATE SET
                charged_credits = u.charged_credits + EXCLUDED.charged_credits,
                charges = u.charges + EXCLUDED.charges,
                refunded_credits = u.refunded_credits + EXCLUDED.refunded_credits,
                refunds = u.refunds + EXCLUDED.refunds
         )
         SELECT count(*) FROM ins";

/// The batch's events go to Postgres by `COPY` into this temporary table,
/// then into the ledger with one statement: `COPY` parses rows for less
/// than `UNNEST` of nineteen arrays, which Postgres materialises first.
/// The table lives as long as the connection and empties at each commit.
const STAGE: &str = "SET LOCAL client_min_messages = warning;
    CREATE TEMP TABLE IF NOT EXISTS ledger_stage (
        event_id text NOT NULL, user_id text NOT NULL, kind text NOT NULL, module text,
        action text, amount bigint NOT NULL, from_monthly bigint NOT NULL,
        from_bonus bigint NOT NULL, monthly_after bigint, bonus_after bigint, plan text,
        request_id text, actor text NOT NULL, local_day date NOT NULL,
        occurred_at timestamptz NOT NULL, stream_ms bigint NOT NULL, stream_seq bigint NOT NULL,
        reason text, lease_id text, shard smallint NOT NULL
    ) ON COMMIT DELETE ROWS";

async fn insert_events(
    tx: &mut Transaction<'_, Postgres>,
    rows: Rows<'_>,
    present: Present,
) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    match present {
        Present::Fail => insert_new(tx, rows).await,
        Present::Skip => insert_skipping(tx, rows).await,
    }
}

/// The common case, a batch of events none of which is stored yet: `COPY`
/// straight into the ledger, then the roll-ups computed here. A stored
/// event fails the `COPY` on the primary key, and the batch goes again
/// through [`insert_skipping`]. Against the staged path this saves
/// Postgres a second copy of every row, the `RETURNING` store and the
/// sorts and joins of the roll-ups (bench/flush.sh).
async fn insert_new(
    tx: &mut Transaction<'_, Postgres>,
    rows: Rows<'_>,
) -> Result<u64, sqlx::Error> {
    let mut copy = tx
        .copy_in_raw(
            "COPY ledger_events (event_id, user_id, kind, module, action, amount, from_monthly,
                from_bonus, monthly_after, bonus_after, plan, request_id, actor, local_day,
                occurred_at, stream_ms, stream_seq, reason, lease_id) FROM STDIN",
        )
        .await?;
    copy.send(rows.copy_text(false).as_ref()).await?;
    let inserted = copy.finish().await?;
    match rows {
        Rows::Events(events) => Rollups::of(events).upsert(tx).await?,
        Rows::Calls(calls) => calls.rollups().upsert(tx).await?,
    }
    insert_grant_audits(tx, rows.events()).await?;
    Ok(inserted)
}

/// A batch that holds events stored already (a redelivery, two flushers
/// racing on a reclaimed entry): staged, inserted with `ON CONFLICT DO
/// NOTHING`, and only the rows actually inserted feed the roll-ups.
async fn insert_skipping(
    tx: &mut Transaction<'_, Postgres>,
    rows: Rows<'_>,
) -> Result<u64, sqlx::Error> {
    sqlx::raw_sql(STAGE).execute(&mut **tx).await?;
    let mut copy = tx
        .copy_in_raw(
            "COPY ledger_stage (event_id, user_id, kind, module, action, amount, from_monthly,
                from_bonus, monthly_after, bonus_after, plan, request_id, actor, local_day,
                occurred_at, stream_ms, stream_seq, reason, lease_id, shard) FROM STDIN",
        )
        .await?;
    copy.send(rows.copy_text(true).as_ref()).await?;
    copy.finish().await?;
    let inserted: i64 = sqlx::query_scalar(INSERT_SKIPPING)
        .fetch_one(&mut **tx)
        .await?;
    Ok(inserted as u64)
}

/// Charged and refunded credits and counts, as every roll-up row holds them.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Sums {
    charged: i64,
    charges: i64,
    refunded: i64,
    refunds: i64,
}

impl Sums {
    pub(super) fn of(charge: bool, amount: i64) -> Self {
        let mut sums = Sums::default();
        sums.add(charge, amount);
        sums
    }

    fn plus(&mut self, other: Sums) {
        self.charged += other.charged;
        self.charges += other.charges;
        self.refunded += other.refunded;
        self.refunds += other.refunds;
    }

    pub(super) fn add(&mut self, charge: bool, amount: i64) {
        if charge {
            self.charged += amount;
            self.charges += 1;
        } else {
            self.refunded += amount;
            self.refunds += 1;
        }
    }
}

/// A batch's charges and refunds summed per roll-up row. Ordered maps: the
/// rows are written in key order, so two writers never lock them crosswise.
#[derive(Default, Debug, PartialEq, Eq)]
pub(super) struct Rollups<'a> {
    daily: BTreeMap<(Cow<'a, str>, NaiveDate, Cow<'a, str>), Sums>,
    by_module: BTreeMap<(NaiveDate, Cow<'a, str>, i16), Sums>,
    monthly: BTreeMap<(Cow<'a, str>, NaiveDate), Sums>,
}

impl<'a> Rollups<'a> {
    pub(super) fn of(events: &'a [LedgerEvent<'_>]) -> Self {
        let mut r = Rollups::default();
        for e in events {
            let Some(module) = e.module.as_deref() else {
                continue;
            };
            if e.kind != "charge" && e.kind != "refund" {
                continue;
            }
            r.add(
                Cow::Borrowed(&e.user_id),
                e.local_day,
                Cow::Borrowed(module),
                e.shard,
                Sums::of(e.kind == "charge", e.amount),
            );
        }
        r
    }

    /// Charges and refunds of `user` and `module` on `day`.
    pub(super) fn add(
        &mut self,
        user: Cow<'a, str>,
        day: NaiveDate,
        module: Cow<'a, str>,
        shard: i16,
        sums: Sums,
    ) {
        let month = day.with_day(1).unwrap_or(day);
        self.by_module
            .entry((day, module.clone(), shard))
            .or_default()
            .plus(sums);
        self.monthly
            .entry((user.clone(), month))
            .or_default()
            .plus(sums);
        self.daily
            .entry((user, day, module))
            .or_default()
            .plus(sums);
    }

    async fn upsert(&self, tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
        if self.daily.is_empty() {
            return Ok(());
        }
        fn columns<'s>(sums: impl Iterator<Item = &'s Sums>) -> [Vec<i64>; 4] {
            let mut c: [Vec<i64>; 4] = Default::default();
            for s in sums {
                c[0].push(s.charged);
                c[1].push(s.charges);
                c[2].push(s.refunded);
                c[3].push(s.refunds);
            }
            c
        }
        let [dc, dn, dr, drn] = columns(self.daily.values());
        let [mc, mn, mr, mrn] = columns(self.by_module.values());
        let [oc, on, or, orn] = columns(self.monthly.values());
        sqlx::query(ROLLUPS)
            .bind(self.daily.keys().map(|k| k.0.as_ref()).collect::<Vec<_>>())
            .bind(self.daily.keys().map(|k| k.1).collect::<Vec<_>>())
            .bind(self.daily.keys().map(|k| k.2.as_ref()).collect::<Vec<_>>())
            .bind(dc)
            .bind(dn)
            .bind(dr)
            .bind(drn)
            .bind(self.by_module.keys().map(|k| k.0).collect::<Vec<_>>())
            .bind(
                self.by_module
                    .keys()
                    .map(|k| k.1.as_ref())
                    .collect::<Vec<_>>(),
            )
            .bind(self.by_module.keys().map(|k| k.2).collect::<Vec<_>>())
            .bind(mc)
            .bind(mn)
            .bind(mr)
            .bind(mrn)
            .bind(
                self.monthly
                    .keys()
                    .map(|k| k.0.as_ref())
                    .collect::<Vec<_>>(),
            )
            .bind(self.monthly.keys().map(|k| k.1).collect::<Vec<_>>())
            .bind(oc)
            .bind(on)
            .bind(or)
            .bind(orn)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// The three roll-ups of [`Rollups`], from its columns. `UNNEST` yields
/// the rows in the order they were bound (key order), which is the order
/// the upserts lock them in.
const ROLLUPS: &str = "WITH daily AS (
            INSERT INTO usage_daily AS u (user_id, day, module, charged_credits, charges,
                refunded_credits, refunds)
            SELECT * FROM UNNEST($1::text[], $2::date[], $3::text[], $4::bigint[], $5::bigint[],
                $6::bigint[], $7::bigint[])
            ON CONFLICT (user_id, day, module) DO UPDATE SET
                charged_credits = u.charged_credits + EXCLUDED.charged_credits,
                charges = u.charges + EXCLUDED.charges,
                refunded_credits = u.refunded_credits + EXCLUDED.refunded_credits,
                refunds = u.refunds + EXCLUDED.refunds
         ), by_module AS (
            INSERT INTO usage_module_daily AS u (day, module, shard, charged_credits, charges,
                refunded_credits, refunds)
            SELECT * FROM UNNEST($8::date[], $9::text[], $10::smallint[], $11::bigint[],
                $12::bigint[], $13::bigint[], $14::bigint[])
            ON CONFLICT (day, module, shard) DO UPDATE SET
                charged_credits = u.charged_credits + EXCLUDED.charged_credits,
                charges = u.charges + EXCLUDED.charges,
                refunded_credits = u.refunded_credits + EXCLUDED.refunded_credits,
                refunds = u.refunds + EXCLUDED.refunds
         )
         INSERT INTO usage_monthly AS u (user_id, month, charged_credits, charges,
                refunded_credits, refunds)
         SELECT * FROM UNNEST($15::text[], $16::date[], $17::bigint[], $18::bigint[],
                $19::bigint[], $20::bigint[])
         ON CONFLICT (user_id, month) DO UPDATE SET
                charged_credits = u.charged_credits + EXCLUDED.charged_credits,
                charges = u.charges + EXCLUDED.charges,
                refunded_credits = u.refunded_credits + EXCLUDED.refunded_credits,
                refunds = u.refunds + EXCLUDED.refunds";

/// A grant's audit row comes from its event, so it exists exactly when the
/// grant does, whatever the API saw of Postgres.
async fn insert_grant_audits(
    tx: &mut Transaction<'_, Postgres>,
    events: &[LedgerEvent<'_>],
) -> Result<(), sqlx::Error> {
    let grants: Vec<&LedgerEvent> = events.iter().filter(|e| e.kind == "grant").collect();
    if grants.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO admin_audit (at, actor, action, user_id, details, event_id)
         SELECT at, actor, 'grant', user_id,
            jsonb_strip_nulls(jsonb_build_object('credits', amount, 'reason', reason,
                'idempotency_key', request_id)),
            event_id
         FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::bigint[], $5::text[],
            $6::text[], $7::text[]) AS g(at, actor, user_id, amount, reason, request_id, event_id)
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(grants.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
    .bind(grants.iter().map(|e| e.actor.as_ref()).collect::<Vec<_>>())
    .bind(
        grants
            .iter()
            .map(|e| e.user_id.as_ref())
            .collect::<Vec<_>>(),
    )
    .bind(grants.iter().map(|e| e.amount).collect::<Vec<_>>())
    .bind(
        grants
            .iter()
            .map(|e| e.reason.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        grants
            .iter()
            .map(|e| e.request_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        grants
            .iter()
            .map(|e| e.event_id.as_ref())
            .collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn upsert_snapshots(
    tx: &mut Transaction<'_, Postgres>,
    events: &[LedgerEvent<'_>],
) -> Result<(), sqlx::Error> {
    // Latest event per user in this batch.
    let mut latest: HashMap<&str, &LedgerEvent> = HashMap::new();
    // A call spent from a lease has no balance after it: the balance moved
    // with the lease.
    let known = |e: &&LedgerEvent<'_>| !e.account_period.is_empty() && e.monthly_after.is_some();
    for e in events.iter().filter(known) {
        let newer = latest
            .get(e.user_id.as_ref())
            .is_none_or(|cur| (e.stream_ms, e.stream_seq) > (cur.stream_ms, cur.stream_seq));
        if newer {
            latest.insert(&e.user_id, e);
        }
    }
    if latest.is_empty() {
        return Ok(());
    }
    let mut users = Vec::new();
    let (mut monthly, mut bonus, mut period, mut day, mut used, mut ms, mut seq) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (user, e) in latest {
        users.push(user.to_owned());
        monthly.push(e.monthly_after.unwrap_or(0));
        bonus.push(e.bonus_after.unwrap_or(0));
        period.push(e.account_period.clone());
        day.push(e.account_day.clone());
        used.push(e.account_day_used);
        ms.push(e.stream_ms);
        seq.push(e.stream_seq);
    }
    sqlx::query(
        "INSERT INTO account_snapshots AS s (user_id, monthly, bonus, period, day, day_used,
            stream_ms, stream_seq)
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
            $6::bigint[], $7::bigint[], $8::bigint[])
         ON CONFLICT (user_id) DO UPDATE SET
            monthly = EXCLUDED.monthly, bonus = EXCLUDED.bonus, period = EXCLUDED.period,
            day = EXCLUDED.day, day_used = EXCLUDED.day_used, stream_ms = EXCLUDED.stream_ms,
            stream_seq = EXCLUDED.stream_seq, updated_at = now()
         WHERE (s.stream_ms, s.stream_seq) < (EXCLUDED.stream_ms, EXCLUDED.stream_seq)",
    )
    .bind(users)
    .bind(monthly)
    .bind(bonus)
    .bind(period)
    .bind(day)
    .bind(used)
    .bind(ms)
    .bind(seq)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
