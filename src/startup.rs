//! Building the application (bind, pools, scripts) and running it until a
//! shutdown signal.
//!
//! [`Application::build`] binds first, so tests can ask for port 0 and read
//! [`Application::port`]; [`Application::run_until_stopped`] serves until
//! the given future resolves, then stops accepting and lets in-flight
//! requests finish for up to `server.shutdown_grace_ms`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::accounts::ApiKeys;
use crate::accounts::{self, Accounts};
use crate::api;
use crate::billing::Billing;
use crate::body::{Body, BoxError};
use crate::config::Settings;
use crate::connection::{self, Activity, Busy, ClientBody, Serving};
use crate::error::ApiError;
use crate::ledger::{FlushError, Flusher};
use crate::metering::{Calendar, Meter, MeterError};
use crate::proxy::{Peer, Proxy, ProxySettings};
use crate::state::AppState;
use crate::telemetry::metrics;
use crate::upstream::Upstreams;

#[derive(Debug, Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("redis: {0}")]
    Redis(#[from] MeterError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("ledger: {0}")]
    Ledger(#[from] FlushError),
    #[error("spend log: {0}")]
    SpendLog(std::io::Error),
}

pub struct Application {
    listener: TcpListener,
    state: Arc<AppState>,
    flushers: Vec<Flusher>,
    settings: Settings,
    /// Runs the admin reconciler (once per process is enough).
    reconciler: bool,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, StartupError> {
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        Self::with_listener(settings, listener, true, None)
    }

    /// One worker of thread-per-core mode (see [`Settings::for_worker`]):
    /// its listener shares the port with the other workers' (SO_REUSEPORT,
    /// the kernel spreads connections), and only the first worker runs the
    /// admin reconciler. `spend_log`: the process's spend log, which every
    /// worker's credit leases share (`metering.leases`).
    pub async fn build_worker(
        settings: Settings,
        first: bool,
        spend_log: Option<Arc<crate::leases::SharedLog>>,
    ) -> Result<Self, StartupError> {
        let bind = |addr: SocketAddr| -> std::io::Result<TcpListener> {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            socket.listen(1024)
        };
        let listener = bind(settings.listen).map_err(|source| StartupError::Bind {
            addr: settings.listen,
            source,
        })?;
        Self::with_listener(settings, listener, first, spend_log)
    }

    fn with_listener(
        settings: Settings,
        listener: TcpListener,
        reconciler: bool,
        spend_log: Option<Arc<crate::leases::SharedLog>>,
    ) -> Result<Self, StartupError> {
        let state = Arc::new(build_state(&settings, spend_log)?);
        let flushers = if settings.ledger.flusher {
            // Their own Postgres pool: its connections belong to the
            // flushers' own runtime (see `run_until_stopped`).
            let mut database = settings.database.clone();
            database.max_connections = u32::try_from(settings.ledger.workers)
                .unwrap_or(u32::MAX)
                .saturating_add(1);
            Flusher::new(
                &settings.redis.url,
                state.billing.meter().keys(),
                crate::accounts::connect_pool(&database)?,
                crate::ledger::FlusherConfig::from_settings(&settings.ledger),
            )?
            .with_hook(state.billing.outbox().clone())
            .into_workers(settings.ledger.workers)?
        } else {
            Vec::new()
        };
        Ok(Self {
            listener,
            state,
            flushers,
            settings,
            reconciler,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), std::io::Error> {
        let mut builder = http1::Builder::new();
        // `server.header_read_timeout_ms` is kept by `connection::serve`,
        // with one timer per connection instead of one per request.
        builder.header_read_timeout(None).keep_alive(true);
        // Every connection holds a receiver: the sender's `closed` is the
        // moment the last one has ended.
        let (stop_connections, connections_stopped) = tokio::sync::watch::channel(false);
        tokio::pin!(shutdown);
        let (stop_flushers, flushers_stopped) = tokio::sync::watch::channel(false);
        let flushers = run_flushers(self.flushers, flushers_stopped)?;
        let (stop_leases, leases_stopped) = tokio::sync::watch::channel(false);
        let leases = self
            .state
            .leases
            .clone()
            .map(|l| tokio::spawn(l.run(self.reconciler, leases_stopped)));
        tracing::info!(addr = %self.listener.local_addr()?, "creditgate listening");
        let mut background = Vec::new();
        if let Some(handle) = self.state.metrics.clone() {
            background.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    metrics::upkeep(&handle);
                }
            }));
        }
        if self.reconciler {
            background.push(tokio::spawn(reconcile(self.state.billing.clone())));
            background.push(tokio::spawn(partitions(
                self.state.billing.accounts().pool().clone(),
                self.state.billing.calendar().clone(),
                self.settings.ledger.retention_months,
            )));
        }
        background.push(tokio::spawn(calibrate(self.state.billing.meter().clone())));
        background.push(tokio::spawn(key_uses(
            self.state.billing.accounts().clone(),
        )));
        background.push(tokio::spawn(
            crate::webhooks::Deliverer::new(
                self.state.billing.accounts().pool().clone(),
                Arc::clone(self.state.billing.outbox()),
            )
            .run(),
        ));
        if let Some(addr) = self.settings.metrics_listen {
            let listener = TcpListener::bind(addr).await?;
            tracing::info!(%addr, "metrics listening");
            background.push(tokio::spawn(serve_metrics(
                listener,
                Arc::clone(&self.state),
            )));
        }
        let front = Arc::new(Front {
            api: api::router(Arc::clone(&self.state)),
            state: Arc::clone(&self.state),
        });
        // Whether a connection's driver must be told when a call begins.
        let shortest_call = front
            .state
            .billing
            .catalog()
            .modules()
            .iter()
            .map(|m| m.timeout)
            .min()
            .unwrap_or(connection::PARK_AFTER);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let front = Arc::clone(&front);
            let activity = Activity::new(self.settings.header_read_timeout, shortest_call);
            let busy = Arc::clone(&activity);
            let peer = Arc::new(front.state.proxy.peer(peer, Arc::clone(&activity)));
            let service = service_fn(move |req| {
                let front = Arc::clone(&front);
                let peer = Arc::clone(&peer);
                let busy = busy.begin();
                let req = req.map(|body| ClientBody::new(body, busy.also()));
                async move { Ok::<_, std::convert::Infallible>(route(front, req, peer, busy).await) }
            });
            let serving = Serving {
                http: builder.clone(),
                stop: connections_stopped.clone(),
            };
            tokio::spawn(connection::serve(stream, service, activity, serving));
        }
        drop(self.listener);
        drop(connections_stopped);
        tracing::info!("shutting down: waiting for in-flight requests");
        let _ = stop_connections.send(true);
        if tokio::time::timeout(self.settings.shutdown_grace, stop_connections.closed())
            .await
            .is_err()
        {
            tracing::warn!("grace period over; abandoning remaining connections");
        }
        for task in background {
            task.abort();
        }
        // Requests are done: the leases are settled and their calls written
        // to the ledger, and then every charge is in the streams.
        let _ = stop_leases.send(true);
        if let Some(leases) = leases {
            let _ = leases.await;
        }
        let _ = stop_flushers.send(true);
        let _ = flushers.await;
        Ok(())
    }
}

