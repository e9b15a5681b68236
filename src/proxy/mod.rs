//! The metering proxy: the hot path, top to bottom.
//!
//! A request to a module prefix passes these phases, carrying one
//! [`Ctx`]:
//!
//! 1. **admit**    read request id / idempotency key / action, reject
//!    oversized bodies and bad headers (nothing charged yet);
//! 2. **identify** API key (or `X-User-ID` from a trusted network) → user;
//! 3. **charge**   one Redis round trip (charge.lua) decides and deducts,
//!    or answers a repeated `Idempotency-Key` without forwarding;
//! 4. **forward**  stream the request to the upstream, wait for its headers;
//! 5. **settle**   keep the charge, or refund it (unreachable, timeout, 5xx,
//!    stalled body);
//! 6. **respond**  credit headers on whatever is answered, and log.
//!
//! A phase that refuses returns an [`ApiError`] and skips to respond.
//! Paths with dot segments or encoded slashes never get here: the router
//! refuses them first ([`check_path`]).
//!
//! The phases run as one [`Detached`] future: if the client hangs up, hyper
//! drops the handler, and the phases go on by themselves to the end, so a
//! charge made is always settled and logged.

mod detached;
mod headers;
mod path;
mod replay;
pub use crate::upstream::UpstreamError;
pub use path::check_path;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Limited};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use crate::accounts::{Credential, credentials};
use crate::billing::{Billing, Decision};
use crate::body::Body;
use crate::catalog::{Module, RateLimit};
use crate::connection::{Activity, ClientBody};
use crate::domain::{
    ActionId, Credits, IdempotencyKey, KeyHash, Networks, PlanId, RequestId, UserId,
};
use crate::error::ApiError;
use crate::leases::{Asked, Leases};
use crate::metering::{
    Balance, ChargeRequest, Idempotency, LeaseUse, Mode, RateState, Receipt, RefundOf,
    RefundOutcome, Repeat, Stamp,
};
use crate::telemetry::metrics::{self, ModuleMetrics};
use crate::upstream::{IdleTimeout, PooledBody, Upstreams};
use detached::Detached;

/// What the proxy takes from the settings.
pub struct ProxySettings {
    pub max_body_bytes: u64,
    pub body_idle_timeout: Duration,
    pub replay_max_bytes: usize,
    pub trust_user_id_header: bool,
    /// `auth.trusted_networks`: where `X-User-ID` is believed.
    pub trusted_networks: Networks,
    /// `server.trusted_proxies`: whose forwarding headers are kept.
    pub trusted_proxies: Networks,
    /// `log.access`: one log line per request.
    pub access_log: bool,
}

pub struct Proxy {
    billing: Billing,
    /// Credit leases (`metering.leases.enabled`): calls spent without Redis.
    leases: Option<Arc<Leases>>,
    upstreams: Upstreams,
    settings: ProxySettings,
    /// Per-module metric handles, resolved once (see [`ModuleMetrics`]).
    metrics: Vec<(Arc<Module>, ModuleMetrics)>,
    /// Each plan's `X-Plan` value, made once: a clone is a count where
    /// making it was an allocation and a copy for every call.
    plan_values: Vec<(PlanId, HeaderValue)>,
}

/// What the phases learn about one request.
struct Ctx {
    module: Arc<Module>,
    stamp: Stamp,
    /// `X-Request-Id` from the client, or generated: a trace id only.
    request_id: RequestId,
    idempotency_key: Option<IdempotencyKey>,
    action: Option<ActionId>,
    user: Option<UserId>,
    /// Set once charged; taken back by a refund.
    receipt: Option<Receipt>,
    /// Balance to report in the response headers.
    balance: Option<Balance>,
    /// The account's plan (from the charge), for metrics labels.
    plan: Option<PlanId>,
    /// The plan's rate limit and where the account stands in it, for the
    /// `RateLimit-Policy` and `RateLimit` headers.
    rate: Option<(RateLimit, RateState)>,
    charged: i64,
    outcome: &'static str,
}

