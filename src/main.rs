//! The `tailor` binary: parse the command line, load settings, run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use tailor::app::{serve_role, Background, Engine, Role};
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
        /// What this process does. `api`: serve the GraphQL and REST API; with
        /// `backends.events = "kafka://…"` ingested events go to the broker (through a
        /// durable local outbox) and are applied by workers, not here; with the embedded
        /// event log, `api` also applies them, as `all` does. `worker`: apply events (with
        /// Kafka: consume them in the workers' consumer group) and keep segments and
        /// features up to date; serves only /metrics, /healthz and /readyz on the listen
        /// address. `all`: both.
        #[arg(long, value_enum, default_value_t = RoleArg::All)]
        role: RoleArg,
    },
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Business rules.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// The recommendation model: train, list, activate, roll back. Works on a data
    /// directory that no server has open (a running server: use the GraphQL mutations).
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// API keys: create, list, revoke. Works on a data directory that no server has open
    /// (a running server: the GraphQL mutations createApiKey, revokeApiKey).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Off-policy evaluation: estimate what a policy would have earned on the decision
    /// log (or on bandit data logged elsewhere, as JSONL) and print it as JSON.
    Ope {
        /// `uniform` or a policy (thompson_sampling, epsilon_greedy, model_greedy,
        /// softmax, lin_ucb, linear_thompson).
        #[arg(long)]
        policy: String,
        /// The model version the policy uses and the doubly robust regressor (default:
        /// the active version, if any).
        #[arg(long)]
        model_version: Option<String>,
        /// Only decisions of this placement.
        #[arg(long)]
        placement: Option<String>,
        /// The newest decisions to evaluate on.
        #[arg(long, default_value_t = tailor::ope::service::DEFAULT_ROUNDS)]
        rounds: usize,
        /// Cut importance weights above this (≥ 1).
        #[arg(long)]
        clip: Option<f64>,
        /// Seed of the Monte Carlo draws of a Thompson sampling distribution.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Bandit data logged by another system, one JSON object per line: `context`
        /// (numbers), `actions`, `action`, `propensity`, `reward`.
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
        #[command(flatten)]
        store: Store,
    },
    /// Play a policy against the demo world's hidden preferences, learning online as
    /// the engine does, and print its rewards and regret against an oracle as JSON.
    Simulate {
        /// One of the engine's policies, `uniform` or `oracle`.
        #[arg(long, value_parser = parse_policy)]
        policy: tailor::simulate::Policy,
        /// Decisions to simulate.
        #[arg(long, default_value_t = 10_000, value_parser = parse_rounds)]
        rounds: usize,
        /// Seed of the stream (customers, placements, clicks) and of the policy.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Use the active model of this data directory's registry (every engine policy
        /// then reads it) instead of training one in process for model_greedy and
        /// softmax.
        #[arg(long, value_name = "DIR")]
        model_dir: Option<PathBuf>,
        /// Give the bandit policies a model too, as the engine does when one is active:
        /// the prior of Thompson sampling and epsilon-greedy, a feature of the linear
        /// policies.
        #[arg(long)]
        with_model: bool,
        /// Write every round (features, candidates, true click probabilities) as JSONL.
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
    },
    /// Drive a running server over GraphQL/HTTP and print latency and throughput as JSON:
    /// open loop at `--rate` (latency from each request's intended send time), or closed
    /// loop with `--rate 0` (the maximum throughput at `--concurrency`).
    Bench {
        /// The server, e.g. http://127.0.0.1:8080.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, value_enum, default_value_t = tailor::loadgen::Workload::Personalize)]
        workload: tailor::loadgen::Workload,
        /// Requests per second offered; 0 for the closed loop.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// How long to send, e.g. 10s, 500ms, 2m.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// Most requests in flight (open loop) or workers (closed loop).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// How customers are drawn from `cust-00000` onwards.
        #[arg(long, value_enum, default_value_t = tailor::loadgen::Dist::Zipf)]
        dist: tailor::loadgen::Dist,
        /// How many customers to draw from (the demo world has 10,000).
        #[arg(long, default_value_t = tailor::demo::CUSTOMERS)]
        customers: usize,
        #[arg(long, default_value = "homepage_hero")]
        placement: String,
        /// Events per `trackEvents` request (workload events).
        #[arg(long, default_value_t = 100)]
        events_per_request: usize,
        /// API key, sent as `Authorization: Bearer KEY`.
        #[arg(long, env = "TAILOR_API_KEY", hide_env_values = true)]
        key: Option<String>,
        /// Seed of the customer draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// A request not answered within this is an error.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },
}

