//! Settings: compiled-in defaults (the embedded shape) → `tailor.toml` → `TAILOR_*`
//! environment variables (`TAILOR_<SECTION>__<KEY>`), then command-line flags.
//!
//! Unknown keys are rejected with their name, wherever they come from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::customers::{Consent, Purposes};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub backends: Backends,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub breaker: BreakerSettings,
    pub api: ApiSettings,
    pub auth: AuthSettings,
    pub policy: PolicySettings,
    pub experiments: ExperimentSettings,
    pub features: FeatureSettings,
    pub segments: SegmentSettings,
    pub storage: StorageSettings,
    pub consent: ConsentSettings,
    pub encryption: EncryptionSettings,
    pub rules: RulesConfig,
    pub model: ModelConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            backends: Backends::default(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            breaker: BreakerSettings::default(),
            api: ApiSettings::default(),
            auth: AuthSettings::default(),
            policy: PolicySettings::default(),
            experiments: ExperimentSettings::default(),
            features: FeatureSettings::default(),
            segments: SegmentSettings::default(),
            storage: StorageSettings::default(),
            consent: ConsentSettings::default(),
            encryption: EncryptionSettings::default(),
            rules: RulesConfig::default(),
            model: ModelConfig::default(),
        }
    }
}

/// The backend of each capability: `embedded` or a URL of a scaled-out store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backends {
    pub profiles: String,
    pub features: String,
    pub segments: String,
    pub bandit: String,
    /// Where decisions are shared between replicas (outcome lookup, frequency caps):
    /// `embedded` (this process only) or a Redis URL.
    pub decisions: String,
    /// What every replica must agree on: content items, definitions (segments, features,
    /// experiments, rules), experiment totals and API keys: `embedded` or a Redis URL.
    pub definitions: String,
    pub events: String,
    pub search: String,
}

impl Default for Backends {
    fn default() -> Self {
        let embedded = || "embedded".to_string();
        Backends {
            profiles: embedded(),
            features: embedded(),
            segments: embedded(),
            bandit: embedded(),
            decisions: embedded(),
            definitions: embedded(),
            events: embedded(),
            search: "none".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Request bodies above this are answered 413 before they are read.
    pub max_body_bytes: usize,
    pub max_query_depth: usize,
    pub max_query_complexity: usize,
    pub max_events_per_request: usize,
    /// Most candidates a decision considers.
    pub max_candidates: usize,
    /// Most directives on one field of a GraphQL query.
    pub max_directives: usize,
    /// Most nesting of lists, input objects and fragments a GraphQL query may use
    /// (bounds the recursion of the parser's consumers, not the selection depth).
    pub max_recursive_depth: usize,
    /// Most aliased fields in one GraphQL operation.
    pub max_aliases: usize,
    /// Most operations in one batched GraphQL request (a JSON array of requests).
    pub max_batch_operations: usize,
    /// Requests per second each API key (or JWT subject) may make on average; 0 for no
    /// limit. A batched GraphQL request counts each of its operations.
    pub rate_per_key_per_second: u32,
    /// Requests a key may make at once above its average rate.
    pub rate_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 2 * 1024 * 1024,
            max_query_depth: 16,
            max_query_complexity: 5_000,
            max_events_per_request: 10_000,
            max_candidates: 500,
            max_directives: 16,
            max_recursive_depth: 64,
            max_aliases: 100,
            max_batch_operations: 16,
            rate_per_key_per_second: 0,
            rate_burst: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Deadline for loading a decision's features; past it the decision uses defaults
    /// and is marked degraded.
    pub feature_read_ms: u64,
    /// Whole-request deadline.
    pub request_ms: u64,
    /// How long `trackEvents` waits for features and segments to reflect its events
    /// (they are durable before that either way); 0 answers as soon as they are durable.
    pub ingest_apply_ms: u64,
    /// Deadline of each call to a scaled-out backend (Redis); past it the call fails and
    /// the caller degrades as for an unreachable backend.
    pub backend_ms: u64,
}

impl Timeouts {
    pub fn backend(&self) -> Duration {
        Duration::from_millis(self.backend_ms)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            feature_read_ms: 20,
            request_ms: 10_000,
            ingest_apply_ms: 2_000,
            backend_ms: 1_000,
        }
    }
}

/// `[breaker]`: the circuit breaker in front of each scaled-out backend (Redis). After
/// `failure_threshold` consecutive calls that could not reach the backend (refused,
/// dropped, or past `timeouts.backend_ms`) it opens: calls fail at once as unavailable,
/// without touching the network, and callers degrade. Every `cool_down_ms` while open it
/// lets one probe through; the probe's success closes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSettings {
    pub failure_threshold: u32,
    pub cool_down_ms: u64,
}

impl BreakerSettings {
    pub fn cool_down(&self) -> Duration {
        Duration::from_millis(self.cool_down_ms)
    }
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            failure_threshold: 5,
            cool_down_ms: 2_000,
        }
    }
}

/// `[api]`: what the API shows about itself. `production = true` switches GraphiQL,
/// introspection and field suggestions off unless they are set explicitly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    pub production: bool,
    /// The GraphiQL page on `GET /graphql` (default: on unless `production`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graphiql: Option<bool>,
    /// `__schema` and `__type` queries (default: on unless `production`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub introspection: Option<bool>,
    /// "Did you mean …?" in validation errors (default: on unless `production`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suggestions: Option<bool>,
}