/// The client's end of a connection, and what the settings make of it:
/// the same for every request the connection carries, so made once, when
/// it is accepted ([`Proxy::peer`]).
pub struct Peer {
    pub addr: SocketAddr,
    /// In `auth.trusted_networks`, with `auth.trust_user_id_header` on: its
    /// `X-User-ID` is believed.
    user_id_trusted: bool,
    /// In `server.trusted_proxies`: its forwarding headers are kept.
    trusted_proxy: bool,
    text: headers::PeerText,
    /// The connection: its driver keeps each call's response-header
    /// deadline.
    connection: Arc<Activity>,
}

/// Whether a refund is owed, and why.
enum Settlement {
    Keep,
    Refund(&'static str),
}

impl Proxy {
    /// Builds the per-module metric handles: call after the metrics
    /// recorder is installed.
    pub fn new(
        billing: Billing,
        leases: Option<Arc<Leases>>,
        upstreams: Upstreams,
        settings: ProxySettings,
    ) -> Self {
        let catalog = Arc::clone(billing.catalog());
        let plans = catalog.plans().iter().map(|p| p.id.as_str());
        let metrics = catalog
            .modules()
            .iter()
            .map(|m| {
                (
                    Arc::clone(m),
                    ModuleMetrics::new(m.id.as_str(), plans.clone()),
                )
            })
            .collect();
        let plan_values = catalog
            .plans()
            .iter()
            .filter_map(|p| {
                let value =
                    HeaderValue::from_maybe_shared(bytes::Bytes::from(p.id.as_str().to_owned()))
                        .ok()?;
                // The first clone turns the value's bytes into shared ones;
                // every later clone only counts.
                drop(value.clone());
                Some((p.id.clone(), value))
            })
            .collect();
        Self {
            plan_values,
            billing,
            leases,
            upstreams,
            settings,
            metrics,
        }
    }

    /// What every request of a connection from `addr` shares.
    pub fn peer(&self, addr: SocketAddr, connection: Arc<Activity>) -> Peer {
        Peer {
            connection,
            addr,
            user_id_trusted: self.settings.trust_user_id_header
                && self.settings.trusted_networks.contains(addr.ip()),
            trusted_proxy: self.settings.trusted_proxies.contains(addr.ip()),
            text: headers::PeerText::new(addr),
        }
    }

    fn metrics_of(&self, module: &Arc<Module>) -> Option<&ModuleMetrics> {
        self.metrics
            .iter()
            .find(|(m, _)| Arc::ptr_eq(m, module))
            .map(|(_, metrics)| metrics)
    }