/// Runs the ledger flushers on a thread of their own, with their own
/// runtime. A flush parses and binds thousands of events at a time: on a
/// request thread that held up every request queued behind it (p99 at
/// saturation 17 ms there, 7 ms with the flushers on their own thread,
/// docs/BENCHMARKS.md). The returned receiver resolves when they have
/// stopped, after `stopped` turns true and their last batch is written.
fn run_flushers(
    flushers: Vec<Flusher>,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done, finished) = tokio::sync::oneshot::channel();
    if flushers.is_empty() {
        let _ = done.send(());
        return Ok(finished);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("creditgate-ledger".into())
        .spawn(move || {
            runtime.block_on(futures_util::future::join_all(flushers.into_iter().map(
                |f| {
                    let mut stopped = stopped.clone();
                    f.run(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                },
            )));
            let _ = done.send(());
        })?;
    Ok(finished)
}

fn build_state(
    settings: &Settings,
    spend_log: Option<Arc<crate::leases::SharedLog>>,
) -> Result<AppState, StartupError> {
    // First, so that the handles resolved below record into it.
    let metrics = if settings.metrics {
        metrics::install()
    } else {
        None
    };
    if metrics.is_some() {
        metrics::webhook_events(crate::webhooks::EventType::ALL.map(|e| e.as_str()));
    }
    let catalog = Arc::clone(&settings.catalog);
    let meter = Meter::new(&settings.redis, Arc::clone(&catalog), &settings.metering)?;
    let pool = accounts::connect_pool(&settings.database)?;
    let reports = accounts::connect_reports(&settings.database, &pool)?;
    let accounts = Accounts::new(pool, Arc::clone(&catalog));
    let calendar = Calendar::new(settings.timezone);
    let billing = Billing::new(
        meter,
        accounts.clone(),
        calendar.clone(),
        Arc::clone(&catalog),
        crate::webhooks::Outbox::new(Arc::clone(&settings.webhooks)),
    );
    let mut billing = billing;
    let leases = if settings.metering.leases.enabled {
        let shared = match spend_log {
            Some(shared) => shared,
            None => crate::leases::SharedLog::open(&settings.metering.leases)
                .map_err(StartupError::SpendLog)?,
        };
        Some(crate::leases::Leases::start_on(
            shared,
            settings.metering.leases.clone(),
            billing.meter().clone(),
            billing.accounts().pool().clone(),
            settings.database.clone(),
        ))
    } else {
        None
    };
    if let Some(leases) = &leases {
        billing = billing.with_leases(Arc::clone(leases));
    }
    let proxy = Arc::new(Proxy::new(
        billing.clone(),
        leases.clone(),
        Upstreams::new(&catalog, &settings.upstream, settings.max_body_bytes),
        ProxySettings {
            max_body_bytes: settings.max_body_bytes,
            body_idle_timeout: settings.body_idle_timeout,
            replay_max_bytes: settings.metering.replay_max_bytes,
            trust_user_id_header: settings.auth.trust_user_id_header,
            trusted_networks: settings.trusted_networks.clone(),
            trusted_proxies: settings.trusted_proxies.clone(),
            access_log: settings.log.access,
        },
    ));
    let invoices = crate::invoices::Invoices::new(
        accounts.pool().clone(),
        Arc::clone(&catalog),
        calendar.clone(),
        settings.invoicing.clone(),
    );
    Ok(AppState {
        reports,
        billing,
        proxy,
        api_keys: ApiKeys::new(&settings.auth, settings.trusted_networks.clone()),
        metrics,
        public_metrics: settings.metrics_listen.is_none(),
        invoices,
        leases,
        in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
    })
}

/// Brings Redis up to date with admin changes it did not confirm (see
/// `accounts::sync`): every 250 ms, so the stores agree within a second
/// of Redis answering again. Also expires old admin Idempotency-Keys.
async fn reconcile(billing: Billing) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rounds: u64 = 0;
    loop {
        tick.tick().await;
        match billing.reconcile().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(accounts = n, "admin changes applied to Redis"),
            Err(e) => tracing::debug!(error = %e, "reconciler waits for Redis or Postgres"),
        }
        rounds += 1;
        if rounds.is_multiple_of(240) {
            let _ = billing.accounts().expire_idempotency().await;
        }
    }
}

