//! Shared helpers for the behaviour tests: an engine on a fresh data directory, the
//! schema executed in-process, and the HTTP app.
#![allow(dead_code)]

use std::sync::Arc;

use serde_json::{json, Value};
use tailor::api::graphql::{schema, TailorSchema};
use tailor::app::Engine;
use tailor::config::Settings;

pub struct TestApp {
    pub engine: Arc<Engine>,
    pub schema: TailorSchema,
    pub dir: tempfile::TempDir,
    stop: tokio::sync::watch::Sender<bool>,
}

impl TestApp {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(tweak: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = Settings {
            data_dir: dir.path().to_path_buf(),
            ..Settings::default()
        };
        // Tests own their rules: none from the repository's rules/ unless they ask.
        settings.rules.dir = String::new();
        settings.rules.plugins_dir = String::new();
        tweak(&mut settings);
        let engine = Engine::open(settings).await.expect("engine opens");
        let (stop, rx) = tokio::sync::watch::channel(false);
        engine.spawn_background(rx);
        TestApp {
            schema: schema(engine.clone()),
            engine,
            dir,
            stop,
        }
    }

    /// Executes a GraphQL request and returns `data`, failing on any error.
    pub async fn gql(&self, query: &str, variables: Value) -> Value {
        let resp = self.exec(query, variables).await;
        assert!(resp["errors"].is_null(), "unexpected errors: {resp:#}");
        resp["data"].clone()
    }

    /// Executes a GraphQL request and returns the whole response (`data`, `errors`).
    pub async fn exec(&self, query: &str, variables: Value) -> Value {
        let request = async_graphql::Request::new(query)
            .variables(async_graphql::Variables::from_json(variables));
        let resp = self.schema.execute(request).await;
        serde_json::to_value(&resp).expect("response serialises")
    }

    pub async fn upsert_content(
        &self,
        id: &str,
        placement: &str,
        priority: i32,
        segments: &[&str],
    ) {
        self.gql(
            "mutation($i: ContentItemInput!) { upsertContent(input: $i) { id } }",
            json!({"i": {"id": id, "type": "banner", "title": id, "placements": [placement],
                         "tags": ["t"], "segments": segments, "priority": priority}}),
        )
        .await;
    }

    pub async fn track(&self, events: Value) -> Value {
        self.gql(
            "mutation($e: [EventInput!]!) { trackEvents(events: $e) { accepted duplicates rejected { index field message } } }",
            json!({"e": events}),
        )
        .await["trackEvents"]
            .clone()
    }

    pub async fn feature(&self, customer: &str, name: &str) -> f64 {
        let data = self
            .gql(
                "query($c: ID!, $n: [String!]) { features(customerId: $c, names: $n) { name value version } }",
                json!({"c": customer, "n": [name]}),
            )
            .await;
        data["features"][0]["value"].as_f64().expect("a number")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The first error's `extensions.code` and message.
pub fn first_error(resp: &Value) -> (String, String) {
    let e = &resp["errors"][0];
    (
        e["extensions"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        e["message"].as_str().unwrap_or_default().to_owned(),
    )
}