    pub async fn handle(
        self: &Arc<Self>,
        module: Arc<Module>,
        req: Request<ClientBody>,
        peer: Arc<Peer>,
    ) -> Response<Body> {
        // One span per request: every event of the phases carries its
        // request id, user, module and (at the end) outcome.
        let span = tracing::info_span!(
            "request",
            module = %module.id,
            request_id = tracing::field::Empty,
            user = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let run = Arc::clone(self)
            .run(module, req, peer, span.clone())
            .instrument(span);
        Detached::new(run).await
    }

    async fn run(
        self: Arc<Self>,
        module: Arc<Module>,
        req: Request<ClientBody>,
        peer: Arc<Peer>,
        span: tracing::Span,
    ) -> Response<Body> {
        let started = Instant::now();
        let stamp = self.billing.calendar().now();
        let mut ctx = Ctx {
            module,
            // One clock read for both (a `X-Request-Id` replaces the id).
            request_id: RequestId::generate_at(stamp.now_ms()),
            stamp,
            idempotency_key: None,
            action: None,
            user: None,
            receipt: None,
            balance: None,
            plan: None,
            rate: None,
            charged: 0,
            outcome: "ok",
        };
        let response = match self.phases(&mut ctx, req, &peer, &span).await {
            Ok(response) => response,
            Err(e) => {
                ctx.outcome = e.code();
                e.into_response()
            }
        };
        span.record("request_id", ctx.request_id.as_str());
        span.record("outcome", ctx.outcome);
        let metrics = self.metrics_of(&ctx.module);
        respond(&ctx, response, started, metrics, self.settings.access_log)
    }

    async fn phases(
        &self,
        ctx: &mut Ctx,
        req: Request<ClientBody>,
        peer: &Peer,
        span: &tracing::Span,
    ) -> Result<Response<Body>, ApiError> {
        let wanted = Wanted::of(req.headers());
        self.admit(ctx, &wanted)?;
        span.record("request_id", ctx.request_id.as_str());
        let (user, key_hash) = self
            .identify(wanted.credentials, peer.user_id_trusted)
            .await?;
        span.record("user", user.as_str());
        ctx.user = Some(user.clone());
        if let Charged::Replayed(response) =
            self.charge(ctx, &user, key_hash.as_ref(), &req).await?
        {
            return Ok(response);
        }
        let result = self.forward(ctx, req, peer, &user).await;
        let settlement = match &result {
            Ok(r) if r.status().is_server_error() && ctx.module.refund_on_5xx => {
                Settlement::Refund("upstream_5xx")
            }
            Ok(_) => Settlement::Keep,
            Err(UpstreamError::Unreachable(_) | UpstreamError::Timeout(_))
                if !ctx.module.refund_on_failure =>
            {
                Settlement::Keep
            }
            // An oversized or stalled body or a bad target is never the
            // client's debt.
            Err(_) => Settlement::Refund("upstream_failure"),
        };
        self.settle(ctx, &user, settlement).await;
        let recording = self.recording(ctx, &user);
        match result {
            Ok(response) => {
                ctx.outcome = if response.status().is_server_error() {
                    "upstream_5xx"
                } else {
                    "ok"
                };
                let response = response.map(|b| b.map_err(Into::into).boxed_unsync());
                Ok(match recording {
                    Some(recording) => recording.wrap(response),
                    None => response,
                })
            }
            Err(e) => {
                // A kept charge whose call failed: a repeat cannot replay it.
                if let Some(recording) = recording {
                    recording.abandon().await;
                }
                Err(e.into())
            }
        }
    }

    /// Phase 1: everything that can be refused from the headers alone.
    fn admit(&self, ctx: &mut Ctx, headers: &Wanted<'_>) -> Result<(), ApiError> {
        if let Some(value) = headers.request_id {
            ctx.request_id = value
                .to_str()
                .ok()
                .and_then(|s| RequestId::parse(s.trim()).ok())
                .ok_or_else(|| {
                    ApiError::InvalidHeader(
                        "X-Request-Id must be 1 to 128 visible ASCII characters".into(),
                    )
                })?;
        }
        ctx.idempotency_key = IdempotencyKey::from_value(headers.idempotency_key)
            .map_err(|_| ApiError::bad_idempotency_key())?;
        if let Some(value) = headers.action {
            let action = value
                .to_str()
                .ok()
                .and_then(|s| ActionId::parse(s.trim()).ok())
                .ok_or_else(|| {
                    ApiError::InvalidHeader("X-Action must be a lowercase word [a-z0-9_]".into())
                })?;
            ctx.action = Some(action);
        }
        if let Some(value) = headers.content_length {
            let length: u64 = value
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| ApiError::InvalidHeader("Content-Length is not a number".into()))?;
            if length > self.settings.max_body_bytes {
                return Err(ApiError::PayloadTooLarge {
                    limit: self.settings.max_body_bytes,
                });
            }
        }
        Ok(())
    }

    /// Phase 2: who is calling. The key → user mapping is cached; whether
    /// the key is still live is decided by charge.lua in the same round trip
    /// as the charge. `X-User-ID` counts only from a trusted network.
    async fn identify(
        &self,
        presented: credentials::Presented<'_>,
        trust_user_id: bool,
    ) -> Result<(UserId, Option<KeyHash>), ApiError> {
        match credentials::presented(presented, trust_user_id) {
            Err(credentials::CredentialError::Missing) => Err(ApiError::Unauthenticated(
                "send Authorization: Bearer <api key> or X-API-Key",
            )),
            Err(credentials::CredentialError::Malformed(why)) => {
                Err(ApiError::Unauthenticated(why))
            }
            Ok(Credential::TrustedUser(user)) => Ok((user, None)),
            Ok(Credential::Key(hash)) => match self.billing.accounts().user_for_key(&hash).await? {
                Some(user) => Ok((user, Some(hash))),
                None => Err(ApiError::Unauthenticated("unknown API key")),
            },
        }
    }