impl ApiSettings {
    pub fn graphiql(&self) -> bool {
        self.graphiql.unwrap_or(!self.production)
    }

    pub fn introspection(&self) -> bool {
        self.introspection.unwrap_or(!self.production)
    }

    pub fn suggestions(&self) -> bool {
        self.suggestions.unwrap_or(!self.production)
    }
}

/// `[auth]`: API keys with roles (`tailor keys`, SPEC §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Every GraphQL field and REST route except health checks and metrics needs a key
    /// whose role it is open to. `false` lets every request act as admin (the server
    /// warns at start); for a trusted network only.
    pub enabled: bool,
    /// Bearer JWTs from a single sign-on, accepted besides API keys.
    pub jwt: JwtSettings,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            enabled: true,
            jwt: JwtSettings::default(),
        }
    }
}

/// `[auth.jwt]`: verification of bearer JWTs issued by an SSO. A token must be signed with
/// exactly `algorithm` under the key in `key_file`, name `issuer` as `iss` and `audience`
/// in `aud`, be unexpired (`exp` is required), and carry a role name (`frontend`,
/// `marketer`, `admin`, `internal`) in the claim `role_claim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    pub enabled: bool,
    /// The one accepted algorithm: RS256/384/512, PS256/384/512, ES256/384, EdDSA, or
    /// HS256/384/512 (a shared secret).
    pub algorithm: String,
    /// The verification key: a PEM public key, or for HS* the file whose bytes are the
    /// shared secret.
    pub key_file: String,
    pub issuer: String,
    pub audience: String,
    /// The claim that holds the caller's role (a string, or a list whose first role name
    /// counts).
    pub role_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            enabled: false,
            algorithm: "RS256".into(),
            key_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            role_claim: "tailor_role".into(),
            leeway_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Beta-Bernoulli Thompson sampling per (placement, item).
    #[serde(alias = "thompson_sampling")]
    Thompson,
    /// The seed's policy: explore uniformly with probability `epsilon`, else greedy.
    EpsilonGreedy,
    /// The active model's score × rule weight, highest first, no exploration (Thompson
    /// sampling while no model is active).
    ModelGreedy,
    /// The active model's score through a softmax with `softmax_temperature` (Thompson
    /// sampling while no model is active).
    Softmax,
    /// LinUCB: a ridge regression per (placement, item) over the customer ⊕ context ⊕
    /// model-score vector, ranked by estimate + `alpha` × its standard error.
    LinUcb,
    /// Linear Thompson sampling over the same regressions, with `linear_noise` as the
    /// posterior's scale.
    LinearThompson,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::Thompson,
        PolicyKind::EpsilonGreedy,
        PolicyKind::ModelGreedy,
        PolicyKind::Softmax,
        PolicyKind::LinUcb,
        PolicyKind::LinearThompson,
    ];

    /// The name decisions, experiments and the CLI use.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Thompson => "thompson_sampling",
            PolicyKind::EpsilonGreedy => "epsilon_greedy",
            PolicyKind::ModelGreedy => "model_greedy",
            PolicyKind::Softmax => "softmax",
            PolicyKind::LinUcb => "lin_ucb",
            PolicyKind::LinearThompson => "linear_thompson",
        }
    }

    /// Reads [`PolicyKind::name`] (and `thompson`); `None` for anything else.
    pub fn parse(raw: &str) -> Option<PolicyKind> {
        if raw == "thompson" {
            return Some(PolicyKind::Thompson);
        }
        PolicyKind::ALL.into_iter().find(|k| k.name() == raw)
    }

    /// Whether the policy learns per-item linear models (and records their contexts).
    pub fn is_linear(self) -> bool {
        matches!(self, PolicyKind::LinUcb | PolicyKind::LinearThompson)
    }

    /// Every name, for error messages.
    pub fn names() -> String {
        PolicyKind::ALL.map(PolicyKind::name).join(", ")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicySettings {
    pub default: PolicyKind,
    pub epsilon: f64,
    /// Monte Carlo rounds of Thompson sampling's distribution in off-policy evaluation,
    /// and of a pick's propensity when an arm has no proper posterior (otherwise the
    /// propensity is computed by quadrature and this is not used).
    pub propensity_samples: usize,
    /// How many pseudo-trials the active model's score is worth as the prior of Thompson
    /// sampling and epsilon-greedy (0: the bandit ignores the model).
    pub model_prior_strength: f64,
    /// Softmax temperature over model scores (lower: greedier).
    pub softmax_temperature: f64,
    /// LinUCB's exploration: how many standard errors are added to the estimate.
    pub alpha: f64,
    /// Linear Thompson sampling's posterior scale `v`.
    pub linear_noise: f64,
    /// Ridge `λ` of the linear policies' regressions (their prior precision).
    pub ridge: f64,
    /// Slots of the linear policies' hashed context vector (changing it starts their
    /// models afresh).
    pub linear_dims: usize,
    /// An outcome later than this after its decision is stored and counted in metrics
    /// and experiments, but no longer teaches the bandit.
    pub attribution_window_secs: u64,
    /// Per-placement policy and reward definition.
    pub placements: BTreeMap<String, PlacementPolicy>,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            default: PolicyKind::Thompson,
            epsilon: 0.1,
            propensity_samples: 200,
            model_prior_strength: 20.0,
            softmax_temperature: 0.05,
            alpha: 0.5,
            linear_noise: 0.25,
            ridge: 1.0,
            linear_dims: 32,
            attribution_window_secs: 86_400,
            placements: BTreeMap::new(),
        }
    }
}

