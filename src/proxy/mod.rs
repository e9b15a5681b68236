//! The metering proxy: the hot path, top to bottom.
//!
//! A request to a module prefix passes these phases, carrying one
//! [`Ctx`]:
//!
//! 1. **admit**    read request id / idempotency key / action, reject
//!    oversized bodies and bad headers (nothing charged yet);
//! 2. **identify** API key (or trusted `X-User-ID`) → user;
//! 3. **charge**   one Redis round trip (charge.lua) decides and deducts;
//! 4. **forward**  stream the request to the upstream, wait for its headers;
//! 5. **settle**   keep the charge, or refund it (unreachable, timeout, 5xx);
//! 6. **respond**  credit headers on whatever is answered, and log.
//!
//! A phase that refuses returns an [`ApiError`] and skips to respond.
//! Settling runs after every forward, on a spawned task, so a client that
//! hangs up during the refund cannot cancel it.

mod connector;
mod headers;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::accounts::{Credential, credentials};
use crate::billing::{Billing, BillingError, Decision};
use crate::body::Body;
use crate::catalog::Module;
use crate::domain::{ActionId, KeyHash, RequestId, UserId};
use crate::error::ApiError;
use crate::metering::{Balance, ChargeRequest, Mode, Receipt, RefundOf, RefundOutcome, Stamp};
use crate::telemetry::metrics;
use upstream::{UpstreamError, Upstreams};

pub struct Proxy {
    billing: Billing,
    upstreams: Upstreams,
    max_body_bytes: u64,
    trust_user_id_header: bool,
}

/// What the phases learn about one request.
struct Ctx<'a> {
    module: &'a Module,
    stamp: Stamp,
    request_id: RequestId,
    /// The request id came from the client (Idempotency-Key / X-Request-Id).
    idempotent: bool,
    action: Option<ActionId>,
    user: Option<UserId>,
    /// Set once charged; `None` for duplicates (forwarded free).
    receipt: Option<Receipt>,
    /// Balance to report in the response headers.
    balance: Option<Balance>,
    /// The account's plan (from the charge), for metrics labels.
    plan: Option<String>,
    charged: i64,
    outcome: &'static str,
}

/// Whether a refund is owed, and why.
enum Settlement {
    Keep,
    Refund(&'static str),
}

impl Proxy {
    pub fn new(
        billing: Billing,
        upstreams: Upstreams,
        max_body_bytes: u64,
        trust_user_id_header: bool,
    ) -> Self {
        Self {
            billing,
            upstreams,
            max_body_bytes,
            trust_user_id_header,
        }
    }

    pub async fn handle(
        self: &Arc<Self>,
        module: &Module,
        req: Request<Incoming>,
        peer: SocketAddr,
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
        self.run(module, req, peer, span.clone())
            .instrument(span)
            .await
    }

    async fn run(
        self: &Arc<Self>,
        module: &Module,
        req: Request<Incoming>,
        peer: SocketAddr,
        span: tracing::Span,
    ) -> Response<Body> {
        let started = Instant::now();
        let mut ctx = Ctx {
            module,
            stamp: self.billing.calendar.now(),
            request_id: RequestId::generate(),
            idempotent: false,
            action: None,
            user: None,
            receipt: None,
            balance: None,
            plan: None,
            charged: 0,
            outcome: "ok",
        };
        let response = match self.phases(&mut ctx, req, peer, &span).await {
            Ok(response) => response,
            Err(e) => {
                ctx.outcome = e.code();
                e.into_response()
            }
        };
        span.record("request_id", ctx.request_id.as_str());
        span.record("outcome", ctx.outcome);
        respond(&ctx, response, started)
    }