    /// Phase 3: decide and deduct atomically (rebuilding the account in
    /// Redis first if it is not there). A repeated `Idempotency-Key` is
    /// answered here and never forwarded.
    async fn charge(
        &self,
        ctx: &mut Ctx,
        user: &UserId,
        key_hash: Option<&KeyHash>,
        req: &Request<ClientBody>,
    ) -> Result<Charged, ApiError> {
        let fingerprint = ctx
            .idempotency_key
            .as_ref()
            .map(|_| fingerprint(req, &ctx.module));
        let idempotency = match (&ctx.idempotency_key, &fingerprint) {
            (Some(key), Some(fingerprint)) => Idempotency::Key {
                key,
                fingerprint,
                lease_until_ms: ctx.stamp.now_ms()
                    + i64::try_from(lease(&ctx.module).as_millis()).unwrap_or(i64::MAX / 2),
            },
            _ => Idempotency::None,
        };
        // A call without an Idempotency-Key may be spent from a lease this
        // worker holds: no Redis call. Otherwise a hot account's charge
        // may ask for one.
        let leases = self
            .leases
            .as_ref()
            .filter(|_| ctx.idempotency_key.is_none());
        if let Some(leases) = leases {
            let spent = leases.spend(
                user,
                key_hash,
                &ctx.module,
                ctx.action.as_ref(),
                &ctx.request_id,
                &ctx.stamp,
            );
            if let Some(receipt) = spent {
                return Ok(self.charged(ctx, key_hash, receipt));
            }
        }
        let mut ask = leases.and_then(|l| {
            let cost = ctx.module.cost_of(ctx.action.as_ref());
            l.ask(user, key_hash, &ctx.module, &ctx.stamp, cost)
        });
        if let (Some(leases), Some(a)) = (leases, &ask)
            && !leases.announce(user, a)
            && let Some(a) = ask.take()
        {
            // Not asked: Redis never saw it.
            leases.asked(
                user,
                key_hash,
                &ctx.module,
                a,
                Asked::Answered(None),
                &ctx.stamp,
            );
        }
        let mode = ask.as_ref().map_or(Mode::Charge, |a| a.mode);
        let request = ChargeRequest {
            user,
            key_hash,
            module: &ctx.module,
            action: ctx.action.as_ref(),
            request_id: &ctx.request_id,
            idempotency,
            actor: "proxy",
            stamp: &ctx.stamp,
            mode,
        };
        let decided = self.billing.charge(&request).await;
        if let (Some(leases), Some(ask)) = (leases, ask) {
            let answer = match &decided {
                Ok(Decision::Charged(receipt)) => Asked::Answered(Some(receipt)),
                Ok(_) => Asked::Answered(None),
                Err(_) => Asked::Unknown,
            };
            leases.asked(user, key_hash, &ctx.module, ask, answer, &ctx.stamp);
        }
        match decided {
            Ok(Decision::Charged(receipt)) => Ok(self.charged(ctx, key_hash, receipt)),
            Ok(Decision::Repeat(Repeat::Replay {
                response,
                balance,
                plan,
                ..
            })) => {
                ctx.balance = Some(balance);
                ctx.plan = Some(plan);
                ctx.outcome = "replayed";
                Ok(Charged::Replayed(replay::rebuild(response)))
            }
            Ok(Decision::Repeat(Repeat::InProgress { original })) => {
                Err(ApiError::RequestInProgress(original))
            }
            Ok(Decision::Repeat(Repeat::NotReplayable { original })) => {
                Err(ApiError::DuplicateRequest(original))
            }
            Ok(Decision::Repeat(Repeat::KeyReused { original })) => {
                Err(ApiError::IdempotencyKeyReused(original))
            }
            // Only the credits API's request ids produce duplicates.
            Ok(Decision::Duplicate { .. }) => Err(ApiError::Internal),
            Ok(Decision::Refused(refusal)) => {
                let cost = ctx.module.cost_of(ctx.action.as_ref()).get();
                Err(ApiError::refusal(refusal, &ctx.module.id, cost, &ctx.stamp))
            }
            Err(e) => Err(ApiError::for_caller(e)),
        }
    }

