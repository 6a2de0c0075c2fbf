//! Shared helpers for the behaviour tests: an engine on a fresh data directory, the
//! schema executed in-process, and the HTTP app.
//!
//! Authentication is on, as by default: the app creates an admin key through the engine's
//! key service and sends it with every request unless a test sends another (`exec_as`);
//! a test that needs authentication off says so with `settings.auth.enabled = false`.
#![allow(dead_code)]

use std::sync::Arc;

use serde_json::{json, Value};
use tailor::api::graphql::{schema, TailorSchema};
use tailor::app::Engine;
use tailor::auth::Role;
use tailor::config::Settings;

pub struct TestApp {
    pub engine: Arc<Engine>,
    pub schema: TailorSchema,
    pub dir: tempfile::TempDir,
    /// An admin key, sent by default (`None` while authentication is off).
    pub admin_key: Option<String>,
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
        let admin_key = if engine.settings.auth.enabled {
            Some(create_key(&engine, Role::Admin).await)
        } else {
            None
        };
        TestApp {
            schema: schema(engine.clone()),
            engine,
            dir,
            admin_key,
            stop,
        }
    }

    /// A new key for `role`.
    pub async fn key(&self, role: Role) -> String {
        create_key(&self.engine, role).await
    }

    /// `Authorization` header value of the admin key (empty while authentication is off).
    pub fn admin_bearer(&self) -> String {
        self.admin_key
            .as_ref()
            .map(|k| format!("Bearer {k}"))
            .unwrap_or_default()
    }

    /// Executes a GraphQL request as the holder of `key` (`None`: no key at all) and
    /// returns the whole response.
    pub async fn exec_as(&self, key: Option<&str>, query: &str, variables: Value) -> Value {
        let mut request = async_graphql::Request::new(query)
            .variables(async_graphql::Variables::from_json(variables));
        if self.engine.settings.auth.enabled {
            let header = key.map(|k| format!("Bearer {k}"));
            request = request.data(self.engine.keys.caller(header.as_deref()).await);
        }
        let resp = self.schema.execute(request).await;
        serde_json::to_value(&resp).expect("response serialises")
    }

    /// Executes a GraphQL request and returns `data`, failing on any error.
    pub async fn gql(&self, query: &str, variables: Value) -> Value {
        let resp = self.exec(query, variables).await;
        assert!(resp["errors"].is_null(), "unexpected errors: {resp:#}");
        resp["data"].clone()
    }

    /// Executes a GraphQL request and returns the whole response (`data`, `errors`).
    pub async fn exec(&self, query: &str, variables: Value) -> Value {
        self.exec_as(self.admin_key.as_deref(), query, variables)
            .await
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

/// A new key for `role` from the engine's key service.
pub async fn create_key(engine: &Engine, role: Role) -> String {
    engine
        .keys
        .create(role, Some(format!("test {role}")), "name")
        .await
        .expect("key created")
        .key
        .expose()
        .to_owned()
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

/// A port nothing listens on now (for a server a test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
