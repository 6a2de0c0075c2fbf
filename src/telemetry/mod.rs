//! Telemetry: OpenTelemetry instruments exported as Prometheus text, and the tracing
//! subscriber.
//!
//! Metric names are constants and label values come from bounded sets (placements and
//! policies that operators configure, fixed result names), never from customer input.

use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, TextEncoder};

use crate::storage::health::BackendHealth;

/// Latency buckets in milliseconds, from 50 µs to 10 s.
const LATENCY_MS_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
    10000.0,
];

const VALUE_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0,
];

/// Every instrument the engine records, on its own provider and registry so that several
/// engines (tests) never share counters.
pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    pub decision_latency_ms: Histogram<f64>,
    /// Per stage of a decision (`stage` label: see [`StageClock`]).
    pub stage_latency_ms: Histogram<f64>,
    pub decisions: Counter<u64>,
    pub degraded_decisions: Counter<u64>,
    pub conversions: Counter<u64>,
    pub conversion_value: Histogram<f64>,
    pub events_ingested: Counter<u64>,
    /// Writes for erased customers refused (`kind`: event, profile).
    pub erased_writes_suppressed: Counter<u64>,
    /// Privacy journal entries this process applied to its stores (`change`: erased,
    /// consented).
    pub privacy_journal_applied: Counter<u64>,
    /// Events not used because their customer has no analytics consent (`stage`:
    /// `ingest`, dropped before storing; `apply`, stored but skipped by the processor).
    pub events_without_consent: Counter<u64>,
    pub feature_read_latency_ms: Histogram<f64>,
    pub feature_compute_errors: Counter<u64>,
    pub feature_rollbacks: Counter<u64>,
    pub segment_changes: Counter<u64>,
    pub segment_predicate_errors: Counter<u64>,
    pub backend_errors: Counter<u64>,
    /// Messages on the event stream that did not decode as an event (skipped).
    pub malformed_messages: Counter<u64>,
    /// Events a worker consumed from the stream and applied, by partition.
    pub stream_events_applied: Counter<u64>,
    /// Copies of events another worker read first, dropped.
    pub stream_copies_dropped: Counter<u64>,
    /// Sealed records of erased customers on the event stream (skipped: their key is
    /// destroyed).
    pub stream_records_shredded: Counter<u64>,
    pub rule_errors: Counter<u64>,
}

impl Metrics {
    pub fn new() -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_counter_suffixes()
            .without_target_info()
            .scope_info_enabled(false)
            .without_units()
            .build()?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("tailor");
        let ms_histogram = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_description(description)
                .with_boundaries(LATENCY_MS_BUCKETS.to_vec())
                .build()
        };
        let counter = |name: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_description(description)
                .build()
        };
        Ok(Metrics {
            decision_latency_ms: ms_histogram(
                "personalization_decision_latency_ms",
                "Time to make one personalize decision, in milliseconds",
            ),
            stage_latency_ms: ms_histogram(
                "tailor_decision_stage_latency_ms",
                "Time spent in one stage of a personalize decision (candidates, context, experiments, rules, model, policy, record), in milliseconds",
            ),
            decisions: counter(
                "personalization_decisions_total",
                "Decisions made, by placement and policy",
            ),
            degraded_decisions: counter(
                "tailor_degraded_decisions_total",
                "Decisions made with defaults (features, segments or bandit statistics) or the local copy of the catalog because a backend was slow or down",
            ),
            conversions: counter(
                "personalization_conversions_total",
                "Outcomes recorded with a positive reward, by conversion type",
            ),
            conversion_value: meter
                .f64_histogram("personalization_conversion_value")
                .with_description("Value of recorded conversions")
                .with_boundaries(VALUE_BUCKETS.to_vec())
                .build(),
            events_ingested: counter(
                "tailor_events_ingested_total",
                "Events received, by result (accepted, duplicate, rejected, without_consent)",
            ),
            events_without_consent: counter(
                "tailor_events_without_consent_total",
                "Events not used because their customer has no analytics consent, by stage (ingest, apply)",
            ),
            erased_writes_suppressed: counter(
                "tailor_erased_writes_suppressed_total",
                "Events and profile updates refused because their customer was erased, by kind",
            ),
            privacy_journal_applied: counter(
                "tailor_privacy_journal_applied_total",
                "Erasures and renewed consents of the deployment applied to this process's stores, by change",
            ),
            feature_read_latency_ms: ms_histogram(
                "tailor_feature_read_latency_ms",
                "Time to read one customer's features, in milliseconds",
            ),
            feature_compute_errors: counter(
                "tailor_feature_compute_errors_total",
                "Feature values that did not compute (NaN, infinite, or a failed expression) and read as the default",
            ),
            feature_rollbacks: counter(
                "tailor_feature_rollbacks_total",
                "Feature versions rolled back automatically after failed health checks",
            ),
            segment_changes: counter(
                "tailor_segment_changes_total",
                "Segment joins and leaves, by change",
            ),
            segment_predicate_errors: counter(
                "tailor_segment_predicate_errors_total",
                "Rhai segment predicates that failed for a customer (error, non-boolean result, budget spent), counted as not a member",
            ),
            backend_errors: counter(
                "tailor_backend_errors_total",
                "Storage backend failures, by capability",
            ),
            malformed_messages: counter(
                "tailor_stream_malformed_messages_total",
                "Messages on the event stream that did not decode as an event and were skipped",
            ),
            stream_events_applied: counter(
                "tailor_stream_events_applied_total",
                "Events this worker consumed from the event stream and applied, by partition \
                 (a redelivered event counts again)",
            ),
            stream_copies_dropped: counter(
                "tailor_stream_copies_dropped_total",
                "Second copies of events (sent again through another replica, or by an \
                 outbox) dropped because another worker read the event first",
            ),
            stream_records_shredded: counter(
                "tailor_stream_records_shredded_total",
                "Sealed records on the event stream whose customer was erased (their key is \
                 destroyed), skipped",
            ),
            rule_errors: counter(
                "tailor_rule_errors_total",
                "Rules skipped because they failed or ran out of budget, or did not load, by rule",
            ),
            registry,
            provider,
        })
    }

    /// The Prometheus text exposition of every instrument.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::warn!(error = %e, "Failed to encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Starts timing the stages of one decision.
    pub fn stages(&self) -> StageClock<'_> {
        StageClock {
            metrics: self,
            last: std::time::Instant::now(),
        }
    }

    /// Exports the health of each scaled-out backend, read at every scrape:
    /// `tailor_backend_breaker_open` (1 while its circuit breaker refuses calls),
    /// `tailor_backend_calls_total{result="ok"|"failed"}` (calls that tried the network)
    /// and `tailor_backend_short_circuited_total` (calls refused without it), each
    /// labelled by `backend` and the capabilities it `serves`.
    pub fn observe_backends(&self, backends: &[BackendHealth]) {
        if backends.is_empty() {
            return;
        }
        let meter = self.provider.meter("tailor");
        let labelled = |b: &BackendHealth| {
            (
                b.breaker.clone(),
                vec![
                    KeyValue::new("backend", b.backend),
                    KeyValue::new("serves", b.serves.clone()),
                ],
            )
        };
        let all: Vec<_> = backends.iter().map(labelled).collect();
        let open = all.clone();
        meter
            .u64_observable_gauge("tailor_backend_breaker_open")
            .with_description(
                "1 while a backend's circuit breaker refuses calls after repeated failures, else 0",
            )
            .with_callback(move |observer| {
                for (stats, attrs) in &open {
                    observer.observe(u64::from(stats.is_open()), attrs);
                }
            })
            .build();
        let calls = all.clone();
        meter
            .u64_observable_counter("tailor_backend_calls_total")
            .with_description(
                "Calls that tried a backend over the network, by result (ok: it answered; failed: unreachable or past the deadline)",
            )
            .with_callback(move |observer| {
                for (stats, attrs) in &calls {
                    for (result, count) in [("ok", stats.calls_ok()), ("failed", stats.calls_failed())] {
                        let mut attrs = attrs.clone();
                        attrs.push(KeyValue::new("result", result));
                        observer.observe(count, &attrs);
                    }
                }
            })
            .build();
        meter
            .u64_observable_counter("tailor_backend_short_circuited_total")
            .with_description(
                "Calls to a backend refused at once because its circuit breaker was open",
            )
            .with_callback(move |observer| {
                for (stats, attrs) in &all {
                    observer.observe(stats.short_circuited(), attrs);
                }
            })
            .build();
    }

    pub fn backend_error(&self, capability: &'static str) {
        self.backend_errors
            .add(1, &[KeyValue::new("capability", capability)]);
    }
}

