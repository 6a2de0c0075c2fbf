//! The `tailor` binary: parse the command line, load settings, run.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use tailor::app::{serve_http, Background, Engine};
use tailor::config::Settings;

#[derive(Parser)]
#[command(
    name = "tailor",
    version,
    about = "Real-time marketing personalization engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the GraphQL and REST API.
    Serve {
        /// Configuration file (default: ./tailor.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on, e.g. 127.0.0.1:8080.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Directory of the embedded store.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Build the synthetic demo world on first start.
        #[arg(long)]
        demo: bool,
    },
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Business rules.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Compile every rule in DIR; exits non-zero with file:line:col on the first errors.
    Check { dir: PathBuf },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Schema => {
            print!("{}", tailor::api::graphql::sdl());
            Ok(())
        }
        Command::Rules {
            command: RulesCommand::Check { dir },
        } => {
            let checked = tailor::rules::check_dir(&dir)
                .with_context(|| format!("Failed to read rules from {}", dir.display()))?;
            let mut failed = 0;
            for c in &checked {
                match &c.result {
                    Ok(rule) => println!(
                        "{}: ok: '{}' priority {} hooks {}",
                        c.path.display(),
                        rule.meta.name,
                        rule.meta.priority,
                        rule.hooks.join(", ")
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{}:{e}", c.path.display());
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} rules do not compile", checked.len());
            }
            println!("{} rules compile", checked.len());
            Ok(())
        }
        Command::Serve {
            config,
            listen,
            data_dir,
            demo,
        } => {
            tailor::telemetry::init_tracing();
            let mut settings = Settings::load(config.as_deref())?;
            if let Some(listen) = listen {
                settings.listen = listen;
            }
            if let Some(dir) = data_dir {
                settings.data_dir = dir;
            }
            let listen = settings.listen;
            let engine = Engine::open(settings)
                .await
                .context("Failed to open the engine")?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("Failed to listen on {listen}"))?;
            let background = Background::start(&engine);
            if demo {
                tailor::demo::ensure(&engine)
                    .await
                    .context("Failed to build the demo world")?;
            }
            let served = serve_http(engine, listener, shutdown_signal()).await;
            background.stop().await;
            served
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("Shutting down");
}