    /// A charge made, in Redis or from a lease: what the later phases and
    /// the response need of it.
    fn charged(&self, ctx: &mut Ctx, key_hash: Option<&KeyHash>, receipt: Receipt) -> Charged {
        if let Some(m) = self.metrics_of(&ctx.module) {
            m.charged(receipt.plan.as_str(), receipt.charged);
        }
        if let Some(hash) = key_hash {
            self.billing.accounts().note_key_use(hash, ctx.stamp.now);
        }
        ctx.charged = receipt.charged;
        ctx.balance = Some(Leases::view_of(&receipt));
        ctx.rate = receipt.rate.and_then(|state| {
            let plan = self.billing.catalog().plan(receipt.plan.as_str())?;
            Some((plan.rate_limit?, state))
        });
        ctx.plan = Some(receipt.plan.clone());
        ctx.receipt = Some(receipt);
        Charged::Fresh
    }

    /// Phase 4: stream the request to the upstream.
    async fn forward(
        &self,
        ctx: &Ctx,
        req: Request<ClientBody>,
        peer: &Peer,
        user: &UserId,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let (mut parts, body) = req.into_parts();
        parts.uri = Upstreams::target(&ctx.module, std::mem::take(&mut parts.uri))?;
        parts.version = http::Version::HTTP_11;
        headers::prepare_upstream_headers(
            &mut parts.headers,
            &peer.text,
            peer.trusted_proxy,
            user.as_str(),
            ctx.plan.as_ref().and_then(|plan| {
                let (_, value) = self.plan_values.iter().find(|(id, _)| id == plan)?;
                Some(value.clone())
            }),
            ctx.request_id.as_str(),
        );
        let limit = usize::try_from(self.settings.max_body_bytes).unwrap_or(usize::MAX);
        let body = Limited::new(
            IdleTimeout::new(body, self.settings.body_idle_timeout),
            limit,
        );
        let request = Request::from_parts(parts, body);
        let started = Instant::now();
        let sent = {
            let _gauge = metrics::Held::upstream_in_flight();
            self.upstreams
                .send(&ctx.module, request, &peer.connection)
                .await
        };
        if let Some(m) = self.metrics_of(&ctx.module) {
            m.upstream(started.elapsed());
        }
        let mut response = sent?;
        headers::strip_hop_by_hop(response.headers_mut());
        Ok(response)
    }

    /// Phase 5: give the charge back when the call failed. The phases run
    /// detached from the client, so this completes even if it has gone.
    async fn settle(&self, ctx: &mut Ctx, user: &UserId, settlement: Settlement) {
        let Settlement::Refund(reason) = settlement else {
            return;
        };
        let Some(receipt) = ctx.receipt.take() else {
            return;
        };
        if let (Some(leases), Some(LeaseUse::SpentFrom(lease))) = (&self.leases, &receipt.lease) {
            // Back to its lease while the lease is open; after, in Redis.
            let back = leases.give_back(
                user,
                lease,
                &receipt,
                &ctx.module,
                ctx.action.as_ref(),
                &ctx.request_id,
                &ctx.stamp,
            );
            if back {
                if let Some(m) = self.metrics_of(&ctx.module) {
                    m.refunded(receipt.plan.as_str(), receipt.charged);
                }
                ctx.charged = 0;
                if let Some(b) = ctx.balance.as_mut() {
                    b.monthly = Credits::recorded(b.monthly.get() + receipt.from_monthly);
                    b.bonus = Credits::recorded(b.bonus.get() + receipt.from_bonus);
                    b.day_used = Credits::recorded(b.day_used.get() - receipt.charged);
                }
                tracing::info!(request_id = %ctx.request_id, reason, "leased call given back");
                return;
            }
        }
        let of = match &ctx.idempotency_key {
            Some(key) => RefundOf::Idempotent(key),
            None => RefundOf::Receipt {
                receipt: &receipt,
                module: &ctx.module.id,
                action: ctx.action.as_ref(),
                charged_at: &ctx.stamp,
            },
        };
        let now = self.billing.calendar().now();
        match self
            .billing
            .meter()
            .refund(user, &ctx.request_id, of, "proxy", &now)
            .await
        {
            Ok(RefundOutcome::Refunded {
                amount,
                monthly,
                bonus,
                day_used,
            }) => {
                if let Some(m) = self.metrics_of(&ctx.module) {
                    m.refunded(ctx.plan.as_ref().map_or("", PlanId::as_str), amount);
                }
                ctx.charged = 0;
                if let Some(b) = ctx.balance.as_mut() {
                    b.monthly = Credits::recorded(monthly);
                    b.bonus = Credits::recorded(bonus);
                    b.day_used = Credits::recorded(day_used);
                }
                tracing::info!(request_id = %ctx.request_id, reason, "charge refunded");
            }
            Ok(other) => {
                tracing::error!(request_id = %ctx.request_id, ?other, reason, "refund found nothing to refund");
            }
            Err(e) => {
                tracing::error!(request_id = %ctx.request_id, error = %e, reason, "refund failed; charge kept");
            }
        }
    }

