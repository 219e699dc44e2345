//! Several servers on one broker (a real Tansu): each folds the topics into its own store.
//! Diffs are written through all of them at random, SSE clients hop to another server on
//! every reconnect (resuming with their last hash), one server is stopped mid-test; at the
//! end every server and every client agree on every model, and no client saw a gap or a
//! repeat.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::prelude::*;
use serde_json::{Value, json};
use statefold::config::{Config, KafkaConfig, Limits};
use statefold_tests::broker::Broker;
use statefold_tests::http::{Follower, SseStream, TestServer, example_config};
use tokio::sync::RwLock;

const SERVERS: usize = 3;
const MODELS: usize = 20;
const CLIENTS: usize = 100;
const DIFFS: usize = 1500;

fn config(dir: &std::path::Path, broker: &Broker) -> Config {
    let limits = Limits { kafka_fetch_wait_ms: 10, kafka_check_interval_ms: 200, ..Limits::default() };
    let mut config = example_config(dir, limits);
    config.kafka = Some(KafkaConfig::new(&broker.brokers()));
    config
}

/// A client of one model: what it holds (checked event by event) and its connections.
#[derive(Debug, Default)]
struct Client {
    chain: Follower,
    hops: usize,
}

/// The servers still up (indexes into `servers`).
type Up = Arc<RwLock<Vec<usize>>>;