impl PolicySettings {
    /// The policy of `placement`: its own, else `default`.
    pub fn kind_for(&self, placement: &str) -> PolicyKind {
        self.placements
            .get(placement)
            .and_then(|p| p.policy)
            .unwrap_or(self.default)
    }

    /// The reward definition of `placement`.
    pub fn reward_for(&self, placement: &str) -> &RewardKind {
        self.placements
            .get(placement)
            .map_or(&RewardKind::Outcome, |p| &p.reward)
    }

    /// What the bandit learns from an outcome under `placement`'s definition: `None`
    /// when the outcome does not count (another conversion type, no value).
    pub fn reward_of(
        &self,
        placement: &str,
        reward: f64,
        conversion_type: &str,
        value: Option<f64>,
    ) -> Option<f64> {
        match self.reward_for(placement) {
            RewardKind::Outcome => Some(reward),
            RewardKind::Value => {
                let cap = self
                    .placements
                    .get(placement)
                    .and_then(|p| p.value_cap)
                    .unwrap_or(1.0);
                value.map(|v| (v / cap).clamp(0.0, 1.0))
            }
            RewardKind::Conversion(types) => {
                types.iter().any(|t| t == conversion_type).then_some(reward)
            }
        }
    }
}

/// A placement's own policy and what counts as its reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementPolicy {
    pub policy: Option<PolicyKind>,
    pub reward: RewardKind,
    /// With `reward = "value"`: the value worth a reward of 1 (rewards are
    /// `min(value / value_cap, 1)`).
    pub value_cap: Option<f64>,
}

impl Default for PlacementPolicy {
    fn default() -> Self {
        PlacementPolicy {
            policy: None,
            reward: RewardKind::Outcome,
            value_cap: None,
        }
    }
}

/// What teaches a placement's bandit. In `tailor.toml`: `"outcome"` (every outcome's own
/// reward, the default), `"value"` (the outcome's value over `value_cap`), or a list of
/// conversion types such as `["purchase"]` (only those count, each decision once).
#[derive(Debug, Clone, PartialEq)]
pub enum RewardKind {
    Outcome,
    Value,
    Conversion(Vec<String>),
}

