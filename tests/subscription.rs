//! Subscriptions over a real WebSocket (`graphql-transport-ws`) against a served app,
//! with the key in the `connection_init` payload: internal (or admin) keys subscribe,
//! other roles are refused per subscription, a missing or bad key refuses the connection.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tailor::app::{serve, Engine};
use tailor::auth::Role;
use tailor::config::Settings;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Served {
    engine: Arc<Engine>,
    addr: std::net::SocketAddr,
    /// Sent with the HTTP requests.
    admin_key: String,
    /// Sent in `connection_init`.
    internal_key: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Served {
    start_with(|_| {}).await
}

async fn start_with(tweak: impl FnOnce(&mut Settings)) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    settings.rules.dir = String::new();
    tweak(&mut settings);
    let engine = Engine::open(settings).await.unwrap();
    let key = |role| {
        let engine = engine.clone();
        async move {
            let issued = engine.keys.create(role, None, "name").await.unwrap();
            issued.key.expose().to_owned()
        }
    };
    let admin_key = key(Role::Admin).await;
    let internal_key = key(Role::Internal).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(engine.clone(), listener, async move {
        let _ = stopped.await;
    }));
    Served {
        engine,
        addr,
        admin_key,
        internal_key,
        _dir: dir,
        _stop: stop,
    }
}

async fn connect(s: &Served, path: &str) -> Socket {
    let mut ws = open_socket(
        s,
        path,
        json!({"Authorization": format!("Bearer {}", s.internal_key)}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    ws
}

/// Opens a socket and sends `connection_init` with `payload`, without waiting for the
/// answer.
async fn open_socket(s: &Served, path: &str, payload: Value) -> Socket {
    let addr = s.addr;
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket connects");
    ws.send(Message::text(
        json!({"type": "connection_init", "payload": payload}).to_string(),
    ))
    .await
    .unwrap();
    ws
}

async fn subscribe(ws: &mut Socket, id: &str, query: &str) {
    ws.send(Message::text(
        json!({"id": id, "type": "subscribe", "payload": {"query": query}}).to_string(),
    ))
    .await
    .unwrap();
}

async fn next_json(ws: &mut Socket) -> Value {
    let deadline = Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout(deadline, ws.next())
            .await
            .expect("a message within 10 s")
            .expect("stream open")
            .expect("valid frame");
        if let Message::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["type"] != "ping" && v["type"] != "pong" {
                return v;
            }
        }
    }
}

