//! `tailor bench`: a load generator against a running server, over GraphQL/HTTP.
//!
//! - **Open loop** (`rate > 0`): request `i` is due at `start + i / rate` whatever the
//!   server does, and its latency is measured from that intended time, not from when it
//!   was sent, so a server that falls behind shows its queueing in the tail (no
//!   coordinated omission). At most `concurrency` requests are in flight; a request that
//!   waits for a slot keeps its intended time.
//! - **Closed loop** (`rate = 0`): `concurrency` workers send back to back; the achieved
//!   rate is the maximum throughput at that concurrency.
//!
//! Every response is checked: an HTTP status other than 200, a body that is not JSON, or
//! a GraphQL `errors` list counts as an error (the first few are quoted in the report).
//! Latencies go into an HDR histogram (microsecond resolution, 3 significant digits).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// `personalize` for a drawn customer at the placement.
    Personalize,
    /// `trackEvents` with `events_per_request` new `page_view` events.
    Events,
    /// `features(customerId)`: every active feature of a drawn customer.
    Features,
    /// The same events as `events`, posted as a JSON array to the REST route
    /// `/api/v1/events` instead of GraphQL.
    RestEvents,
    /// `GET /healthz`: a bare route of the same server (its HTTP stack and middleware,
    /// no GraphQL, no key): the HTTP ceiling that `personalize` is compared with.
    HttpCeiling,
    /// `{ __typename }` over `/graphql` with the key: a constant query through the same
    /// parsing, key check, rate limit and executor, no resolver work: the GraphQL
    /// ceiling.
    GraphqlCeiling,
}

impl Workload {
    fn sends_events(self) -> bool {
        matches!(self, Workload::Events | Workload::RestEvents)
    }
}

/// How customers are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dist {
    /// Zipf (exponent 1.1) over the customers: a few are drawn often.
    Zipf,
    Uniform,
}

#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The server's base URL (`http://host:port`); requests go to `<url>/graphql`.
    pub url: String,
    pub workload: Workload,
    /// Requests per second offered; 0 for the closed loop.
    pub rate: f64,
    pub duration: Duration,
    /// Most requests in flight (open loop), or workers (closed loop).
    pub concurrency: usize,
    pub dist: Dist,
    /// Customers `cust-00000` … (the demo world's ids).
    pub customers: usize,
    pub placement: String,
    pub events_per_request: usize,
    pub key: Option<String>,
    pub seed: u64,
    /// Per-request timeout; a request that times out is an error.
    pub timeout: Duration,
}

/// The JSON `tailor bench` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub workload: Workload,
    /// `open` (fixed offered rate) or `closed` (maximum throughput).
    pub mode: &'static str,
    pub dist: Dist,
    pub concurrency: usize,
    pub duration_s: f64,
    /// Requests per second offered (open loop only).
    pub offered_rps: Option<f64>,
    /// Requests answered per second, errors included, over the run.
    pub achieved_rps: f64,
    pub requests: u64,
    pub errors: u64,
    /// Events per second acknowledged (events workload only).
    pub events_per_s: Option<f64>,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// The first few errors, as the server (or the client) put them.
    pub error_samples: Vec<String>,
}

const ERROR_SAMPLES: usize = 5;

/// Results gathered from every request.
struct Tally {
    latency: Histogram<u64>,
    requests: u64,
    errors: u64,
    samples: Vec<String>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            requests: 0,
            errors: 0,
            samples: Vec::new(),
        }
    }

    fn record(&mut self, elapsed: Duration, outcome: Result<(), String>) {
        self.requests += 1;
        let micros = (elapsed.as_micros() as u64).clamp(1, 3_600_000_000);
        self.latency.saturating_record(micros);
        if let Err(e) = outcome {
            self.errors += 1;
            if self.samples.len() < ERROR_SAMPLES {
                self.samples.push(e);
            }
        }
    }
}

/// Builds the requests: draws customers and numbers events.
struct Requests {
    config: BenchConfig,
    zipf: Option<Zipf<f64>>,
    run: String,
}

impl Requests {
    fn new(config: BenchConfig) -> anyhow::Result<Self> {
        let zipf = match config.dist {
            Dist::Zipf => Some(
                Zipf::new(config.customers as f64, 1.1)
                    .map_err(|e| anyhow::anyhow!("customers: {e}"))?,
            ),
            Dist::Uniform => None,
        };
        Ok(Requests {
            run: format!("{:x}", rand::random::<u64>()),
            config,
            zipf,
        })
    }

    fn customer(&self, rng: &mut StdRng) -> String {
        let i = match &self.zipf {
            Some(zipf) => (zipf.sample(rng) as usize).saturating_sub(1),
            None => rng.random_range(0..self.config.customers),
        };
        crate::demo::customer_id(i.min(self.config.customers - 1))
    }