impl Serialize for RewardKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RewardKind::Outcome => s.serialize_str("outcome"),
            RewardKind::Value => s.serialize_str("value"),
            RewardKind::Conversion(types) => types.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for RewardKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Types(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::Name(n) if n == "outcome" => Ok(RewardKind::Outcome),
            Raw::Name(n) if n == "value" => Ok(RewardKind::Value),
            Raw::Name(n) => Ok(RewardKind::Conversion(vec![n])),
            Raw::Types(t) => Ok(RewardKind::Conversion(t)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExperimentSettings {
    /// Share of all customers (0 to under 100) kept out of every experiment, to measure
    /// the experiments' combined effect.
    pub holdout_percent: f64,
    /// Hashed with the customer id to pick the holdout; changing it reshuffles it.
    pub holdout_salt: String,
}

impl Default for ExperimentSettings {
    fn default() -> Self {
        ExperimentSettings {
            holdout_percent: 0.0,
            holdout_salt: "tailor-holdout".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeatureSettings {
    /// Customers sampled by an activation's health check.
    pub health_sample: usize,
    /// Share of sampled values that may fail to compute (NaN, infinite) before rollback.
    pub max_error_rate: f64,
    /// Largest Kolmogorov–Smirnov distance between the new and the replaced version's
    /// values before rollback.
    pub max_distribution_shift: f64,
    /// How often active versions' runtime error rates are checked (and failing ones
    /// rolled back).
    pub health_check_interval_secs: u64,
}

impl Default for FeatureSettings {
    fn default() -> Self {
        FeatureSettings {
            health_sample: 1_000,
            max_error_rate: 0.01,
            max_distribution_shift: 0.5,
            health_check_interval_secs: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SegmentSettings {
    /// How often segments whose conditions depend on time are re-evaluated, so that a
    /// window sliding past an event moves customers without any new event.
    pub refresh_interval_secs: u64,
}

impl Default for SegmentSettings {
    fn default() -> Self {
        SegmentSettings {
            refresh_interval_secs: 60,
        }
    }
}

/// `[storage]`: how the embedded store commits what no client handed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// The decision log (decisions, and the impressions and exposures they count):
    /// `relaxed` commits them without waiting for an fsync (on disk within 100 ms of an
    /// idle writer, so a crash loses at most that much of them); `durable` waits for
    /// the fsync like every acknowledged write (events, profiles, outcomes, definitions).
    pub decision_log: DecisionLog,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            decision_log: DecisionLog::Relaxed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionLog {
    Relaxed,
    Durable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    /// Rule files (`*.rhai`), loaded at start and hot-reloaded; "" for API-managed
    /// rules only. Relative to the working directory.
    pub dir: String,
    /// Plugin modules rules may import; "" for none.
    pub plugins_dir: String,
    /// Wall-clock budget of one rule in one decision (all candidates) or one event.
    pub budget_ms: u64,
    /// How often the directories (and rules changed by other replicas) are checked.
    pub reload_interval_secs: u64,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            dir: "rules".into(),
            plugins_dir: "plugins".into(),
            budget_ms: 10,
            reload_interval_secs: 2,
        }
    }
}

impl RulesConfig {
    pub fn settings(&self) -> crate::rules::service::RuleSettings {
        let dir = |d: &str| (!d.trim().is_empty()).then(|| PathBuf::from(d));
        crate::rules::service::RuleSettings {
            dir: dir(&self.dir),
            plugins_dir: dir(&self.plugins_dir),
            budget: Duration::from_millis(self.budget_ms.max(1)),
        }
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelDevice {
    Cpu,
    /// The first NVIDIA GPU; needs a build with the `cuda` cargo feature.
    Cuda,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub device: ModelDevice,
    /// Longest a scoring request waits for others to share its forward pass.
    pub batch_wait_us: u64,
    /// Most candidates in one forward pass.
    pub max_batch: usize,
    /// An outcome counts for training when recorded this long after its decision.
    pub attribution_window_secs: u64,
    /// Decisions the active version and its predecessor each need before their online
    /// rewards are compared for automatic rollback.
    pub min_decisions: u64,
    /// Automatic rollback when the active version's mean reward is below its
    /// predecessor's by more than this.
    pub margin: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            device: ModelDevice::Cpu,
            batch_wait_us: 200,
            max_batch: 2_048,
            attribution_window_secs: 86_400,
            min_decisions: 1_000,
            margin: 0.02,
        }
    }
}

/// `[consent]`: what a customer who never said anything about a purpose is taken to
/// have chosen, and which content needs marketing consent (SPEC §7).
///
/// - **personalization**: decisions use the profile, features, segments, model and
///   bandit; without it a customer gets the highest-priority eligible item.
/// - **marketing**: content of the `marketing_content_types` is served only with it, and
///   rules read it as `c.consent.marketing`.
/// - **analytics**: behavioural events are collected under it; without it they are
///   acknowledged but not stored, so no feature, segment, rule, model or export sees them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsentSettings {
    /// Whether a customer who never said anything about personalization gets it.
    pub default_personalization: bool,
    /// Whether a customer who never said anything about marketing is marketed to.
    pub default_marketing: bool,
    /// Whether the events of a customer who never said anything about analytics (or has
    /// no profile yet) are collected.
    pub default_analytics: bool,
    /// Content types that are marketing (`"offer"`, `"email"`, ...): served only to
    /// customers with marketing consent. Empty: no content needs it.
    pub marketing_content_types: Vec<String>,
}

impl Default for ConsentSettings {
    fn default() -> Self {
        ConsentSettings {
            default_personalization: true,
            default_marketing: false,
            default_analytics: true,
            marketing_content_types: Vec::new(),
        }
    }
}

impl ConsentSettings {
    /// What `consent` allows, the defaults filling in each purpose it never set (all of
    /// them for a customer without a profile).
    pub fn resolve(&self, consent: Option<&Consent>) -> Purposes {
        let said = |f: fn(&Consent) -> Option<bool>| consent.and_then(f);
        Purposes {
            personalization: said(|c| c.personalization).unwrap_or(self.default_personalization),
            marketing: said(|c| c.marketing).unwrap_or(self.default_marketing),
            analytics: said(|c| c.analytics).unwrap_or(self.default_analytics),
        }
    }

    /// Whether items of `content_type` need marketing consent.
    pub fn is_marketing(&self, content_type: &str) -> bool {
        self.marketing_content_types
            .iter()
            .any(|t| t == content_type)
    }
}

/// The environment variable that holds the current master key by default. It starts
/// with `TAILOR_` like the settings, so [`Settings::load`] skips it (as `encryption_key`)
/// instead of refusing it as an unknown key.
pub const DEFAULT_MASTER_KEY_ENV: &str = "TAILOR_ENCRYPTION_KEY";

/// `[encryption]`: field-level encryption of PII at rest (SPEC §7).
///
/// The master key material never comes from this file: only where to find it. The
/// current key is read from the environment variable `key_env` when it is set, else from
/// `key_file`, else from `<data_dir>/master-keys/<key_id>.key`, generated (mode 0600) on
/// first start. Key material is 32 bytes written as base64 or 64 hex digits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionSettings {
    /// Id of the current master key: new data keys are wrapped under it, and
    /// `tailor keys rotate-master` re-wraps every other data key under it.
    pub key_id: String,
    /// File holding the current master key; "" for none.
    pub key_file: String,
    /// Environment variable holding the current master key; read when it is set and not
    /// empty, before `key_file`. A `TAILOR_` name other than the default would be read as
    /// a configuration key, so it is refused.
    pub key_env: String,
    /// Older master keys, still used to unwrap data keys wrapped under them until a
    /// rotation re-wrapped those. Without `key_file` and `key_env`, every other
    /// `<data_dir>/master-keys/*.key` is one too.
    pub previous_keys: Vec<PreviousMasterKey>,
    /// Traits encrypted at rest like the PII fields (`email`, `phone`, `name`).
    pub sensitive_traits: Vec<String>,
}

impl Default for EncryptionSettings {
    fn default() -> Self {
        EncryptionSettings {
            key_id: "k1".into(),
            key_file: String::new(),
            key_env: DEFAULT_MASTER_KEY_ENV.into(),
            previous_keys: Vec::new(),
            sensitive_traits: Vec::new(),
        }
    }
}

/// An older master key: its id and where its material is (a file, or an environment
/// variable).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreviousMasterKey {
    pub id: String,
    pub key_file: String,
    pub key_env: String,
}

/// Whether `id` can name a master key: 1–64 of `A-Z a-z 0-9 _ -` (it is part of file
/// names and of every wrapped key).
pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl EncryptionSettings {
    fn validate(&self) -> anyhow::Result<()> {
        if !valid_key_id(&self.key_id) {
            anyhow::bail!("encryption.key_id: 1–64 characters of A-Z, a-z, 0-9, '_' and '-'");
        }
        let env_ok = |name: &str| {
            name.is_empty() || name == DEFAULT_MASTER_KEY_ENV || !name.starts_with("TAILOR_")
        };
        if !env_ok(&self.key_env) {
            anyhow::bail!(
                "encryption.key_env: '{}' would be read as a configuration key; use \
                 {DEFAULT_MASTER_KEY_ENV} or a name without the TAILOR_ prefix",
                self.key_env
            );
        }
        let mut ids = std::collections::BTreeSet::from([self.key_id.as_str()]);
        for (i, previous) in self.previous_keys.iter().enumerate() {
            let field = format!("encryption.previous_keys[{i}]");
            if !valid_key_id(&previous.id) {
                anyhow::bail!("{field}.id: 1–64 characters of A-Z, a-z, 0-9, '_' and '-'");
            }
            if !ids.insert(previous.id.as_str()) {
                anyhow::bail!("{field}.id: '{}' is named twice", previous.id);
            }
            if previous.key_file.is_empty() == previous.key_env.is_empty() {
                anyhow::bail!("{field}: exactly one of key_file and key_env");
            }
            if !previous.key_env.is_empty() && previous.key_env.starts_with("TAILOR_") {
                anyhow::bail!(
                    "{field}.key_env: '{}' would be read as a configuration key; use a \
                     name without the TAILOR_ prefix",
                    previous.key_env
                );
            }
        }
        for (i, name) in self.sensitive_traits.iter().enumerate() {
            if name.is_empty() {
                anyhow::bail!("encryption.sensitive_traits[{i}]: must not be empty");
            }
        }
        Ok(())
    }
}

/// Environment variables with the `TAILOR_` prefix that are not settings.
const NOT_SETTINGS: &[&str] = &["api_key", "encryption_key"];

impl Settings {
    /// Defaults, then the file (if given; `tailor.toml` in the working directory when it
    /// exists otherwise), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        match file {
            Some(path) => {
                if !path.exists() {
                    anyhow::bail!("config file {} does not exist", path.display());
                }
                figment = figment.merge(Toml::file_exact(path));
            }
            None => {
                if Path::new("tailor.toml").exists() {
                    figment = figment.merge(Toml::file_exact("tailor.toml"));
                }
            }
        }
        figment = figment.merge(Env::prefixed("TAILOR_").split("__").ignore(NOT_SETTINGS));
        Self::extract(figment)
    }

    fn extract(figment: Figment) -> anyhow::Result<Self> {
        let settings: Settings = figment.extract().map_err(|e| {
            let messages: Vec<String> = e.into_iter().map(describe).collect();
            anyhow::anyhow!("invalid configuration: {}", messages.join("; "))
        })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let b = &self.backends;
        for (capability, value) in [
            ("profiles", &b.profiles),
            ("features", &b.features),
            ("segments", &b.segments),
            ("bandit", &b.bandit),
            ("decisions", &b.decisions),
            ("definitions", &b.definitions),
            ("events", &b.events),
        ] {
            crate::storage::check_backend(capability, value, self.timeouts.backend())
                .map_err(|e| anyhow::anyhow!("backends.{capability}: {e}"))?;
        }
        if b.search != "none" {
            anyhow::bail!(
                "backends.search: '{}' is not available in this build (only \"none\")",
                b.search
            );
        }
        if !(0.0..=1.0).contains(&self.policy.epsilon) {
            anyhow::bail!("policy.epsilon: must be between 0 and 1");
        }
        if !(0.0..100.0).contains(&self.experiments.holdout_percent) {
            anyhow::bail!("experiments.holdout_percent: must be at least 0 and below 100");
        }
        if self.experiments.holdout_salt.is_empty() {
            anyhow::bail!("experiments.holdout_salt: must not be empty");
        }
        let p = &self.policy;
        for (name, value, min) in [
            (
                "softmax_temperature",
                p.softmax_temperature,
                f64::MIN_POSITIVE,
            ),
            ("ridge", p.ridge, f64::MIN_POSITIVE),
            ("alpha", p.alpha, 0.0),
            ("linear_noise", p.linear_noise, 0.0),
        ] {
            if !(value.is_finite() && value >= min) {
                let bound = if min > 0.0 { "> 0" } else { "≥ 0" };
                anyhow::bail!("policy.{name}: must be a number {bound}");
            }
        }
        if !(crate::bandit::linear::MIN_DIMS..=256).contains(&p.linear_dims) {
            anyhow::bail!("policy.linear_dims: must be between 3 and 256");
        }
        for (placement, pp) in &p.placements {
            if pp.value_cap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
                anyhow::bail!("policy.placements.{placement}.value_cap: must be a number > 0");
            }
            if pp.reward == RewardKind::Value && pp.value_cap.is_none() {
                anyhow::bail!(
                    "policy.placements.{placement}.value_cap: required with reward = \"value\""
                );
            }
            if let RewardKind::Conversion(types) = &pp.reward {
                if types.is_empty() || types.iter().any(|t| t.is_empty() || t.len() > 64) {
                    anyhow::bail!(
                        "policy.placements.{placement}.reward: \"outcome\", \"value\", or conversion types of 1–64 characters"
                    );
                }
            }
        }
        for (i, t) in self.consent.marketing_content_types.iter().enumerate() {
            if t.trim().is_empty() || t.len() > 64 {
                anyhow::bail!(
                    "consent.marketing_content_types[{i}]: a content type of 1–64 characters"
                );
            }
        }
        if self.policy.propensity_samples == 0 {
            anyhow::bail!("policy.propensity_samples: must be at least 1");
        }
        if !(self.policy.model_prior_strength.is_finite()
            && self.policy.model_prior_strength >= 0.0)
        {
            anyhow::bail!("policy.model_prior_strength: must be a number ≥ 0");
        }
        if self.model.max_batch == 0 {
            anyhow::bail!("model.max_batch: must be at least 1");
        }
        if self.model.batch_wait_us > 1_000_000 {
            anyhow::bail!("model.batch_wait_us: must be at most 1000000 (one second)");
        }
        if !(self.model.margin.is_finite() && self.model.margin >= 0.0) {
            anyhow::bail!("model.margin: must be a number ≥ 0");
        }
        if self.model.attribution_window_secs == 0 {
            anyhow::bail!("model.attribution_window_secs: must be at least 1");
        }
        if self.limits.max_body_bytes < 1024 {
            anyhow::bail!("limits.max_body_bytes: must be at least 1024");
        }
        for (name, value) in [
            ("max_query_depth", self.limits.max_query_depth),
            ("max_query_complexity", self.limits.max_query_complexity),
            ("max_directives", self.limits.max_directives),
            ("max_recursive_depth", self.limits.max_recursive_depth),
            ("max_aliases", self.limits.max_aliases),
            ("max_batch_operations", self.limits.max_batch_operations),
        ] {
            if value == 0 {
                anyhow::bail!("limits.{name}: must be at least 1");
            }
        }
        if self.limits.rate_per_key_per_second > 0 && self.limits.rate_burst == 0 {
            anyhow::bail!(
                "limits.rate_burst: must be at least 1 while rate_per_key_per_second is set"
            );
        }
        if self.timeouts.request_ms == 0 {
            anyhow::bail!("timeouts.request_ms: must be at least 1");
        }
        if self.breaker.failure_threshold == 0 {
            anyhow::bail!("breaker.failure_threshold: must be at least 1");
        }
        if self.breaker.cool_down_ms == 0 {
            anyhow::bail!("breaker.cool_down_ms: must be at least 1");
        }
        let jwt = &self.auth.jwt;
        if jwt.enabled {
            crate::auth::jwt::algorithm("auth.jwt.algorithm", &jwt.algorithm)?;
            for (name, value) in [
                ("key_file", &jwt.key_file),
                ("issuer", &jwt.issuer),
                ("audience", &jwt.audience),
                ("role_claim", &jwt.role_claim),
            ] {
                if value.trim().is_empty() {
                    anyhow::bail!("auth.jwt.{name}: required while auth.jwt.enabled is true");
                }
            }
        }
        self.encryption.validate()?;
        Ok(())
    }
}

