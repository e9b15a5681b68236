//! The `creditgate` command: parses arguments, loads settings, wires the
//! parts together. No logic of its own.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use creditgate::accounts::{self, Accounts, Created, NewUser};
use creditgate::billing::Billing;
use creditgate::config::{Runtime, Settings};
use creditgate::domain::UserId;
use creditgate::ledger::{Flusher, partitions, verify};
use creditgate::metering::connection::Timeouts;
use creditgate::metering::{Calendar, KeyLayout, Meter, RedisConn, Target};
use creditgate::startup::Application;
use sqlx::migrate::MigrateDatabase;
use std::time::Duration;

/// glibc malloc showed up as ~17 % of the gateway's CPU under load
/// (docs/BENCHMARKS.md); mimalloc's thread-local free lists suit the many
/// short-lived per-request allocations better.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for this process. mimalloc asks for them
/// (`madvise`) on its 2 MiB-aligned arena chunks, and where THP is
/// `always` the kernel backs them so anyway: every chunk the allocator has
/// touched then stays resident whole, and what parked connections give
/// back (`connection`) does not leave the process. `bench/idle.sh`: 51 MB
/// at rest instead of 29 (docs/BENCHMARKS.md). The same as
/// `MIMALLOC_ALLOW_THP=0`, which would have to be set before the process
/// starts.
fn keep_huge_pages_off() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes integers only and touches no
    // memory of ours; on failure the process merely keeps huge pages.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// mimalloc gives freed memory back to the system after a delay, but only
/// when a thread next calls into it, and a thread keeps pages it has
/// emptied for reuse: after a burst, once every connection is parked and
/// the process is quiet, that memory stays. `bench/idle.sh` read 64–131 MB
/// for the same 10,000 parked connections; 64–84 MB with a plain
/// collection every second; 63–66 MB with this forced one, which costs
/// nothing measurable under load (`bench/compare.sh`, docs/BENCHMARKS.md).
fn return_freed_memory() {
    let _ = std::thread::Builder::new()
        .name("creditgate-mem".into())
        .spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                // SAFETY: takes no pointers and touches no memory in use;
                // it returns free pages to the system.
                unsafe { libmimalloc_sys::mi_collect(true) };
            }
        });
}