    /// The GraphQL body of request number `n` (`Null` for the bare route's GET).
    fn body(&self, n: u64, rng: &mut StdRng) -> Value {
        match self.config.workload {
            Workload::HttpCeiling => Value::Null,
            Workload::GraphqlCeiling => json!({"query": "{ __typename }"}),
            Workload::Personalize => json!({
                "query": "query($input: PersonalizeInput!) { personalize(input: $input) { id selectedItem { id } } }",
                "variables": {"input": {
                    "customerId": self.customer(rng),
                    "placement": self.config.placement,
                }},
            }),
            Workload::Events | Workload::RestEvents => {
                let events: Vec<Value> = (0..self.config.events_per_request)
                    .map(|i| {
                        json!({
                            "eventId": format!("bench-{}-{n}-{i}", self.run),
                            "customerId": self.customer(rng),
                            "type": "page_view",
                        })
                    })
                    .collect();
                if self.config.workload == Workload::RestEvents {
                    return Value::Array(events);
                }
                json!({
                    "query": "mutation($events: [EventInput!]!) { trackEvents(events: $events) { accepted duplicates rejected { index field message } } }",
                    "variables": {"events": events},
                })
            }
            Workload::Features => json!({
                "query": "query($id: ID!) { features(customerId: $id) { name value } }",
                "variables": {"id": self.customer(rng)},
            }),
        }
    }
}

/// Sends one request and checks its answer.
async fn send(client: &reqwest::Client, config: &BenchConfig, body: &Value) -> Result<(), String> {
    let path = match config.workload {
        Workload::HttpCeiling => return send_healthz(client, config).await,
        Workload::RestEvents => "/api/v1/events",
        _ => "/graphql",
    };
    let mut request = client.post(format!("{}{path}", config.url)).json(body);
    if let Some(key) = &config.key {
        request = request.bearer_auth(key);
    }
    let bytes = successful_body(request).await?;
    let answer: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("a body that is not JSON: {e}"))?;
    if config.workload == Workload::RestEvents {
        return match answer.get("rejected") {
            Some(Value::Array(rejected)) if rejected.is_empty() => Ok(()),
            _ => Err(format!("REST: {answer}")),
        };
    }
    match answer.get("errors") {
        Some(Value::Array(errors)) if !errors.is_empty() => Err(format!("GraphQL: {}", errors[0])),
        _ if answer.get("data").is_none_or(Value::is_null) => Err(format!("no data: {answer}")),
        _ => Ok(()),
    }
}

/// `GET /healthz`, which answers `ok`.
async fn send_healthz(client: &reqwest::Client, config: &BenchConfig) -> Result<(), String> {
    let bytes = successful_body(client.get(format!("{}/healthz", config.url))).await?;
    if &bytes[..] != b"ok" {
        return Err(format!("not ok: {}", excerpt(&bytes)));
    }
    Ok(())
}

/// Sends the request and returns the body of a successful response; otherwise the
/// status and the start of the body, as the error.
async fn successful_body(request: reqwest::RequestBuilder) -> Result<bytes::Bytes, String> {
    let response = request.send().await.map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| format!("body: {e}"))?;
    if !status.is_success() {
        return Err(format!("HTTP {status}: {}", excerpt(&bytes)));
    }
    Ok(bytes)
}

/// The first 200 bytes of a body, as text.
fn excerpt(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
}