    async fn phases(
        self: &Arc<Self>,
        ctx: &mut Ctx<'_>,
        req: Request<Incoming>,
        peer: SocketAddr,
        span: &tracing::Span,
    ) -> Result<Response<Body>, ApiError> {
        self.admit(ctx, req.headers())?;
        span.record("request_id", ctx.request_id.as_str());
        let (user, key_hash) = self.identify(req.headers()).await?;
        span.record("user", user.as_str());
        ctx.user = Some(user.clone());
        let plan = self.charge(ctx, &user, key_hash.as_ref()).await?;
        let result = self.forward(ctx, req, peer, &user, &plan).await;
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
            // An oversized body or a bad target is never the client's debt.
            Err(_) => Settlement::Refund("upstream_failure"),
        };
        self.settle(ctx, &user, settlement).await;
        match result {
            Ok(response) => {
                ctx.outcome = if response.status().is_server_error() {
                    "upstream_5xx"
                } else {
                    "ok"
                };
                Ok(response.map(|b| b.map_err(Into::into).boxed_unsync()))
            }
            Err(UpstreamError::Timeout(d)) => Err(ApiError::UpstreamTimeout(d)),
            Err(UpstreamError::BodyTooLarge) => Err(ApiError::PayloadTooLarge {
                limit: self.max_body_bytes,
            }),
            Err(e) => {
                tracing::warn!(error = %e, module = %ctx.module.id, "upstream failed");
                Err(ApiError::UpstreamUnavailable)
            }
        }
    }