impl Metrics {
    pub fn rule_error(&self, rule: &str) {
        self.rule_errors
            .add(1, &[KeyValue::new("rule", rule.to_owned())]);
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Installs the global tracing subscriber: `RUST_LOG` filter, human-readable lines.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

/// Times consecutive stages of one decision into `tailor_decision_stage_latency_ms`.
pub struct StageClock<'a> {
    metrics: &'a Metrics,
    last: std::time::Instant,
}

impl StageClock<'_> {
    /// Records the time since the previous lap (or the start) as `stage`.
    pub fn lap(&mut self, stage: &'static str) {
        let now = std::time::Instant::now();
        let ms = now.duration_since(self.last).as_secs_f64() * 1000.0;
        self.metrics
            .stage_latency_ms
            .record(ms, &[KeyValue::new("stage", stage)]);
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_metric_names_are_exported() {
        let m = Metrics::new().unwrap();
        let attrs = [KeyValue::new("placement", "homepage_hero")];
        m.decision_latency_ms.record(1.5, &attrs);
        m.decisions.add(1, &attrs);
        m.conversions
            .add(1, &[KeyValue::new("conversion_type", "click")]);
        m.conversion_value.record(12.0, &[]);
        let text = m.render();
        for name in [
            "personalization_decision_latency_ms_bucket",
            "personalization_decisions_total{",
            "personalization_conversions_total{",
            "personalization_conversion_value_sum",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(!text.contains("_total_total"));
    }

    #[test]
    fn backend_health_is_read_at_each_scrape() {
        let m = Metrics::new().unwrap();
        let stats = std::sync::Arc::new(crate::storage::health::BreakerStats::default());
        m.observe_backends(&[BackendHealth {
            backend: "redis",
            serves: "features,bandit".into(),
            breaker: stats.clone(),
        }]);
        let labels = r#"backend="redis",serves="features,bandit""#;
        let text = m.render();
        assert!(
            text.contains(&format!("tailor_backend_breaker_open{{{labels}}} 0")),
            "{text}"
        );
        stats.set_open(true);
        stats.count_short_circuit();
        stats.count_failed();
        let text = m.render();
        for line in [
            format!("tailor_backend_breaker_open{{{labels}}} 1"),
            format!("tailor_backend_short_circuited_total{{{labels}}} 1"),
            // Labels come out in name order.
            r#"tailor_backend_calls_total{backend="redis",result="failed",serves="features,bandit"} 1"#.to_owned(),
            r#"tailor_backend_calls_total{backend="redis",result="ok",serves="features,bandit"} 0"#.to_owned(),
        ] {
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
    }
}