/// Runs the load and reports. Fails only on a configuration that cannot run.
pub async fn run(config: BenchConfig) -> anyhow::Result<BenchReport> {
    validate(&config)?;
    let client = reqwest::Client::builder()
        .timeout(config.timeout)
        .pool_max_idle_per_host(config.concurrency)
        .tcp_nodelay(true)
        .build()?;
    let requests = Arc::new(Requests::new(config.clone())?);
    let tally = Arc::new(parking_lot::Mutex::new(Tally::new()));
    let started = Instant::now();
    if config.rate > 0.0 {
        open_loop(&client, &requests, &tally).await;
    } else {
        closed_loop(&client, &requests, &tally).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tally = Arc::try_unwrap(tally)
        .map_err(|_| anyhow::anyhow!("a request outlived the run"))?
        .into_inner();
    let ms = |q: f64| tally.latency.value_at_quantile(q) as f64 / 1000.0;
    let achieved = tally.requests as f64 / elapsed;
    Ok(BenchReport {
        workload: config.workload,
        mode: if config.rate > 0.0 { "open" } else { "closed" },
        dist: config.dist,
        concurrency: config.concurrency,
        duration_s: elapsed,
        offered_rps: (config.rate > 0.0).then_some(config.rate),
        achieved_rps: achieved,
        requests: tally.requests,
        errors: tally.errors,
        events_per_s: config.workload.sends_events().then(|| {
            (tally.requests - tally.errors) as f64 * config.events_per_request as f64 / elapsed
        }),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: tally.latency.max() as f64 / 1000.0,
        error_samples: tally.samples,
    })
}

fn validate(config: &BenchConfig) -> anyhow::Result<()> {
    if !config.url.starts_with("http://") {
        anyhow::bail!(
            "url: must start with http:// (plain HTTP), got '{}'",
            config.url
        );
    }
    if !config.rate.is_finite() || config.rate < 0.0 {
        anyhow::bail!("rate: must be a number ≥ 0 (0: closed loop)");
    }
    if config.duration.is_zero() {
        anyhow::bail!("duration: must be more than 0");
    }
    if config.concurrency == 0 {
        anyhow::bail!("concurrency: must be at least 1");
    }
    if config.customers == 0 {
        anyhow::bail!("customers: must be at least 1");
    }
    if config.workload.sends_events() && config.events_per_request == 0 {
        anyhow::bail!("events-per-request: must be at least 1");
    }
    Ok(())
}

/// Request `i` is due at `start + i / rate`; its latency counts from then.
async fn open_loop(
    client: &reqwest::Client,
    requests: &Arc<Requests>,
    tally: &Arc<parking_lot::Mutex<Tally>>,
) {
    let config = &requests.config;
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let total = (config.rate * config.duration.as_secs_f64())
        .round()
        .max(1.0) as u64;
    let start = tokio::time::Instant::now();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / config.rate);
        tokio::time::sleep_until(due).await;
        let body = requests.body(n, &mut rng);
        let (client, requests, tally, slots) = (
            client.clone(),
            requests.clone(),
            tally.clone(),
            slots.clone(),
        );
        tasks.spawn(async move {
            let _slot = slots.acquire_owned().await.expect("never closed");
            let outcome = send(&client, &requests.config, &body).await;
            tally.lock().record(due.elapsed(), outcome);
        });
        // Reap finished tasks as we go, so a long run does not hold them all.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// `concurrency` workers, each sending its next request when the last is answered.
async fn closed_loop(
    client: &reqwest::Client,
    requests: &Arc<Requests>,
    tally: &Arc<parking_lot::Mutex<Tally>>,
) {
    let config = &requests.config;
    let deadline = Instant::now() + config.duration;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..config.concurrency as u64 {
        let (client, requests, tally) = (client.clone(), requests.clone(), tally.clone());
        workers.spawn(async move {
            let mut rng = StdRng::seed_from_u64(
                requests.config.seed ^ (worker + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let mut n = worker << 40;
            while Instant::now() < deadline {
                let body = requests.body(n, &mut rng);
                n += 1;
                let sent = Instant::now();
                let outcome = send(&client, &requests.config, &body).await;
                tally.lock().record(sent.elapsed(), outcome);
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(workload: Workload, dist: Dist) -> BenchConfig {
        BenchConfig {
            url: "http://127.0.0.1:1".into(),
            workload,
            rate: 100.0,
            duration: Duration::from_secs(1),
            concurrency: 4,
            dist,
            customers: 1000,
            placement: "homepage_hero".into(),
            events_per_request: 3,
            key: None,
            seed: 7,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn zipf_draws_favour_the_first_customers_and_stay_in_range() {
        let requests = Requests::new(config(Workload::Features, Dist::Zipf)).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let draws: Vec<String> = (0..10_000).map(|_| requests.customer(&mut rng)).collect();
        let first = draws.iter().filter(|c| *c == "cust-00000").count();
        assert!(first > 1000, "the first customer is drawn often: {first}");
        assert!(draws.iter().all(|c| c.as_str() <= "cust-00999"));
        let uniform = Requests::new(config(Workload::Features, Dist::Uniform)).unwrap();
        let draws: Vec<String> = (0..10_000).map(|_| uniform.customer(&mut rng)).collect();
        let first = draws.iter().filter(|c| *c == "cust-00000").count();
        assert!(first < 40, "uniform: about 10 of 10,000: {first}");
    }

    #[test]
    fn event_requests_carry_unique_ids_per_run_and_request() {
        let requests = Requests::new(config(Workload::Events, Dist::Uniform)).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let a = requests.body(0, &mut rng);
        let b = requests.body(1, &mut rng);
        let ids: Vec<&str> = [&a, &b]
            .iter()
            .flat_map(|body| body["variables"]["events"].as_array().unwrap())
            .map(|e| e["eventId"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 6);
        let unique: std::collections::BTreeSet<&&str> = ids.iter().collect();
        assert_eq!(unique.len(), 6);
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        type Tweak = fn(&mut BenchConfig);
        let cases: [(Tweak, &str); 4] = [
            (|c| c.url = "localhost:8080".into(), "url"),
            (|c| c.rate = -1.0, "rate"),
            (|c| c.concurrency = 0, "concurrency"),
            (|c| c.customers = 0, "customers"),
        ];
        for (tweak, field) in cases {
            let mut c = config(Workload::Personalize, Dist::Zipf);
            tweak(&mut c);
            let err = validate(&c).unwrap_err().to_string();
            assert!(err.starts_with(field), "{err}");
        }
    }
}