async fn post_graphql(s: &Served, query: &str) -> Value {
    reqwest::Client::new()
        .post(format!("http://{}/graphql", s.addr))
        .bearer_auth(&s.admin_key)
        .json(&json!({"query": query}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_and_segment_changes_stream_over_websocket() {
    let s = start().await;
    post_graphql(&s, "mutation { upsertContent(input: {id: \"x\", type: \"banner\", placements: [\"hero\"]}) { id } }").await;
    post_graphql(&s, "mutation { defineSegment(name: \"viewers\", condition: {event: \"page_view\", within: \"1d\"}) { joined } }").await;

    let mut ws = connect(&s, "/graphql").await;
    subscribe(&mut ws, "1", "subscription { decisions(placement: \"hero\") { id customerId selectedItem { id } propensity } }").await;
    subscribe(
        &mut ws,
        "2",
        "subscription { segmentChanges(segment: \"viewers\") { segment customerId joined } }",
    )
    .await;
    // Let both subscriptions register before producing.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let d = post_graphql(
        &s,
        "{ personalize(input: {customerId: \"c1\", placement: \"hero\"}) { id } }",
    )
    .await;
    let decision_id = d["data"]["personalize"]["id"]
        .as_str()
        .expect("decision id")
        .to_owned();
    post_graphql(&s, "mutation { trackEvents(events: [{customerId: \"c1\", type: \"page_view\"}]) { accepted } }").await;

    let mut seen_decision = false;
    let mut seen_join = false;
    while !(seen_decision && seen_join) {
        let msg = next_json(&mut ws).await;
        assert_eq!(msg["type"], "next", "{msg}");
        match msg["id"].as_str() {
            Some("1") => {
                assert_eq!(
                    msg["payload"]["data"]["decisions"]["id"],
                    decision_id.as_str()
                );
                assert_eq!(
                    msg["payload"]["data"]["decisions"]["selectedItem"]["id"],
                    "x"
                );
                seen_decision = true;
            }
            Some("2") => {
                assert_eq!(
                    msg["payload"]["data"]["segmentChanges"],
                    json!({"segment": "viewers", "customerId": "c1", "joined": true})
                );
                seen_join = true;
            }
            other => panic!("unexpected id {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_never_blocks_decisions() {
    let s = start().await;
    post_graphql(&s, "mutation { upsertContent(input: {id: \"x\", type: \"banner\", placements: [\"hero\"]}) { id } }").await;
    // Subscribes on the dedicated path, then never reads again.
    let mut stuck = connect(&s, "/graphql/ws").await;
    subscribe(&mut stuck, "1", "subscription { decisions { id reasoning explanation selectedItem { id title attributes } } }").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // More decisions than the stream holds: each still completes.
    let total = 5_000;
    let engine = s.engine.clone();
    let made = tokio::time::timeout(Duration::from_secs(120), async move {
        futures::stream::iter(0..total)
            .map(|i| {
                let engine = engine.clone();
                async move {
                    let req = tailor::decision::pipeline::PersonalizeRequest {
                        customer_id: tailor::customers::CustomerId::parse(
                            "c",
                            &format!("c{}", i % 50),
                        )
                        .unwrap(),
                        placement: Some("hero".into()),
                        available_items: None,
                        content_type: None,
                        context: Value::Null,
                        count: 1,
                        explain: true,
                    };
                    engine
                        .decisions
                        .personalize(req)
                        .await
                        .expect("decision succeeds");
                }
            })
            .buffer_unordered(32)
            .count()
            .await
    })
    .await
    .expect("decisions are not held up by the stuck subscriber");
    assert_eq!(made, total);
    // And a fresh subscriber still gets new decisions.
    let mut fresh = connect(&s, "/graphql").await;
    subscribe(&mut fresh, "1", "subscription { decisions { id } }").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let d = post_graphql(
        &s,
        "{ personalize(input: {customerId: \"c1\", placement: \"hero\"}) { id } }",
    )
    .await;
    let msg = next_json(&mut fresh).await;
    assert_eq!(
        msg["payload"]["data"]["decisions"]["id"],
        d["data"]["personalize"]["id"]
    );
    drop(stuck);
}

/// What the next message on `ws` is: the text of a close frame, or a JSON message.
async fn next_message(ws: &mut Socket) -> Result<Value, String> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s");
        match msg {
            Some(Ok(Message::Text(text))) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["type"] != "ping" && v["type"] != "pong" {
                    return Ok(v);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map(|f| f.reason.to_string()).unwrap_or_default())
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err(String::new()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_need_a_key_of_an_allowed_role() {
    let s = start().await;
    for payload in [
        json!({}),
        json!({"Authorization": format!("Bearer tk_0123456789abcdef_{}", "0".repeat(64))}),
        json!({"Authorization": format!("Bearer {}x", s.internal_key)}),
    ] {
        let mut ws = open_socket(&s, "/graphql", payload.clone()).await;
        let refused = next_message(&mut ws).await;
        let reason = refused.expect_err("the connection is refused");
        assert!(reason.starts_with("authorization: "), "{payload}: {reason}");
    }

    let frontend = s
        .engine
        .keys
        .create(Role::Frontend, None, "name")
        .await
        .unwrap();
    let mut ws = open_socket(
        &s,
        "/graphql/ws",
        json!({"Authorization": format!("Bearer {}", frontend.key.expose())}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    subscribe(&mut ws, "1", "subscription { segmentChanges { segment } }").await;
    let msg = next_json(&mut ws).await;
    assert_eq!(msg["id"], "1", "{msg}");
    assert_eq!(
        msg["payload"]["errors"][0]["extensions"]["code"], "FORBIDDEN",
        "{msg}"
    );
    assert!(msg["payload"]["data"].is_null(), "{msg}");

    // The admin key subscribes too.
    let mut ws = open_socket(
        &s,
        "/graphql",
        json!({"Authorization": format!("Bearer {}", s.admin_key)}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
    subscribe(
        &mut ws,
        "1",
        "subscription { segmentChanges { segment customerId } }",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    post_graphql(&s, "mutation { defineSegment(name: \"all\", condition: {trait: \"plan\", op: \"exists\"}) { joined } }").await;
    post_graphql(
        &s,
        "mutation { upsertCustomer(input: {id: \"c9\", traits: {plan: \"pro\"}}) { id } }",
    )
    .await;
    let msg = next_json(&mut ws).await;
    assert_eq!(
        msg["payload"]["data"]["segmentChanges"]["customerId"], "c9",
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_counts_against_the_key_rate_limit() {
    let s = start_with(|settings| {
        settings.limits.rate_per_key_per_second = 1;
        settings.limits.rate_burst = 1;
    })
    .await;
    let _first = connect(&s, "/graphql").await;
    let payload = json!({"Authorization": format!("Bearer {}", s.internal_key)});
    let mut ws = open_socket(&s, "/graphql", payload).await;
    let reason = next_message(&mut ws)
        .await
        .expect_err("the second connection within a second is refused");
    assert!(
        reason.starts_with("rate limit of this key reached"),
        "{reason}"
    );
}