/// One figment error as "key: problem", naming the key path.
fn describe(e: figment::Error) -> String {
    let path = e.path.join(".");
    let source = e
        .metadata
        .as_ref()
        .and_then(|m| m.source.as_ref())
        .map(|s| format!(" (from {s})"))
        .unwrap_or_default();
    match &e.kind {
        figment::error::Kind::UnknownField(field, _) => {
            let key = if path.is_empty() {
                field.clone()
            } else if e.path.last() == Some(field) {
                path
            } else {
                format!("{path}.{field}")
            };
            format!("unknown key '{key}'{source}")
        }
        kind => {
            if path.is_empty() {
                format!("{kind}{source}")
            } else {
                format!("{path}: {kind}{source}")
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return its large error type
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_the_embedded_shape() {
        Jail::expect_with(|_| {
            let s = Settings::load(None).unwrap();
            assert_eq!(s, Settings::default());
            assert_eq!(s.backends.features, "embedded");
            assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
            Ok(())
        });
    }

    #[test]
    fn file_then_environment() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "tailor.toml",
                "listen = \"127.0.0.1:9000\"\n[policy]\nepsilon = 0.2\n",
            )?;
            jail.set_env("TAILOR_POLICY__EPSILON", "0.3");
            jail.set_env("TAILOR_DATA_DIR", "/tmp/x");
            jail.set_env("TAILOR_API_KEY", "not-a-setting");
            let s = Settings::load(None).unwrap();
            assert_eq!(s.listen.port(), 9000);
            assert_eq!(s.policy.epsilon, 0.3);
            assert_eq!(s.data_dir, PathBuf::from("/tmp/x"));
            Ok(())
        });
    }

    #[test]
    fn auth_is_on_by_default_and_switched_off_by_file_or_environment() {
        Jail::expect_with(|jail| {
            assert!(Settings::load(None).unwrap().auth.enabled);
            jail.create_file("tailor.toml", "[auth]\nenabled = false\n")?;
            assert!(!Settings::load(None).unwrap().auth.enabled);
            jail.set_env("TAILOR_AUTH__ENABLED", "true");
            assert!(Settings::load(None).unwrap().auth.enabled);
            jail.create_file("tailor.toml", "[auth]\nenabledd = false\n")?;
            let e = Settings::load(None).unwrap_err().to_string();
            assert!(e.contains("auth.enabledd"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn production_mode_and_its_explicit_overrides() {
        Jail::expect_with(|jail| {
            let api = Settings::load(None).unwrap().api;
            assert!(api.graphiql() && api.introspection() && api.suggestions());
            jail.create_file("tailor.toml", "[api]\nproduction = true\n")?;
            let api = Settings::load(None).unwrap().api;
            assert!(!api.graphiql() && !api.introspection() && !api.suggestions());
            jail.set_env("TAILOR_API__INTROSPECTION", "true");
            let api = Settings::load(None).unwrap().api;
            assert!(api.introspection() && !api.graphiql());
            Ok(())
        });
        for (toml, key) in [
            ("[limits]\nmax_aliases = 0\n", "limits.max_aliases:"),
            (
                "[limits]\nmax_batch_operations = 0\n",
                "limits.max_batch_operations:",
            ),
            (
                "[limits]\nrate_per_key_per_second = 5\nrate_burst = 0\n",
                "limits.rate_burst:",
            ),
            ("[auth.jwt]\nenabled = true\n", "auth.jwt.key_file:"),
            (
                "[auth.jwt]\nenabled = true\nalgorithm = \"none\"\n",
                "auth.jwt.algorithm:",
            ),
            (
                "[auth.jwt]\nenabled = true\nkey_file = \"k\"\nissuer = \"i\"\n",
                "auth.jwt.audience:",
            ),
            (
                "[auth.jwt]\nalgorithmm = \"RS256\"\n",
                "unknown key 'auth.jwt.algorithmm'",
            ),
            (
                "[breaker]\nfailure_threshold = 0\n",
                "breaker.failure_threshold:",
            ),
            ("[breaker]\ncool_down_ms = 0\n", "breaker.cool_down_ms:"),
            (
                "[breaker]\ncooldown_ms = 100\n",
                "unknown key 'breaker.cooldown_ms'",
            ),
        ] {
            Jail::expect_with(|jail| {
                jail.create_file("tailor.toml", toml)?;
                let err = Settings::load(None).unwrap_err().to_string();
                assert!(err.contains(key), "{toml}: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn placements_choose_their_policy_and_reward() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "tailor.toml",
                "[policy]\ndefault = \"lin_ucb\"\n\
                 [policy.placements.checkout]\npolicy = \"linear_thompson\"\nreward = \"value\"\nvalue_cap = 200.0\n\
                 [policy.placements.email]\nreward = [\"click\", \"open\"]\n\
                 [policy.placements.hero]\nreward = \"purchase\"\n",
            )?;
            let s = Settings::load(None).unwrap();
            let p = &s.policy;
            assert_eq!(p.kind_for("checkout"), PolicyKind::LinearThompson);
            assert_eq!(p.kind_for("email"), PolicyKind::LinUcb, "the default");
            assert_eq!(
                p.reward_of("checkout", 1.0, "purchase", Some(50.0)),
                Some(0.25)
            );
            assert_eq!(p.reward_of("checkout", 1.0, "click", None), None);
            assert_eq!(p.reward_of("email", 0.5, "open", None), Some(0.5));
            assert_eq!(p.reward_of("email", 1.0, "purchase", None), None);
            assert_eq!(p.reward_of("hero", 1.0, "purchase", None), Some(1.0));
            assert_eq!(p.reward_of("elsewhere", 0.7, "anything", None), Some(0.7));
            Ok(())
        });
        for (toml, key) in [
            (
                "[policy.placements.c]\nreward = \"value\"\n",
                "policy.placements.c.value_cap",
            ),
            (
                "[policy.placements.c]\nreward = []\n",
                "policy.placements.c.reward",
            ),
            ("[policy]\nalpha = -1.0\n", "policy.alpha"),
            ("[policy]\nridge = 0.0\n", "policy.ridge"),
            ("[policy]\nlinear_dims = 2\n", "policy.linear_dims"),
            (
                "[policy]\nsoftmax_temperature = 0.0\n",
                "policy.softmax_temperature",
            ),
        ] {
            Jail::expect_with(|jail| {
                jail.create_file("tailor.toml", toml)?;
                let err = Settings::load(None).unwrap_err().to_string();
                assert!(err.starts_with(key), "{toml}: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn encryption_keys_come_from_file_or_environment_never_inline() {
        Jail::expect_with(|jail| {
            // The key material's variable is not a setting, and settings stay settable.
            jail.set_env(DEFAULT_MASTER_KEY_ENV, "AAAA");
            jail.set_env("TAILOR_ENCRYPTION__KEY_ID", "k2");
            jail.create_file(
                "tailor.toml",
                "[encryption]\nsensitive_traits = [\"birthday\"]\n\
                 [[encryption.previous_keys]]\nid = \"k1\"\nkey_file = \"old.key\"\n",
            )?;
            let s = Settings::load(None).unwrap();
            assert_eq!(s.encryption.key_id, "k2");
            assert_eq!(s.encryption.key_env, DEFAULT_MASTER_KEY_ENV);
            assert_eq!(s.encryption.sensitive_traits, vec!["birthday".to_string()]);
            assert_eq!(s.encryption.previous_keys[0].key_file, "old.key");
            Ok(())
        });
        for (toml, key) in [
            (
                "[encryption]\nkey = \"c2VjcmV0\"\n",
                "unknown key 'encryption.key'",
            ),
            ("[encryption]\nkey_id = \"a b\"\n", "encryption.key_id:"),
            (
                "[encryption]\nkey_env = \"TAILOR_OTHER\"\n",
                "encryption.key_env:",
            ),
            (
                "[[encryption.previous_keys]]\nid = \"k1\"\nkey_file = \"a\"\n",
                "encryption.previous_keys[0].id:",
            ),
            (
                "[[encryption.previous_keys]]\nid = \"k0\"\n",
                "encryption.previous_keys[0]:",
            ),
        ] {
            Jail::expect_with(|jail| {
                jail.create_file("tailor.toml", toml)?;
                let err = Settings::load(None).unwrap_err().to_string();
                assert!(err.contains(key), "{toml}: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn consent_defaults_per_purpose_and_marketing_types() {
        Jail::expect_with(|jail| {
            let c = Settings::load(None).unwrap().consent;
            // Unknown consent: personalization and analytics yes, marketing no.
            let none = c.resolve(None);
            assert!(none.personalization && none.analytics && !none.marketing);
            assert!(!c.is_marketing("offer"));
            jail.create_file(
                "tailor.toml",
                "[consent]\ndefault_personalization = false\ndefault_analytics = false\n\
                 marketing_content_types = [\"offer\", \"email\"]\n",
            )?;
            jail.set_env("TAILOR_CONSENT__DEFAULT_MARKETING", "true");
            let c = Settings::load(None).unwrap().consent;
            let none = c.resolve(None);
            assert!(!none.personalization && !none.analytics && none.marketing);
            // What the customer said wins over the default, purpose by purpose.
            let said = crate::customers::Consent {
                personalization: Some(true),
                marketing: Some(false),
                analytics: None,
            };
            let p = c.resolve(Some(&said));
            assert!(p.personalization && !p.marketing && !p.analytics);
            assert!(c.is_marketing("email") && !c.is_marketing("banner"));
            jail.create_file(
                "tailor.toml",
                "[consent]\nmarketing_content_types = [\"offer\", \" \"]\n",
            )?;
            let e = Settings::load(None).unwrap_err().to_string();
            assert!(e.contains("consent.marketing_content_types[1]"), "{e}");
            jail.create_file("tailor.toml", "[consent]\ndefault_analytic = false\n")?;
            let e = Settings::load(None).unwrap_err().to_string();
            assert!(e.contains("consent.default_analytic"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn the_decision_log_setting_parses_and_names_a_bad_value() {
        Jail::expect_with(|jail| {
            assert_eq!(
                Settings::load(None).unwrap().storage.decision_log,
                DecisionLog::Relaxed
            );
            jail.create_file("tailor.toml", "[storage]\ndecision_log = \"durable\"\n")?;
            assert_eq!(
                Settings::load(None).unwrap().storage.decision_log,
                DecisionLog::Durable
            );
            jail.set_env("TAILOR_STORAGE__DECISION_LOG", "sometimes");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("storage.decision_log"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        Jail::expect_with(|jail| {
            jail.create_file("tailor.toml", "[backends]\nfeaturez = \"embedded\"\n")?;
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("unknown key 'backends.featurez'"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TAILOR_LIMITS__MAX_BODY", "5");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("unknown key 'limits.max_body'"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unavailable_backends_and_bad_values_name_the_key() {
        Jail::expect_with(|jail| {
            // Without the `redis` feature any Redis URL is unavailable; with it, this one
            // has an unknown parameter.
            jail.set_env(
                "TAILOR_BACKENDS__FEATURES",
                "redis://127.0.0.1:6379?color=blue",
            );
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.starts_with("backends.features:"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            // Kafka serves events only; without the `kafka` feature no Kafka URL does.
            jail.set_env("TAILOR_BACKENDS__EVENTS", "kafka://127.0.0.1:0");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.starts_with("backends.events:"), "{err}");
            if cfg!(feature = "kafka") {
                assert_eq!(err, "backends.events: '127.0.0.1:0' is not a host:port");
                jail.set_env("TAILOR_BACKENDS__EVENTS", "kafka://k1:9092,k2:9092?group=g");
                assert!(Settings::load(None).is_ok());
            } else {
                assert!(err.contains("is not available in this build"), "{err}");
            }
            jail.set_env("TAILOR_BACKENDS__EVENTS", "embedded");
            jail.set_env("TAILOR_BACKENDS__FEATURES", "kafka://k1:9092");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.starts_with("backends.features:"), "{err}");
            assert!(err.contains("is not available in this build"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TAILOR_MODEL__DEVICE", "tpu");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("model.device"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file(
                "tailor.toml",
                "[model]\ndevice = \"cuda\"\nbatch_wait_us = 50\n",
            )?;
            let s = Settings::load(None).unwrap();
            assert_eq!(
                (s.model.device, s.model.batch_wait_us),
                (ModelDevice::Cuda, 50)
            );
            jail.set_env("TAILOR_MODEL__MAX_BATCH", "0");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.starts_with("model.max_batch:"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TAILOR_POLICY__EPSILON", "lots");
            let err = Settings::load(None).unwrap_err().to_string();
            assert!(err.contains("policy.epsilon"), "{err}");
            Ok(())
        });
    }
}
