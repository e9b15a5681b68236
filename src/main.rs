//! The `creditgate` command: parses arguments, loads settings, wires the
//! parts together. No logic of its own.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use creditgate::accounts::{self, Accounts};
use creditgate::config::Settings;
use creditgate::domain::UserId;
use creditgate::startup::Application;
use sqlx::migrate::MigrateDatabase;

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
enum KeyCommand {
    /// Create another API key for a user (shown once).
    Create {
        #[arg(long)]
        user: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    creditgate::telemetry::init_tracing(&settings.log);
    match cli.command {
        Command::CheckConfig => {
            println!(
                "{}: ok ({} modules, {} plans)",
                cli.config.display(),
                settings.catalog.modules().len(),
                settings.catalog.plans().len()
            );
        }
        Command::Migrate => migrate(&settings).await?,
        Command::Serve => {
            let app = Application::build(settings).await?;
            app.run_until_stopped(shutdown_signal()).await?;
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
            let (user, key) = accounts
                .create_user(id, &name, email.as_deref(), &plan)
                .await?;
            println!("user_id: {}", user.id);
            println!("api_key: {}", key.key.reveal());
            println!("key_id:  {}", key.id);
        }
        Command::Key {
            command: KeyCommand::Create { user },
        } => {
            let user = UserId::parse(&user)?;
            let key = open_accounts(&settings)?.create_key(&user).await?;
            println!("api_key: {}", key.key.reveal());
            println!("key_id:  {}", key.id);
        }
        Command::DemoUpstream { .. } => {}
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
