//! The `tailor` binary: parse the command line, load settings, run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use tailor::app::{serve_http, Background, Engine};
use tailor::config::Settings;
use tailor::rules as tailor_rules;

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
    /// Compile every rule in DIR; exits non-zero with file:line:col for each error.
    Check {
        dir: PathBuf,
        /// Plugins the rules import (default: the `plugins` directory beside DIR).
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
    /// Run the test cases next to the rules (NAME.test.toml beside NAME.rhai).
    Test {
        dir: PathBuf,
        /// Plugins the rules import (default: the `plugins` directory beside DIR).
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
}

/// The rule engine with the plugins of `plugins`, or of the `plugins` directory beside
/// the rules directory when it exists.
fn rules_engine(dir: &Path, plugins: Option<PathBuf>) -> anyhow::Result<tailor_rules::Engine> {
    let plugins_dir = plugins.or_else(|| {
        let beside = dir.join("..").join("plugins");
        beside.is_dir().then_some(beside)
    });
    let natives = tailor_rules::Natives::builtin();
    let Some(plugins_dir) = plugins_dir else {
        return Ok(tailor_rules::engine_with(&natives, None));
    };
    let bare = tailor_rules::engine_with(&natives, None);
    let (plugins, errors) = tailor_rules::Plugins::load_dir(&bare, &plugins_dir);
    for (path, e) in &errors {
        eprintln!("{}:{e}", path.display());
    }
    if !errors.is_empty() {
        anyhow::bail!("{} plugins do not compile", errors.len());
    }
    Ok(tailor_rules::engine_with(&natives, Some(&plugins)))
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
            command: RulesCommand::Test { dir, plugins },
        } => {
            let engine = std::sync::Arc::new(rules_engine(&dir, plugins)?);
            let reports = tailor_rules::testing::run_dir(&engine, &dir)
                .with_context(|| format!("Failed to read rule tests from {}", dir.display()))?;
            let (mut passed, mut failed) = (0, 0);
            for report in &reports {
                passed += report.passed;
                failed += report.failed.len();
                println!(
                    "{}: {} passed, {} failed",
                    report.path.display(),
                    report.passed,
                    report.failed.len()
                );
                for (case, why) in &report.failed {
                    eprintln!("  FAIL {case}: {why}");
                }
            }
            if reports.is_empty() {
                anyhow::bail!("no *.test.toml files in {}", dir.display());
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} rule test cases failed", passed + failed);
            }
            println!("{passed} rule test cases passed");
            Ok(())
        }
        Command::Rules {
            command: RulesCommand::Check { dir, plugins },
        } => {
            let engine = rules_engine(&dir, plugins)?;
            let checked = tailor_rules::check_dir(&engine, &dir)
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