    /// For a kept charge under an `Idempotency-Key`: what will keep its
    /// response for replay.
    fn recording(&self, ctx: &Ctx, user: &UserId) -> Option<replay::Recording> {
        let key = ctx.idempotency_key.clone()?;
        let receipt = ctx.receipt.as_ref()?;
        Some(replay::Recording {
            meter: self.billing.meter().clone(),
            user: user.clone(),
            key,
            event_id: receipt.event_id.clone(),
            max_bytes: self.settings.replay_max_bytes,
        })
    }
}

/// The charge phase's answer when it does not refuse.
enum Charged {
    /// Charged (the account's plan is in the context); forward.
    Fresh,
    /// A repeated `Idempotency-Key`: the first call's response.
    Replayed(Response<Body>),
}

/// What makes two requests "the same" for an `Idempotency-Key`: method,
/// module, path and query.
fn fingerprint(req: &Request<ClientBody>, module: &Module) -> String {
    let mut h = Sha256::new();
    h.update(req.method().as_str().as_bytes());
    h.update(b" ");
    h.update(module.id.as_str().as_bytes());
    h.update(b" ");
    h.update(
        req.uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    hex::encode(h.finalize())
}

/// How long a first call without an answer counts as in progress: the
/// upstream's deadline for its headers, plus slack for the client's body.
fn lease(module: &Module) -> Duration {
    module.timeout + Duration::from_secs(5)
}

const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The request headers the proxy reads, found in one walk over the map
/// with a `match` on each name: seven lookups each hashed their name and
/// probed the map (about 900 instructions a request, against a walk over a
/// request's handful of headers; bench/gateway_instructions.sh). The
/// first value of a name counts, as `HeaderMap::get` gives it.
#[derive(Default)]
struct Wanted<'a> {
    request_id: Option<&'a HeaderValue>,
    idempotency_key: Option<&'a HeaderValue>,
    action: Option<&'a HeaderValue>,
    content_length: Option<&'a HeaderValue>,
    credentials: credentials::Presented<'a>,
}

impl<'a> Wanted<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let mut w = Self::default();
        for (name, value) in headers {
            let slot = match name.as_str() {
                "x-request-id" => &mut w.request_id,
                "idempotency-key" => &mut w.idempotency_key,
                "x-action" => &mut w.action,
                "content-length" => &mut w.content_length,
                "authorization" => &mut w.credentials.authorization,
                "x-api-key" => &mut w.credentials.api_key,
                "x-user-id" => &mut w.credentials.user_id,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        w
    }
}

const X_CREDITS_CHARGED: http::HeaderName = http::HeaderName::from_static("x-credits-charged");
const RATELIMIT_POLICY: http::HeaderName = http::HeaderName::from_static("ratelimit-policy");
const RATELIMIT: http::HeaderName = http::HeaderName::from_static("ratelimit");
const X_CREDITS_REMAINING: http::HeaderName = http::HeaderName::from_static("x-credits-remaining");
const X_DAILY_REMAINING: http::HeaderName = http::HeaderName::from_static("x-daily-remaining");

/// `n` as a header value. The credits a call is charged are a few, and
/// their values come from a table made once: `HeaderValue::from` allocates
/// every time. Its entries are `'static` (leaked once, 256 short strings),
/// so a clone copies a pointer and never counts references across cores.
fn count_value(n: i64) -> HeaderValue {
    static SMALL: std::sync::LazyLock<Vec<HeaderValue>> = std::sync::LazyLock::new(|| {
        (0..256)
            .map(|n: i64| HeaderValue::from_static(Box::leak(n.to_string().into_boxed_str())))
            .collect()
    });
    usize::try_from(n)
        .ok()
        .and_then(|i| SMALL.get(i))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(n))
}