#[derive(Parser)]
#[command(name = "creditgate", version, about = "Billing and credits gateway")]
struct Cli {
    /// Configuration file; CREDITGATE_A__B variables override its keys.
    #[arg(
        long,
        env = "CREDITGATE_CONFIG",
        default_value = "config/creditgate.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve,
    /// Create the database if needed and apply migrations.
    Migrate,
    /// Validate the configuration and exit (non-zero on error).
    CheckConfig,
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage API keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Start the new billing period for every account (for cron; idempotent
    /// within a period).
    ResetMonthly,
    /// Run only the ledger flusher (Redis streams → Postgres) until SIGTERM.
    Flush,
    /// The ledger: `ledger verify` drains the streams and compares.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Serve the demo upstream that the demo configuration points at.
    DemoUpstream {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user and print its id and first API key (shown once).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        plan: String,
        #[arg(long)]
        email: Option<String>,
        /// Use this id (e.g. the platform Hub's) instead of a generated one.
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Drain the usage streams, then compare every account's Redis balance
    /// with the ledger and print each drift. Exit 0 when none, 1 otherwise.
    Verify {
        /// Give up draining after this many seconds.
        #[arg(long, default_value_t = 60)]
        drain_timeout: u64,
    },
    /// Create this month's and the next months' ledger partitions, detach
    /// those older than `ledger.retention_months`, and list them (the
    /// gateway does the same at start and daily).
    Partitions,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create another API key for a user (shown once).
    Create {
        #[arg(long)]
        user: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keep_huge_pages_off();
    let cli = Cli::parse();
    if let Command::DemoUpstream { listen } = &cli.command {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        eprintln!("demo upstream listening on {listen}");
        return Ok(creditgate::demo::serve(listener).await?);
    }
    let settings = Settings::load(&cli.config)
        .with_context(|| format!("invalid configuration {}", cli.config.display()))?;
    let log_writer = creditgate::telemetry::init_tracing(&settings.log);
    match cli.command {
        Command::CheckConfig => {
            settings.refuse_example_secrets()?;
            println!(
                "{}: ok ({} modules, {} plans)",
                cli.config.display(),
                settings.catalog.modules().len(),
                settings.catalog.plans().len()
            );
        }
        Command::Migrate => migrate(&settings).await?,
        Command::Serve => {
            settings.refuse_example_secrets()?;
            // Only a long-running server holds memory worth giving back.
            return_freed_memory();
            match settings.runtime {
                Runtime::MultiThread => {
                    let app = Application::build(settings).await?;
                    app.run_until_stopped(shutdown_signal()).await?;
                }
                Runtime::ThreadPerCore => {
                    let workers = settings.workers.map_or_else(
                        || std::thread::available_parallelism().map_or(1, |n| n.get()),
                        |n| n.get(),
                    );
                    serve_per_core(&cli.config, workers, &settings.metering.leases).await?
                }
            }
        }
        Command::User {
            command:
                UserCommand::Create {
                    name,
                    plan,
                    email,
                    id,
                },
        } => {
            let id = id.map(|s| UserId::parse(&s)).transpose()?;
            let accounts = open_accounts(&settings)?;
            let created = accounts
                .create_user(NewUser {
                    id,
                    name: &name,
                    email: email.as_deref(),
                    plan: &plan,
                    actor: "cli",
                    idempotency: None,
                })
                .await?;
            let Created::New(user, key) = created else {
                anyhow::bail!("no user created");
            };
            println!("user_id: {}", user.id);
            println!("api_key: {}", key.key.reveal());
            println!("key_id:  {}", key.id);
        }
        Command::Key {
            command: KeyCommand::Create { user },
        } => {
            let user = UserId::parse(&user)?;
            let key = open_accounts(&settings)?.create_key(&user, "cli").await?;
            println!("api_key: {}", key.key.reveal());
            println!("key_id:  {}", key.id);
        }
        Command::ResetMonthly => {
            let catalog = settings.catalog.clone();
            let billing = Billing::new(
                Meter::new(&settings.redis, catalog.clone(), &settings.metering)?,
                open_accounts(&settings)?,
                Calendar::new(settings.timezone),
                catalog,
                creditgate::webhooks::Outbox::new(std::sync::Arc::clone(&settings.webhooks)),
            );
            let report = billing.reset_monthly("cli").await?;
            println!(
                "period {}: reset {} of {} accounts ({} already current)",
                report.period, report.reset, report.accounts, report.already_current
            );
            let invoices = creditgate::invoices::Invoices::new(
                billing.accounts().pool().clone(),
                settings.catalog.clone(),
                billing.calendar().clone(),
                settings.invoicing.clone(),
            );
            let closed = invoices.previous_period();
            match invoices.close_period(&closed).await {
                Ok(n) => println!("period {closed}: {n} invoices issued"),
                Err(creditgate::invoices::InvoiceError::NotConfigured) => {}
                Err(e) => eprintln!("period {closed}: invoices not issued: {e}"),
            }
        }
        Command::Flush => {
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let workers: Vec<_> = open_flusher(&settings)?
                .into_workers(settings.ledger.workers)?
                .into_iter()
                .map(|f| {
                    let mut stopped = stopped.clone();
                    tokio::spawn(f.run(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    }))
                })
                .collect();
            shutdown_signal().await;
            let _ = stop.send(true);
            for w in workers {
                let _ = w.await;
            }
        }
        Command::Ledger {
            command: LedgerCommand::Verify { drain_timeout },
        } => {
            let clean = ledger_verify(&settings, Duration::from_secs(drain_timeout)).await?;
            if !clean {
                drop(log_writer); // flush the log lines before exiting
                std::process::exit(1);
            }
        }
        Command::Ledger {
            command: LedgerCommand::Partitions,
        } => ledger_partitions(&settings).await?,
        Command::DemoUpstream { .. } => {}
    }
    Ok(())
}

fn open_flusher(settings: &Settings) -> anyhow::Result<Flusher> {
    let pool = accounts::connect_pool(&settings.database)?;
    let keys = KeyLayout::new(&settings.redis.key_prefix, settings.redis.shards);
    Ok(Flusher::new(
        &settings.redis.url,
        &keys,
        pool,
        creditgate::ledger::FlusherConfig::from_settings(&settings.ledger),
    )?
    .with_hook(creditgate::webhooks::Outbox::new(std::sync::Arc::clone(
        &settings.webhooks,
    ))))
}

/// Returns whether the ledger and Redis agree.
async fn ledger_verify(settings: &Settings, drain_timeout: Duration) -> anyhow::Result<bool> {
    let mut flusher = open_flusher(settings)?;
    let drained = tokio::time::timeout(drain_timeout, flusher.drain())
        .await
        .context("draining the usage streams timed out")??;
    eprintln!("drained {drained} events");
    let pool = accounts::connect_pool(&settings.database)?;
    let keys = KeyLayout::new(&settings.redis.key_prefix, settings.redis.shards);
    let mut con = RedisConn::connect(
        &Target::parse(&settings.redis.url)?,
        Timeouts {
            connect: Duration::from_secs(2),
            response: Duration::from_secs(10),
        },
    )
    .await?;
    let report = verify::verify(&mut con, &keys, &pool, &settings.catalog).await?;
    for drift in &report.drifts {
        println!("DRIFT user={} {}", drift.user, drift.what);
    }
    println!(
        "ledger verify: {} accounts, {} events, {} drifts",
        report.accounts,
        report.events,
        report.drifts.len()
    );
    Ok(report.drifts.is_empty())
}

async fn ledger_partitions(settings: &Settings) -> anyhow::Result<()> {
    let pool = accounts::connect_pool(&settings.database)?;
    let calendar = Calendar::new(settings.timezone);
    let today = calendar.now().local_date();
    partitions::ensure_ahead(&pool, today).await?;
    if settings.ledger.retention_months > 0 {
        for name in
            partitions::detach_older_than(&pool, today, settings.ledger.retention_months).await?
        {
            println!("detached {name}");
        }
    }
    for (name, first) in partitions::list(&pool).await? {
        println!("{name}\t{first}");
    }
    Ok(())
}

fn open_accounts(settings: &Settings) -> anyhow::Result<Accounts> {
    let pool = accounts::connect_pool(&settings.database)?;
    Ok(Accounts::new(pool, settings.catalog.clone()))
}

async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let url = &settings.database.url;
    if !sqlx::Postgres::database_exists(url).await? {
        sqlx::Postgres::create_database(url).await?;
        eprintln!("created database");
    }
    let pool = accounts::connect_pool(&settings.database)?;
    accounts::MIGRATOR.run(&pool).await?;
    eprintln!("migrations applied");
    Ok(())
}

/// SIGTERM (docker, systemd) or Ctrl-C.
/// `server.runtime = "thread_per_core"`: `workers` single-threaded
/// runtimes (one per core unless `server.workers` says), each serving its
/// own listener on the shared port; a signal stops them all, each draining
/// its own requests.
async fn serve_per_core(
    config: &std::path::Path,
    workers: usize,
    leases: &creditgate::config::LeaseSettings,
) -> anyhow::Result<()> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut threads = Vec::with_capacity(workers);
    // One spend log for the process, shared by the workers' credit leases:
    // one writer puts their calls into the ledger in order.
    let spend_log = if leases.enabled {
        Some(
            creditgate::leases::SharedLog::open(leases)
                .map_err(creditgate::startup::StartupError::SpendLog)?,
        )
    } else {
        None
    };
    for index in 0..workers {
        let settings = Settings::load(config)?.for_worker(index, workers);
        let spend_log = spend_log.clone();
        let mut stopped = stopped.clone();
        let thread = std::thread::Builder::new()
            .name(format!("creditgate-{index}"))
            .spawn(move || -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let app = Application::build_worker(settings, index == 0, spend_log).await?;
                    app.run_until_stopped(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await?;
                    anyhow::Ok(())
                })
            })?;
        threads.push(thread);
    }
    tracing::info!(workers, "serving with one runtime per core");
    shutdown_signal().await;
    let _ = stop.send(true);
    let mut result = Ok(());
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(anyhow::anyhow!("a worker thread panicked")),
        }
    }
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