/// Writes when keys were last used, once a minute (each worker its own).
async fn key_uses(accounts: Accounts) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = accounts.flush_key_uses().await {
            tracing::debug!(error = %e, "key last-use waits for Postgres");
        }
    }
}

/// The ledger's monthly partitions: this month and the next ones created
/// at start (retried each minute while Postgres is away) and every day,
/// then old months detached when `ledger.retention_months` says so.
async fn partitions(pool: sqlx::PgPool, calendar: Calendar, retention_months: u32) {
    loop {
        let today = calendar.now().local_date();
        let done = async {
            crate::ledger::partitions::ensure_ahead(&pool, today).await?;
            if retention_months > 0 {
                for name in
                    crate::ledger::partitions::detach_older_than(&pool, today, retention_months)
                        .await?
                {
                    tracing::info!(partition = %name, "ledger partition detached (retention)");
                }
            }
            Ok::<_, sqlx::Error>(())
        };
        let wait = match done.await {
            Ok(()) => std::time::Duration::from_secs(24 * 3600),
            Err(e) => {
                tracing::warn!(error = %e, "ledger partitions not checked; retrying in a minute");
                std::time::Duration::from_secs(60)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Keeps the Redis clock offset fresh for charge deadlines: at once (then
/// every second until Redis answers), and every 30 s after that.
async fn calibrate(meter: Meter) {
    loop {
        let wait = match meter.calibrate().await {
            Ok(offset) => {
                tracing::debug!(offset_ms = offset, "redis clock compared");
                std::time::Duration::from_secs(30)
            }
            Err(_) => std::time::Duration::from_secs(1),
        };
        tokio::time::sleep(wait).await;
    }
}

/// `/metrics` and the detailed `/readyz` on `server.metrics_listen`, for
/// scrapers and operators kept off the public port.
async fn serve_metrics(listener: TcpListener, state: Arc<AppState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = Arc::clone(&state);
                async move {
                    Ok::<_, std::convert::Infallible>(match req.uri().path() {
                        "/metrics" => render_metrics(&state),
                        "/readyz" => api::health::readyz(&state, api::health::Detail::Full).await,
                        _ => ApiError::NotFound.into_response(),
                    })
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn render_metrics(state: &AppState) -> Response<Body> {
    let Some(handle) = &state.metrics else {
        return ApiError::NotFound.into_response();
    };
    let mut response = Response::new(crate::body::full(handle.render()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// What every connection of a listener shares.
struct Front {
    state: Arc<AppState>,
    /// The API plane (`/api/*`); see [`api::router`].
    api: axum::Router,
}

async fn route(
    front: Arc<Front>,
    req: Request<ClientBody>,
    peer: Arc<Peer>,
    busy: Busy,
) -> Response<Body> {
    let state = &front.state;
    let Ok(permit) = Arc::clone(&state.in_flight).try_acquire_owned() else {
        return ApiError::Overloaded.into_response();
    };
    // All three ride along with the response body and are released with
    // it, or here if the client hangs up first.
    let guard = InFlightGuard {
        _permit: permit,
        _gauge: metrics::Held::in_flight(),
        _busy: busy,
    };
    let path = req.uri().path();
    if let Err(e) = crate::proxy::check_path(path) {
        return with_guard(e.into_response(), guard);
    }
    let response = match (req.method(), path) {
        (&Method::GET, "/healthz") => api::health::healthz(),
        (&Method::GET, "/readyz") => {
            let detail = if state.public_metrics {
                api::health::Detail::Checks
            } else {
                api::health::Detail::Status
            };
            Box::pin(api::health::readyz(state, detail)).await
        }
        (&Method::GET, "/metrics") if state.public_metrics => render_metrics(state),
        (_, "/healthz" | "/readyz" | "/metrics") if state.public_metrics => {
            ApiError::MethodNotAllowed.into_response()
        }
        (_, "/healthz" | "/readyz") => ApiError::MethodNotAllowed.into_response(),
        _ => match state.billing.catalog().route(path) {
            Some(module) => state.proxy.handle(Arc::clone(module), req, peer).await,
            None => match crate::web::serve(req.method(), path) {
                Some(response) => response,
                // Boxed: the API handlers' futures are large, and hyper
                // keeps room for the service future of every connection,
                // idle or not; the proxy path stays small on its own.
                None => {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut()
                        .insert(api::auth::ClientAddr(peer.addr));
                    Box::pin(api::serve(&front.api, req)).await
                }
            },
        },
    };
    with_guard(response, guard)
}

/// One request's share of `server.max_in_flight` and of the in-flight gauge.
struct InFlightGuard {
    _permit: OwnedSemaphorePermit,
    _gauge: metrics::Held,
    /// Keeps the connection from being parked until the body is done.
    _busy: Busy,
}

fn with_guard(response: Response<Body>, guard: InFlightGuard) -> Response<Body> {
    response.map(|body| {
        Guarded {
            inner: body,
            _guard: guard,
        }
        .boxed_unsync()
    })
}

/// A body that holds its request's in-flight guard until it is done.
struct Guarded {
    inner: Body,
    _guard: InFlightGuard,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