/// Phase 6: headers every answer carries, and the request's log line.
fn respond(
    ctx: &Ctx,
    mut response: Response<Body>,
    started: Instant,
    metrics: Option<&ModuleMetrics>,
    access_log: bool,
) -> Response<Body> {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(ctx.request_id.as_str()) {
        h.insert(X_REQUEST_ID, v);
    }
    if let Some(balance) = ctx.balance {
        h.insert(X_CREDITS_CHARGED, count_value(ctx.charged));
        h.insert(X_CREDITS_REMAINING, HeaderValue::from(balance.remaining()));
        if let Some(daily) = balance.daily_remaining() {
            h.insert(X_DAILY_REMAINING, HeaderValue::from(daily));
        }
    }
    if let Some((limit, state)) = ctx.rate {
        // IETF httpapi ratelimit-headers (draft 09): the policy is the
        // burst and the time it takes to come back whole; `r` is what
        // passes right now, `t` the seconds until the burst is whole.
        let policy = format!("\"default\";q={};w={}", limit.burst, limit.window_secs());
        let now = format!(
            "\"default\";r={};t={}",
            state.remaining,
            state.reset_ms.div_ceil(1000)
        );
        if let (Ok(policy), Ok(now)) = (HeaderValue::from_str(&policy), HeaderValue::from_str(&now))
        {
            h.insert(RATELIMIT_POLICY, policy);
            h.insert(RATELIMIT, now);
        }
    }
    if let Some(m) = metrics {
        m.request(ctx.outcome, started.elapsed());
    }
    if !access_log {
        return response;
    }
    tracing::info!(
        request_id = %ctx.request_id,
        user = ctx.user.as_ref().map(UserId::as_str),
        module = %ctx.module.id,
        outcome = ctx.outcome,
        status = response.status().as_u16(),
        charged = ctx.charged,
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "proxied"
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk finds what `HeaderMap::get` finds, for every name it reads,
    /// including a name sent twice (the first value) and one not sent.
    #[test]
    fn the_header_walk_reads_what_get_reads() {
        let names = [
            "x-request-id",
            "idempotency-key",
            "x-action",
            "content-length",
            "authorization",
            "x-api-key",
            "x-user-id",
        ];
        for skip in 0..=names.len() {
            let mut h = HeaderMap::new();
            h.insert("host", HeaderValue::from_static("gw"));
            for (i, name) in names.iter().enumerate().filter(|(i, _)| *i != skip) {
                let name = http::HeaderName::from_static(name);
                h.append(name.clone(), HeaderValue::from(i));
                h.append(name, HeaderValue::from(i + 100));
            }
            h.insert("x-other", HeaderValue::from_static("x"));
            let w = Wanted::of(&h);
            let found = [
                w.request_id,
                w.idempotency_key,
                w.action,
                w.content_length,
                w.credentials.authorization,
                w.credentials.api_key,
                w.credentials.user_id,
            ];
            for (name, found) in names.iter().zip(found) {
                assert_eq!(found, h.get(*name), "{name}, without {skip}");
            }
        }
    }

    #[test]
    fn counts_are_their_decimal_text_in_and_past_the_table() {
        for n in [0, 1, 7, 255, 256, 1_000_000, -1] {
            assert_eq!(count_value(n), HeaderValue::from(n), "{n}");
        }
    }
}