async fn connect(server: &TestServer, model: &str, since: Option<&str>) -> Option<SseStream> {
    let mut request = server.client.get(server.url(&format!("/v1/models/counter/{model}/events")));
    if let Some(since) = since {
        request = request.header("Last-Event-ID", since);
    }
    let response = request.send().await.ok()?;
    (response.status() == 200).then(|| SseStream::new(response))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hopping_clients_and_a_stopped_server_agree_on_every_model() {
    let broker = Broker::start();
    broker.create_topic("counter", 3);
    for topic in ["document", "workflow", "trap"] {
        broker.create_topic(topic, 1);
    }
    let mut servers = Vec::new();
    for _ in 0..SERVERS {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), &broker);
        servers.push(Arc::new(TestServer::start_config(dir, config).await));
    }
    let servers: Arc<Vec<Arc<TestServer>>> = Arc::new(servers);
    let up: Up = Arc::new(RwLock::new((0..SERVERS).collect()));
    let mut rng = StdRng::seed_from_u64(11);

    // Models created through one server are followed on another at once: it waits for them.
    for i in 0..MODELS {
        let (status, body) = servers[i % SERVERS].post("/v1/models/counter", format!(r#"{{"id":"m{i}"}}"#)).await;
        assert_eq!(status, 201, "{body}");
    }

    // 100 clients, 5 per model, each hopping to a random server after a few events.
    let done = Arc::new(AtomicBool::new(false));
    let final_heads: Arc<RwLock<BTreeMap<String, String>>> = Arc::new(RwLock::new(BTreeMap::new()));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (servers, up, done, final_heads) = (servers.clone(), up.clone(), done.clone(), final_heads.clone());
        let model = format!("m{}", c % MODELS);
        let mut rng = StdRng::seed_from_u64(c as u64);
        clients.push(tokio::spawn(async move {
            let who = format!("client {c} ({model})");
            let mut client = Client::default();
            loop {
                let target = {
                    let up = up.read().await;
                    up[rng.random_range(0..up.len())]
                };
                let Some(mut stream) = connect(&servers[target], &model, client.chain.hash.as_deref()).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue; // that server just went down: another one
                };
                client.hops += 1;
                let budget = rng.random_range(3..12);
                let mut seen = 0;
                while seen < budget {
                    let event = match tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
                        Ok(Some(event)) => event,
                        Ok(None) => break, // the server stopped
                        Err(_) => break,   // quiet: hop anyway
                    };
                    client.chain.see(&who, &event);
                    seen += 1;
                }
                if done.load(Ordering::Relaxed) {
                    let head = final_heads.read().await.get(&model).cloned();
                    if head.is_some() && head == client.chain.hash {
                        return client;
                    }
                }
            }
        }));
    }

    // Writers: diffs through random servers that are up; one server stops half way.
    let mut sent: BTreeMap<String, i64> = BTreeMap::new();
    let started = Instant::now();
    for n in 0..DIFFS {
        if n == DIFFS / 2 {
            let stopped = SERVERS - 1;
            up.write().await.retain(|&s| s != stopped);
            servers[stopped].running.as_ref().unwrap().app.status.stop.cancel();
        }
        let target = {
            let up = up.read().await;
            up[rng.random_range(0..up.len())]
        };
        let model = format!("m{}", rng.random_range(0..MODELS));
        let add = rng.random_range(1..10);
        let (status, body) =
            servers[target].post(&format!("/v1/models/counter/{model}/diffs"), json!({"add": add}).to_string()).await;
        assert_eq!(status, 202, "{body}");
        *sent.entry(model).or_default() += add;
        if n % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await; // about 500 diffs/s
        }
    }
    eprintln!("{DIFFS} diffs written in {:?}", started.elapsed());

    // The servers still up agree on every model: state, hash, seq.
    let live: Vec<usize> = up.read().await.clone();
    let mut heads = BTreeMap::new();
    for i in 0..MODELS {
        let model = format!("m{i}");
        let expected = sent.get(&model).copied().unwrap_or(0);
        let mut seen: Vec<Value> = Vec::new();
        for &s in &live {
            let deadline = Instant::now() + Duration::from_secs(30);
            let body = loop {
                let (_, body) = servers[s].get(&format!("/v1/models/counter/{model}")).await;
                if body["state"] == json!(expected) {
                    break body;
                }
                assert!(Instant::now() < deadline, "server {s}, {model}: {body}, expected {expected}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            seen.push(json!([body["hash"], body["seq"], body["state"]]));
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{model}: servers disagree: {seen:?}");
        heads.insert(model, seen[0][0].as_str().unwrap().to_owned());
    }
    *final_heads.write().await = heads.clone();
    done.store(true, Ordering::Relaxed);

    // Every client ends at its model's head, having hopped between servers.
    let mut hops = 0;
    let mut resets = 0;
    for (c, task) in clients.into_iter().enumerate() {
        let client = tokio::time::timeout(Duration::from_secs(60), task).await.expect("client finished").unwrap();
        assert_eq!(client.chain.hash.as_deref(), Some(heads[&format!("m{}", c % MODELS)].as_str()), "client {c}");
        hops += client.hops;
        resets += client.chain.resets.len();
    }
    eprintln!("{CLIENTS} clients: {hops} connections, {resets} resets");
    assert!(hops >= 3 * CLIENTS, "clients hopped: {hops}");
    assert_eq!(resets, 0, "a hash from one replica always resumes on another");
}

/// A gateway that takes writes and a read-only stream server: writes through the gateway
/// are read on the other, which can wait for a given record (`?folded=P:O`); writes to the
/// read-only server are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replica_serves_what_the_gateway_wrote() {
    let broker = Broker::start();
    broker.create_topic("counter", 3);
    for topic in ["document", "workflow", "trap"] {
        broker.create_topic(topic, 1);
    }
    let dir = tempfile::tempdir().unwrap();
    let gateway_config = config(dir.path(), &broker);
    let gateway = TestServer::start_config(dir, gateway_config).await;
    let dir = tempfile::tempdir().unwrap();
    let mut reader_config = config(dir.path(), &broker);
    reader_config.read_only = true;
    let reader = TestServer::start_config(dir, reader_config).await;

    gateway.create("counter", "g").await;
    let mut last = Value::Null;
    for add in 1..=20 {
        let (status, body) = gateway.post("/v1/models/counter/g/diffs", json!({"add": add}).to_string()).await;
        assert_eq!(status, 202, "{body}");
        last = body;
    }
    // Without waiting, the reader may not have it yet; with `folded`, it has.
    let position = format!("{}:{}", last["partition"], last["offset"]);
    let (status, body) = reader.get(&format!("/v1/models/counter/g?folded={position}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["state"].clone(), body["seq"].as_u64()), (json!(210), Some(20)), "{body}");
    // (The appends were not waited for: the gateway too may still be folding them.)
    let (_, on_gateway) = gateway.get(&format!("/v1/models/counter/g?folded={position}")).await;
    assert_eq!(body["hash"], on_gateway["hash"], "both replicas reach the same hash");
    let (status, body) = reader.get("/v1/models/counter/g?folded=nonsense").await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_query")), "{body}");

    // Every write to the read-only server: 403 read_only, nothing produced.
    let put = reader.client.put(reader.url("/v1/reducers/statefold_reducer_counter")).body(vec![0u8; 8]);
    let writes = [
        reader.post("/v1/models/counter", r#"{"id":"r"}"#).await,
        reader.post("/v1/models/counter/g/diffs", r#"{"add":1}"#).await,
        reader.post("/v1/kinds/counter/replay", "").await,
        statefold_tests::http::json_of(put.send().await.unwrap()).await,
    ];
    for (status, body) in writes {
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("read_only")), "{body}");
    }
    let (_, body) = gateway.get("/v1/models/counter/g").await;
    assert_eq!(body["seq"], 20, "nothing was written through the read-only server");
    // Its stream works: a snapshot at the head.
    let mut events = reader.events("counter", "g", None).await;
    let snapshot = loop {
        let event = events.next_within(Duration::from_secs(5)).await.unwrap();
        if event.event == "snapshot" {
            break event.json();
        }
    };
    assert_eq!(snapshot["state"], json!(210));
}