    /// Phase 1: everything that can be refused from the headers alone.
    fn admit(&self, ctx: &mut Ctx<'_>, headers: &HeaderMap) -> Result<(), ApiError> {
        let client_id = headers
            .get("idempotency-key")
            .map(|v| ("Idempotency-Key", v))
            .or_else(|| headers.get("x-request-id").map(|v| ("X-Request-Id", v)));
        if let Some((name, value)) = client_id {
            let id = value
                .to_str()
                .ok()
                .and_then(|s| RequestId::parse(s.trim()).ok())
                .ok_or_else(|| {
                    ApiError::InvalidHeader(format!(
                        "{name} must be 1 to 128 visible ASCII characters"
                    ))
                })?;
            ctx.request_id = id;
            ctx.idempotent = true;
        }
        if let Some(value) = headers.get("x-action") {
            let action = value
                .to_str()
                .ok()
                .and_then(|s| ActionId::parse(s.trim()).ok())
                .ok_or_else(|| {
                    ApiError::InvalidHeader("X-Action must be a lowercase word [a-z0-9_]".into())
                })?;
            ctx.action = Some(action);
        }
        if let Some(value) = headers.get(http::header::CONTENT_LENGTH) {
            let length: u64 = value
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| ApiError::InvalidHeader("Content-Length is not a number".into()))?;
            if length > self.max_body_bytes {
                return Err(ApiError::PayloadTooLarge {
                    limit: self.max_body_bytes,
                });
            }
        }
        Ok(())
    }

    /// Phase 2: who is calling. The key → user mapping is cached; whether
    /// the key is still live is decided by charge.lua in the same round trip
    /// as the charge.
    async fn identify(&self, headers: &HeaderMap) -> Result<(UserId, Option<KeyHash>), ApiError> {
        match credentials::from_headers(headers, self.trust_user_id_header) {
            Err(credentials::CredentialError::Missing) => Err(ApiError::Unauthenticated(
                "send Authorization: Bearer <api key> or X-API-Key",
            )),
            Err(credentials::CredentialError::Malformed(why)) => {
                Err(ApiError::Unauthenticated(why))
            }
            Ok(Credential::TrustedUser(user)) => Ok((user, None)),
            Ok(Credential::Key(key)) => {
                let hash = key.hash();
                match self.billing.accounts.user_for_key(&hash).await? {
                    Some(user) => Ok((user, Some(hash))),
                    None => Err(ApiError::Unauthenticated("unknown API key")),
                }
            }
        }
    }

    /// Phase 3: decide and deduct atomically (rebuilding the account in
    /// Redis first if it is not there). Returns the account's plan.
    async fn charge(
        &self,
        ctx: &mut Ctx<'_>,
        user: &UserId,
        key_hash: Option<&KeyHash>,
    ) -> Result<String, ApiError> {
        let request = ChargeRequest {
            user,
            key_hash,
            module: ctx.module,
            action: ctx.action.as_ref(),
            request_id: &ctx.request_id,
            idempotent: ctx.idempotent,
            actor: "proxy",
            stamp: &ctx.stamp,
            mode: Mode::Charge,
        };
        match self.billing.charge(&request).await {
            Ok(Decision::Charged(receipt)) => {
                metrics::charged(ctx.module.id.as_str(), &receipt.plan, receipt.charged);
                ctx.charged = receipt.charged;
                ctx.balance = Some(receipt.balance);
                ctx.plan = Some(receipt.plan.clone());
                let plan = receipt.plan.clone();
                ctx.receipt = Some(receipt);
                Ok(plan)
            }
            Ok(Decision::Duplicate { balance, plan }) => {
                ctx.balance = Some(balance);
                ctx.plan = Some(plan.clone());
                Ok(plan)
            }
            Ok(Decision::Refused(refusal)) => {
                let cost = ctx.module.cost_of(ctx.action.as_ref()).get();
                Err(ApiError::refusal(refusal, &ctx.module.id, cost, &ctx.stamp))
            }
            // The key resolved to a user Postgres no longer has.
            Err(BillingError::UnknownUser(_)) => Err(ApiError::Unauthenticated("unknown user")),
            Err(e) => Err(e.into()),
        }
    }

    /// Phase 4: stream the request to the upstream.
    async fn forward(
        &self,
        ctx: &Ctx<'_>,
        req: Request<Incoming>,
        peer: SocketAddr,
        user: &UserId,
        plan: &str,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (mut parts, body) = req.into_parts();
        parts.uri = Upstreams::target(ctx.module, &parts.uri)?;
        parts.version = http::Version::HTTP_11;
        headers::prepare_upstream_headers(
            &mut parts.headers,
            peer,
            user.as_str(),
            Some(plan),
            ctx.request_id.as_str(),
        );
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let request = Request::from_parts(parts, Limited::new(body, limit));
        let started = Instant::now();
        metrics::upstream_in_flight(1.0);
        let sent = self.upstreams.send(ctx.module, request).await;
        metrics::upstream_in_flight(-1.0);
        metrics::upstream(ctx.module.id.as_str(), started.elapsed());
        let mut response = sent?;
        headers::strip_hop_by_hop(response.headers_mut());
        Ok(response)
    }

    /// Phase 5: give the charge back when the call failed. Runs on its own
    /// task: the refund completes even if the client has gone away.
    async fn settle(self: &Arc<Self>, ctx: &mut Ctx<'_>, user: &UserId, settlement: Settlement) {
        let Settlement::Refund(reason) = settlement else {
            return;
        };
        let Some(receipt) = ctx.receipt.take() else {
            return; // a duplicate: nothing was charged
        };
        let this = Arc::clone(self);
        let user = user.clone();
        let request_id = ctx.request_id.clone();
        let idempotent = ctx.idempotent;
        let module = ctx.module.id.clone();
        let action = ctx.action.clone();
        let charged_at = ctx.stamp.clone();
        let task = tokio::spawn(async move {
            let of = if idempotent {
                RefundOf::Record
            } else {
                RefundOf::Receipt {
                    receipt: &receipt,
                    module: &module,
                    action: action.as_ref(),
                    charged_at: &charged_at,
                }
            };
            let now = this.billing.calendar.now();
            this.billing
                .meter
                .refund(&user, &request_id, of, "proxy", &now)
                .await
        });
        match task.await {
            Ok(Ok(RefundOutcome::Refunded {
                amount,
                monthly,
                bonus,
                day_used,
            })) => {
                metrics::refunded(
                    ctx.module.id.as_str(),
                    ctx.plan.as_deref().unwrap_or(""),
                    amount,
                );
                ctx.charged = 0;
                if let Some(b) = ctx.balance.as_mut() {
                    b.monthly = monthly;
                    b.bonus = bonus;
                    b.day_used = day_used;
                }
                tracing::info!(request_id = %ctx.request_id, reason, "charge refunded");
            }
            Ok(Ok(other)) => {
                tracing::error!(request_id = %ctx.request_id, ?other, reason, "refund found nothing to refund");
            }
            Ok(Err(e)) => {
                tracing::error!(request_id = %ctx.request_id, error = %e, reason, "refund failed; charge kept");
            }
            Err(e) => {
                tracing::error!(request_id = %ctx.request_id, error = %e, "refund task failed");
            }
        }
    }
}

/// Phase 6: headers every answer carries, and the request's log line.
fn respond(ctx: &Ctx<'_>, mut response: Response<Body>, started: Instant) -> Response<Body> {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(ctx.request_id.as_str()) {
        h.insert("x-request-id", v);
    }
    if let Some(balance) = ctx.balance {
        h.insert("x-credits-charged", HeaderValue::from(ctx.charged));
        h.insert(
            "x-credits-remaining",
            HeaderValue::from(balance.remaining()),
        );
        if let Some(daily) = balance.daily_remaining() {
            h.insert("x-daily-remaining", HeaderValue::from(daily));
        }
    }
    metrics::request(ctx.module.id.as_str(), ctx.outcome, started.elapsed());
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