/// `10s`, `500ms`, `2m`: a positive duration.
fn parse_duration(raw: &str) -> Result<std::time::Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("'{raw}' needs a unit: ms, s or m"))?;
    let (number, unit) = raw.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("'{raw}' is not a duration such as 10s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("'{raw}': the unit must be ms, s or m")),
    };
    if !(seconds > 0.0 && seconds < 86_400.0) {
        return Err(format!("'{raw}': must be more than 0 and less than a day"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Api,
    Worker,
    All,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Role {
        match role {
            RoleArg::Api => Role::Api,
            RoleArg::Worker => Role::Worker,
            RoleArg::All => Role::All,
        }
    }
}

fn parse_policy(raw: &str) -> Result<tailor::simulate::Policy, String> {
    tailor::simulate::Policy::parse(raw).ok_or_else(|| {
        format!(
            "unknown policy; one of: {}",
            tailor::simulate::Policy::names()
        )
    })
}

fn parse_rounds(raw: &str) -> Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs `tailor simulate` (off the async executor: training and the loop are CPU work).
fn simulate_command(
    policy: tailor::simulate::Policy,
    rounds: usize,
    seed: u64,
    model_dir: Option<PathBuf>,
    with_model: bool,
    export: Option<PathBuf>,
) -> anyhow::Result<()> {
    use std::io::Write;
    use tailor::simulate::{self, Params};
    let model = match model_dir {
        Some(dir) if policy.uses_model() => {
            Some(simulate::load_active_model(&dir).map_err(|e| match e {
                tailor::error::Error::Invalid { message, .. } => {
                    anyhow::anyhow!("--model-dir: {message}")
                }
                e => anyhow::anyhow!("--model-dir: {e}"),
            })?)
        }
        None if policy.needs_model() || (with_model && policy.uses_model()) => Some(
            simulate::train_demo_model(
                seed,
                tailor::demo::CUSTOMERS,
                &tailor::model::train::TrainParams::default(),
            )
            .map_err(|e| anyhow::anyhow!("Failed to train the model: {e}"))?,
        ),
        _ => None,
    };
    let mut file = match &export {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("--export: cannot create {}", path.display()))?,
        )),
        None => None,
    };
    let report = simulate::simulate(
        &Params::new(policy, rounds, seed),
        model.as_ref(),
        file.as_mut().map(|f| f as &mut dyn Write),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let (Some(mut f), Some(path)) = (file, export) {
        f.flush()
            .with_context(|| format!("--export: cannot write {}", path.display()))?;
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Where a model command finds the engine's data.
#[derive(clap::Args)]
struct Store {
    /// Configuration file (default: ./tailor.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Directory of the embedded store.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Train a new version from the decision log (or a JSONL file of logged decisions)
    /// and print its validation report.
    Train {
        #[command(flatten)]
        store: Store,
        /// Logged decisions from another system, one JSON object per line.
        #[arg(long, value_name = "FILE")]
        from_jsonl: Option<PathBuf>,
        /// Seed of the initial weights and the minibatch order.
        #[arg(long)]
        seed: Option<u64>,
        /// Most passes over the training data.
        #[arg(long)]
        epochs: Option<usize>,
        /// Activate the new version once trained.
        #[arg(long)]
        activate: bool,
    },
    /// List the versions with their validation metrics.
    List {
        #[command(flatten)]
        store: Store,
    },
    /// Make VERSION the active model (or run it in shadow beside the active one).
    Activate {
        version: String,
        #[command(flatten)]
        store: Store,
        /// Score beside the active version without serving.
        #[arg(long)]
        shadow: bool,
    },
    /// Return to the version the active one replaced.
    Rollback {
        #[command(flatten)]
        store: Store,
    },
}

/// The engine on the data directory, or a clear error when a server holds it.
async fn open_store(store: Store) -> anyhow::Result<std::sync::Arc<Engine>> {
    let mut settings = Settings::load(store.config.as_deref())?;
    if let Some(dir) = store.data_dir {
        settings.data_dir = dir;
    }
    let dir = settings.data_dir.clone();
    Engine::open(settings).await.map_err(|e| {
        if format!("{e:#}").contains("already open") {
            anyhow::anyhow!(
                "the data directory {} is in use by a running server; use the GraphQL \
                 mutations (trainModel, activateModel) on that server instead",
                dir.display()
            )
        } else {
            e.context(format!(
                "Failed to open the data directory {}",
                dir.display()
            ))
        }
    })
}

fn print_version(info: &tailor::model::VersionInfo) {
    let m = &info.manifest;
    let r = &m.report;
    let flag = match (info.active, info.shadow) {
        (true, _) => "active",
        (_, true) => "shadow",
        _ => "",
    };
    println!(
        "{:<6} {:<7} {}  auc {:.4}  log_loss {:.4} (baseline {:.4})  ece {:.4}  examples {} ({} validation)  data {} .. {}",
        m.version,
        flag,
        m.created_at.format("%Y-%m-%d %H:%M:%S"),
        r.metrics.auc,
        r.metrics.log_loss,
        r.metrics.baseline_log_loss,
        r.metrics.ece,
        r.data.examples,
        r.data.validation_examples,
        r.data.from.format("%Y-%m-%d %H:%M"),
        r.data.to.format("%Y-%m-%d %H:%M"),
    );
}

async fn model_command(command: ModelCommand) -> anyhow::Result<()> {
    use tailor::model::train::TrainParams;
    use tailor::model::TrainingSource;
    match command {
        ModelCommand::Train {
            store,
            from_jsonl,
            seed,
            epochs,
            activate,
        } => {
            let engine = open_store(store).await?;
            let mut params = TrainParams::default();
            if let Some(seed) = seed {
                params.seed = seed;
            }
            if let Some(epochs) = epochs {
                params.epochs = epochs;
            }
            let source = match from_jsonl {
                Some(path) => TrainingSource::Jsonl(path),
                None => TrainingSource::DecisionLog,
            };
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} training [{bar:40}] {pos}/{len} steps, {msg} ({elapsed})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let shown = bar.clone();
            let manifest = engine
                .train_model(&source, params, move |p| {
                    shown.set_length(p.total_steps as u64);
                    shown.set_position(p.step as u64);
                    let validation = p
                        .validation_loss
                        .map(|v| format!(", validation loss {v:.4}"))
                        .unwrap_or_default();
                    shown.set_message(format!(
                        "epoch {}/{}, loss {:.4}{validation}",
                        p.epoch, p.epochs, p.train_loss
                    ));
                })
                .await
                .map_err(|e| anyhow::anyhow!("training failed: {e}"))?;
            bar.finish_and_clear();
            let r = &manifest.report;
            println!(
                "trained {} in {:.1}s: {} epochs (best {}), {} decisions, {} examples ({} positive)",
                manifest.version,
                manifest.training_seconds,
                r.epochs_run,
                r.best_epoch,
                r.data.decisions,
                r.data.examples,
                r.data.positives
            );
            println!(
                "validation ({} examples from {}): AUC {:.4}, log loss {:.4} (baseline {:.4}), ECE {:.4}",
                r.data.validation_examples,
                r.data.validation_from.to_rfc3339(),
                r.metrics.auc,
                r.metrics.log_loss,
                r.metrics.baseline_log_loss,
                r.metrics.ece
            );
            println!("reliability (predicted → observed, count):");
            for b in &r.metrics.reliability {
                println!(
                    "  [{:.1}, {:.1})  {:.4} → {:.4}  {}",
                    b.lower, b.upper, b.mean_predicted, b.observed_rate, b.count
                );
            }
            if activate {
                let info = engine
                    .activate_model(&manifest.version, false)
                    .await
                    .map_err(|e| anyhow::anyhow!("activation failed: {e}"))?;
                println!("activated {}", info.manifest.version);
            }
            Ok(())
        }
        ModelCommand::List { store } => {
            let engine = open_store(store).await?;
            let versions = engine.models.versions()?;
            if versions.is_empty() {
                println!("no model versions yet: `tailor model train` makes one");
            }
            for v in &versions {
                print_version(v);
            }
            Ok(())
        }
        ModelCommand::Activate {
            version,
            store,
            shadow,
        } => {
            let engine = open_store(store).await?;
            let info = engine
                .activate_model(&version, shadow)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            print_version(&info);
            Ok(())
        }
        ModelCommand::Rollback { store } => {
            let engine = open_store(store).await?;
            let info = engine
                .models
                .rollback("requested from the command line")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            print_version(&info);
            Ok(())
        }
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it on standard output; it is shown only this once.
    Create {
        /// frontend, marketer, admin or internal.
        #[arg(long, value_parser = parse_role)]
        role: tailor::auth::Role,
        /// A name to recognise the key by (1–64 characters).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: Store,
    },
    /// List the keys: id, role, created, revoked, name (never the secret).
    List {
        #[command(flatten)]
        store: Store,
    },
    /// Revoke key ID; it never works again.
    Revoke {
        id: String,
        #[command(flatten)]
        store: Store,
    },
    /// Re-wrap every data key under the current master key (`encryption.key_id`), after
    /// the old key moved to `encryption.previous_keys` (or, with generated keys, after
    /// `encryption.key_id` changed). Data is not re-encrypted; afterwards the old master
    /// keys are no longer needed. Run it with the server stopped.
    RotateMaster {
        #[command(flatten)]
        store: Store,
    },
}

fn parse_role(raw: &str) -> Result<tailor::auth::Role, String> {
    tailor::auth::Role::parse("role", raw).map_err(|e| match e {
        tailor::error::Error::Invalid { message, .. } => message,
        e => e.to_string(),
    })
}

/// The key service on the data directory's store alone, or a clear error when a server
/// holds it.
/// The key store: the shared one when `backends.definitions` names one (no data
/// directory needed, so it works beside running servers), else the data directory's.
async fn open_keys(store: Store) -> anyhow::Result<tailor::auth::KeyService> {
    let settings = Settings::load(store.config.as_deref())?;
    if let Some(keys) = tailor::storage::shared_key_store(
        &settings.backends,
        settings.timeouts.backend(),
        &settings.breaker,
    )
    .await?
    {
        return Ok(tailor::auth::KeyService::new(keys));
    }
    let (_, embedded) = open_embedded(store)?;
    Ok(tailor::auth::KeyService::new(embedded.stores().keys))
}

/// The settings and the data directory's store alone, or a clear error when a server
/// holds it.
fn open_embedded(
    store: Store,
) -> anyhow::Result<(
    Settings,
    std::sync::Arc<tailor::storage::embedded::EmbeddedStore>,
)> {
    let mut settings = Settings::load(store.config.as_deref())?;
    if let Some(dir) = store.data_dir {
        settings.data_dir = dir;
    }
    let dir = settings.data_dir.clone();
    let embedded = tailor::storage::embedded::EmbeddedStore::open(&dir).map_err(|e| {
        if format!("{e:#}").contains("already open") {
            anyhow::anyhow!(
                "the data directory {} is in use by a running server; use the GraphQL \
                 mutations (createApiKey, revokeApiKey, rotateMasterKey) on that server \
                 instead",
                dir.display()
            )
        } else {
            e.context(format!(
                "Failed to open the data directory {}",
                dir.display()
            ))
        }
    })?;
    Ok((settings, embedded))
}

/// `tailor keys rotate-master`: every data key under the current master key.
async fn rotate_master(store: Store) -> anyhow::Result<()> {
    // Warnings (such as a master key generated for a new key id) go to standard error;
    // standard output is the report.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .with_target(false)
        .try_init();
    let (settings, embedded) = open_embedded(store)?;
    let ring = tailor::privacy::KeyRing::load(&settings.encryption, &settings.data_dir)?;
    let mut stores = embedded.stores();
    stores.data_keys = tailor::storage::embedded::open_keyring(&settings.data_dir)?;
    // Shared data keys (`backends.profiles` on Redis) are re-wrapped where they are.
    let stores = tailor::storage::with_backends(
        stores,
        &settings.backends,
        settings.timeouts.backend(),
        &settings.breaker,
    )
    .await?;
    let profiles =
        tailor::privacy::Profiles::open(&stores, ring, &settings.encryption.sensitive_traits)
            .await
            .map_err(|e| anyhow::anyhow!("Failed to open the profiles: {e}"))?;
    let report = profiles
        .rewrap_all()
        .await
        .map_err(|e| anyhow::anyhow!("Failed to re-wrap the data keys: {e}"))?;
    let current = profiles.ring().current().id();
    println!(
        "re-wrapped {} data keys under master key '{current}' ({} were already under it)",
        report.rewrapped, report.current
    );
    let old: Vec<&str> = profiles
        .ring()
        .ids()
        .into_iter()
        .filter(|id| *id != current)
        .collect();
    if !old.is_empty() {
        println!(
            "no data key needs master keys {} any more",
            old.iter()
                .map(|id| format!("'{id}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

async fn keys_command(command: KeysCommand) -> anyhow::Result<()> {
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    match command {
        KeysCommand::Create { role, name, store } => {
            let issued = open_keys(store)
                .await?
                .create(role, name, "--name")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", issued.key.expose());
            eprintln!(
                "created API key {} (role {role}); it is shown only this once: send it as \
                 `Authorization: Bearer KEY`",
                issued.record.id
            );
        }
        KeysCommand::List { store } => {
            let keys = open_keys(store)
                .await?
                .list()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "{:<16}  {:<8}  {:<20}  {:<20}  name",
                "id", "role", "created", "revoked"
            );
            for k in keys {
                println!(
                    "{:<16}  {:<8}  {:<20}  {:<20}  {}",
                    k.id,
                    k.role,
                    time(k.created_at),
                    k.revoked_at.map(time).unwrap_or_else(|| "-".into()),
                    k.name.unwrap_or_default()
                );
            }
        }
        KeysCommand::RotateMaster { store } => rotate_master(store).await?,
        KeysCommand::Revoke { id, store } => {
            let record = open_keys(store)
                .await?
                .revoke("ID", &id)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let at = record.revoked_at.map(time).unwrap_or_default();
            println!(
                "revoked API key {} (role {}) at {at}",
                record.id, record.role
            );
        }
    }
    Ok(())
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

fn main() -> anyhow::Result<()> {
    // Candle runs a CPU matrix product on as many threads as RAYON_NUM_THREADS says, and
    // without it looks up the physical core count on every product (reading /proc). A
    // decision's forward pass (tens of rows) is too small to share between threads: on
    // one it is several times faster, and neither lookup is paid. Set before any thread
    // starts, so no other thread reads the environment meanwhile; an explicit value wins
    // (offline training of a large history may want more).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("Failed to start the async runtime")?
        .block_on(run(Cli::parse()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model { command } => model_command(command).await,
        Command::Keys { command } => keys_command(command).await,
        Command::Ope {
            policy,
            model_version,
            placement,
            rounds,
            clip,
            seed,
            input,
            store,
        } => {
            let req = tailor::ope::service::EvaluateRequest {
                policy,
                model_version,
                placement,
                rounds,
                clip,
                seed,
            };
            let evaluation = match input {
                Some(path) => {
                    let file = std::fs::File::open(&path)
                        .with_context(|| format!("Failed to open {}", path.display()))?;
                    let logged = tailor::ope::read_jsonl(std::io::BufReader::new(file))
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    let settings = Settings::load(store.config.as_deref())?;
                    tailor::ope::service::evaluate_imported(logged, &settings.policy, &req)
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                }
                None => open_store(store)
                    .await?
                    .evaluate_policy(&req)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            };
            println!("{}", serde_json::to_string_pretty(&evaluation)?);
            Ok(())
        }
        Command::Simulate {
            policy,
            rounds,
            seed,
            model_dir,
            with_model,
            export,
        } => tokio::task::spawn_blocking(move || {
            simulate_command(policy, rounds, seed, model_dir, with_model, export)
        })
        .await
        .context("Failed to run the simulation")?,
        Command::Bench {
            url,
            workload,
            rate,
            duration,
            concurrency,
            dist,
            customers,
            placement,
            events_per_request,
            key,
            seed,
            timeout,
        } => {
            let report = tailor::loadgen::run(tailor::loadgen::BenchConfig {
                url: url.trim_end_matches('/').to_owned(),
                workload,
                rate,
                duration,
                concurrency,
                dist,
                customers,
                placement,
                events_per_request,
                key,
                seed,
                timeout,
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
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
            role,
        } => {
            let role = Role::from(role);
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
            let background = Background::start_role(&engine, role);
            if demo {
                tailor::demo::prepare_when_reachable(engine.clone(), |keys| println!("{keys}"))
                    .await
                    .context("Failed to build the demo world")?;
            }
            let served = serve_role(engine, role, listener, shutdown_signal()).await;
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
