//! Hot reload against a real server: a new `counter` version deployed (through the reducers
//! directory and through `PUT /v1/reducers/counter`) while 1,000 diffs/s stream in over
//! 1,000 models, with SSE clients following; bad uploads; restart with the store's
//! versions; replay after a behaviour change.
//!
//! `counter` v1 keeps an integer; v2 (`reducers/counter-v2`) keeps `{value, max}` and reads
//! v1 states. The reference fold below applies each stored diff by the version recorded
//! with it, moving a state from v1 to v2 the way v2's `restore` does.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::prelude::*;
use serde_json::{Value, json};
use statefold::chain::Hash;
use statefold::config::{Config, KafkaConfig, KindConfig, Limits};
use statefold::model::ModelKey;
use statefold::model::ModuleHash;
use statefold::store::{Store, StoreOptions};
use statefold_tests::broker::Broker;
use statefold_tests::http::{Follower, SseStream, TestServer};
use tokio::sync::Mutex;

const MODELS: usize = 1000;

/// The load tests run one at a time: each must sustain its 1,000 diffs/s on two cores.
static LOAD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const FOLLOWED: usize = 20;

fn module(name: &str) -> Vec<u8> {
    std::fs::read(statefold_tests::wasm(name)).expect("built reducer")
}

/// A data dir whose `reducers/` holds `counter.wasm` (v1) and `document.wasm`.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let reducers = dir.path().join("reducers");
    std::fs::create_dir(&reducers).unwrap();
    std::fs::write(reducers.join("counter.wasm"), module("counter")).unwrap();
    std::fs::write(reducers.join("document.wasm"), module("document")).unwrap();
    (dir, reducers)
}

fn config(data: &Path, reducers: &Path) -> Config {
    let kind = |name: &str| KindConfig { name: name.into(), reducer: format!("{name}.wasm").into(), topic: None };
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data.to_owned(),
        reducers_dir: reducers.to_owned(),
        kinds: vec![kind("counter"), kind("document")],
        kafka: None,
        read_only: false,
        auth: None,
        cors: None,
        tls: None,
        cluster: None,
        reactions: Default::default(),
        requests: None,
        limits: Limits {
            reducer_watch_interval_ms: 100,
            reducer_resident_models_max: 100,
            // Models left on v1 move in 2-model steps, over many batches, while others move
            // at their next diff.
            deploy_move_models_max: 2,
            // Checkpoints are snapshots of the fold instance's states, so what a move did
            // shows in what is read; none pruned, so every diff can be checked.
            checkpoint_interval_diffs: 2,
            retain_checkpoints: 10_000,
            ..Limits::default()
        },
    }
}

async fn start(dir: tempfile::TempDir, reducers: &Path) -> TestServer {
    let config = config(dir.path(), reducers);
    TestServer::start_config(dir, config).await
}

/// A counter state under either version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counter {
    V1(i64),
    V2 { value: i64, max: i64 },
}

impl Counter {
    fn json(self) -> Value {
        match self {
            Counter::V1(n) => json!(n),
            Counter::V2 { value, max } => json!({"value": value, "max": max}),
        }
    }
}

/// The reference fold: each diff by the version that applied it (v1 or v2), a state moving
/// from v1 to v2 as v2's `restore` reads it.
fn reference(diffs: &[(ModuleHash, i64)], v1: ModuleHash, v2: ModuleHash) -> Counter {
    let mut state = Counter::V1(0);
    for &(by, delta) in diffs {
        state = match (state, by) {
            (Counter::V1(n), by) if by == v1 => Counter::V1(n + delta),
            (Counter::V1(n), by) if by == v2 => {
                let value = n + delta;
                Counter::V2 { value, max: n.max(0).max(value) }
            }
            (Counter::V2 { value, max }, by) if by == v2 => {
                Counter::V2 { value: value + delta, max: max.max(value + delta) }
            }
            other => panic!("unexpected version sequence: {other:?}"),
        };
    }
    state
}

fn delta_of(payload: &[u8]) -> i64 {
    let diff: Value = serde_json::from_slice(payload).unwrap();
    diff.get("add").and_then(Value::as_i64).or_else(|| diff.get("sub").and_then(Value::as_i64).map(|n| -n)).unwrap()
}

/// Follows `id` until the server stops or the test drops the task.
fn follow(mut stream: SseStream, id: String, follower: Arc<Mutex<Follower>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = stream.next().await {
            follower.lock().await.see(&id, &event);
        }
    })
}

/// Sends `rate` diffs per second to random models (fire and forget) until `end` is set
/// and passed; returns each model's sent diffs as (partition, offset, delta).
async fn stream_diffs(
    server: Arc<TestServer>,
    rate: usize,
    end: Arc<std::sync::Mutex<Option<Instant>>>,
) -> BTreeMap<String, Vec<(u32, u64, i64)>> {
    let mut rng = StdRng::seed_from_u64(5);
    let per_tick = rate / 100;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let started = Instant::now();
    // Open loop: each tick's diffs go out on their own task, whatever the latency of the
    // previous ones, so the offered rate holds.
    let mut ticks = Vec::new();
    while end.lock().unwrap().is_none_or(|end| Instant::now() < end) {
        tick.tick().await;
        let batch: Vec<(String, i64)> =
            (0..per_tick).map(|_| (format!("m{}", rng.random_range(0..MODELS)), rng.random_range(-50..100))).collect();
        let server = server.clone();
        ticks.push(tokio::spawn(async move {
            let answers = futures_util::future::join_all(batch.iter().map(|(id, delta)| {
                let body = if *delta < 0 { json!({"sub": -delta}) } else { json!({"add": delta}) };
                let path = format!("/v1/models/counter/{id}/diffs");
                let server = &server;
                async move { server.post(&path, body.to_string()).await }
            }))
            .await;
            batch.into_iter().zip(answers).collect::<Vec<_>>()
        }));
    }
    let offered = started.elapsed();
    let mut sent: BTreeMap<String, Vec<(u32, u64, i64)>> = BTreeMap::new();
    let mut total = 0;
    for tick in ticks {
        for ((id, delta), (status, body)) in tick.await.unwrap() {
            assert_eq!(status, 202, "{body}");
            let partition = body["partition"].as_u64().unwrap() as u32;
            sent.entry(id).or_default().push((partition, body["offset"].as_u64().unwrap(), delta));
            total += 1;
        }
    }
    eprintln!("sent {total} diffs in {offered:?} ({:.0}/s offered)", total as f64 / offered.as_secs_f64());
    sent
}

/// Deploys v2 of `counter` with `deploy` 1.5 s into a stream of 1,000 diffs/s over 1,000
/// models that goes on until 1.5 s after every partition folds v2, and checks everything
/// the issue asks. With a broker, the log is Kafka (`counter` with 3 partitions).
async fn deploy_under_load<F, Fut>(broker: Option<&Broker>, deploy: F)
where
    F: FnOnce(Arc<TestServer>, PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let _alone = LOAD.lock().await;
    let (dir, reducers) = setup();
    let mut config = config(dir.path(), &reducers);
    if let Some(broker) = broker {
        broker.create_topic("counter", 3);
        broker.create_topic("document", 1);
        config.kafka = Some(KafkaConfig::new(&broker.brokers()));
        config.limits.kafka_fetch_wait_ms = 10;
        config.limits.kafka_check_interval_ms = 200;
        // counter_v2.wasm (~210 KB) goes in chunks, as a JavaScript or Python module would.
        config.limits.deploy_record_bytes_max = 64 << 10;
    }
    let fresh_config = config.clone();
    let server = Arc::new(TestServer::start_config(dir, config).await);
    if let Some(broker) = broker {
        forged_deploys_are_refused(broker, &server).await;
    }
    let v1 = ModuleHash::of(&module("counter"));
    let v2 = ModuleHash::of(&module("counter_v2"));
    // Every model exists before the load, and 20 of them have a follower from the start.
    let mut followers = Vec::new();
    let ids: Vec<String> = (0..MODELS).map(|i| format!("m{i}")).collect();
    for chunk in ids.chunks(50) {
        futures_util::future::join_all(chunk.iter().map(|id| server.create("counter", id))).await;
    }
    for i in 0..FOLLOWED {
        let follower = Arc::new(Mutex::new(Follower::default()));
        let stream = server.events("counter", &format!("m{i}"), None).await;
        followers.push((format!("m{i}"), follower.clone(), follow(stream, format!("m{i}"), follower)));
    }

    let end = Arc::new(std::sync::Mutex::new(None));
    let load = tokio::spawn(stream_diffs(server.clone(), 1000, end.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    deploy(server.clone(), reducers.clone()).await;
    // (Through the directory, the deploy happens after this returns; each partition
    // switches when its deploy record is folded.)
    let deadline = Instant::now() + Duration::from_secs(60);
    let versions = || server.running.as_ref().expect("running").app.kind_versions("counter").unwrap();
    while versions().is_none_or(|v| v.in_use() != [v2]) {
        assert!(Instant::now() < deadline, "the deploy never reached every partition");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    *end.lock().unwrap() = Some(Instant::now() + Duration::from_millis(1500));
    let mut sent = load.await.unwrap();
    for i in 0..MODELS {
        sent.entry(format!("m{i}")).or_default();
    }

    // Wait until every model has folded what was sent, then read states and heads.
    let mut states: HashMap<String, Value> = HashMap::new();
    let mut heads: HashMap<String, String> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (id, diffs) in &sent {
        loop {
            let (status, body) = server.get(&format!("/v1/models/counter/{id}")).await;
            assert_eq!(status, 200, "{body}");
            if body["seq"].as_u64().unwrap() == diffs.len() as u64 {
                states.insert(id.clone(), body["state"].clone());
                heads.insert(id.clone(), body["hash"].as_str().unwrap().to_owned());
                break;
            }
            assert!(Instant::now() < deadline, "{id} not folded: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Followers reach the head with no gap (checked event by event).
    for (id, follower, _) in &followers {
        let head = &heads[id];
        let deadline = Instant::now() + Duration::from_secs(10);
        while follower.lock().await.hash.as_deref() != Some(head) {
            assert!(Instant::now() < deadline, "{id}: follower never reached the head");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(follower.lock().await.resets.is_empty(), "{id}: a deploy must not reset clients");
    }
    let (status, versions) = server.get("/v1/reducers/counter").await;
    assert_eq!(status, 200);
    assert_eq!(versions["versions"][0]["version"], v2.to_string(), "{versions}");
    assert_eq!(versions["versions"][0]["status"], "active");
    assert_eq!(versions["versions"][0]["declared"], json!({"name": "counter", "version": "2.0.0"}));
    assert_eq!(versions["versions"][1]["version"], v1.to_string());
    assert_eq!(versions["versions"][1]["status"], "retired");

    for (_, _, task) in followers {
        task.abort();
    }
    let server = Arc::into_inner(server).expect("no other user of the server");
    let dir = server.stop().await;

    // The store: every sent diff applied once, each by the version active at its offset,
    // and every state equal to the reference fold of its diffs by their versions.
    let store = Store::open(&dir.path().join("db"), &StoreOptions::default()).unwrap();
    let reader = store.read();
    let mut by_offset: BTreeMap<u32, Vec<(u64, ModuleHash)>> = BTreeMap::new();
    for (id, diffs) in &sent {
        let model = ModelKey::new("counter", id);
        let stored = reader.diffs(&model, None, u64::MAX, model.genesis(), 0).unwrap();
        let offsets: Vec<u64> = stored.iter().map(|d| d.offset).collect();
        let mut expected: Vec<u64> = diffs.iter().map(|d| d.1).collect();
        expected.sort();
        assert_eq!(offsets, expected, "{id}: every sent diff applied exactly once");
        let versions: Vec<(ModuleHash, i64)> = stored.iter().map(|d| (d.reducer, delta_of(&d.payload))).collect();
        assert_eq!(reference(&versions, v1, v2).json(), states[id], "{id}: {versions:?}");
        // A model's records are on one partition (keyed).
        if let Some(&(partition, _, _)) = diffs.first() {
            assert!(diffs.iter().all(|d| d.0 == partition), "{id}: on one partition");
            by_offset.entry(partition).or_default().extend(stored.iter().map(|d| (d.offset, d.reducer)));
        }
    }
    // Per partition, in log order: v1's diffs, then the deploy record, then v2's only.
    let mut after_swap = 0;
    for (partition, mut diffs) in by_offset {
        diffs.sort();
        let switch = diffs.iter().position(|(_, by)| *by == v2).expect("some diffs applied by v2");
        assert!(switch > 100, "partition {partition}: the load's first diffs were applied by v1");
        let late_v1: Vec<u64> = diffs[switch..].iter().filter(|(_, by)| *by != v2).map(|d| d.0).collect();
        assert!(late_v1.is_empty(), "partition {partition}: diffs after the swap applied by v1: {late_v1:?}");
        after_swap += diffs.len() - switch;
    }
    // (How many depends on the rate this machine sustains; printed by `stream_diffs`.)
    assert!(after_swap >= 100, "the load went on after the swap: {after_swap} diffs");
    drop(reader);
    drop(store);

    // A replica started afterwards, on an empty store, with v1 as its file, folds the log
    // from its start: it assembles v2 from each partition's chunks and reaches every state.
    if broker.is_some() {
        let (fresh_dir, fresh_reducers) = setup();
        let config = Config { data_dir: fresh_dir.path().to_owned(), reducers_dir: fresh_reducers, ..fresh_config };
        let fresh = TestServer::start_config(fresh_dir, config).await;
        for (id, state) in states.iter().take(100) {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let (_, body) = fresh.get(&format!("/v1/models/counter/{id}")).await;
                if body["hash"] == json!(heads[id]) {
                    assert_eq!(&body["state"], state, "{id}");
                    break;
                }
                assert!(Instant::now() < deadline, "{id}: the fresh replica never reached the head: {body}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let (_, versions) = fresh.get("/v1/reducers/counter").await;
        assert_eq!(versions["versions"][0]["version"], v2.to_string(), "{versions}");
        assert_eq!(versions["versions"][0]["status"], "active", "{versions}");
        assert_eq!(versions["versions"][0]["bytes"], module("counter_v2").len(), "{versions}");
        fresh.stop().await;
    }
}

/// Deploy records forged by a producer: a chunk header that does not parse, and chunks that
/// do not hash to the module their deploy record names. Each is rejected `invalid_deploy`
/// and the partition keeps its version.
async fn forged_deploys_are_refused(broker: &Broker, server: &TestServer) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer};
    let producer = broker.producer();
    let send = |headers: &[(&str, String)], value: &[u8]| {
        let owned = headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (key, value)| h.insert(Header { key, value: Some(value.as_bytes()) }));
        let record = BaseRecord::to("counter").partition(0).key("counter").payload(value).headers(owned);
        producer.send(record).map_err(|(e, _)| e).unwrap();
    };
    let deploy = ("statefold-deploy", "counter".to_owned());
    send(&[deploy.clone(), ("statefold-deploy-chunk", "not a chunk".into())], b"x");
    let v2 = module("counter_v2");
    let claimed = ModuleHash::of(b"another module");
    let halves = v2.split_at(v2.len() / 2);
    send(&[deploy.clone(), ("statefold-deploy-chunk", format!("{claimed} 0 2"))], halves.0);
    send(&[deploy.clone(), ("statefold-deploy-chunk", format!("{claimed} 1 2"))], halves.1);
    send(&[deploy, ("statefold-deploy-module", format!("{claimed} 2"))], b"");
    producer.flush(Duration::from_secs(30)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let rejections = loop {
        let (_, body) = server.get("/v1/kinds/counter/rejections").await;
        let rejections = body["rejections"].as_array().unwrap().clone();
        if rejections.len() >= 2 {
            break rejections;
        }
        assert!(Instant::now() < deadline, "the forged deploy records were not rejected: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rejections.len(), 2, "{rejections:?}");
    assert!(rejections.iter().all(|r| r["code"] == "invalid_deploy"), "{rejections:?}");
    assert!(rejections[0]["message"].as_str().unwrap().contains("not \"HASH INDEX COUNT\""), "{rejections:?}");
    assert!(rejections[1]["message"].as_str().unwrap().contains("do not hash to it"), "{rejections:?}");
    let v1 = ModuleHash::of(&module("counter"));
    let versions = server.running.as_ref().expect("running").app.kind_versions("counter").unwrap().unwrap();
    assert_eq!(versions.in_use(), [v1], "the partition keeps its version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_through_the_directory_under_load() {
    deploy_under_load(None, |_server, reducers| async move {
        // Written next to it and renamed in, as deploy tools do; `cp` works too (below).
        std::fs::write(reducers.join("counter.wasm.tmp"), module("counter_v2")).unwrap();
        std::fs::rename(reducers.join("counter.wasm.tmp"), reducers.join("counter.wasm")).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_through_http_under_load() {
    deploy_under_load(None, |server, _| async move {
        let response =
            server.client.put(server.url("/v1/reducers/counter")).body(module("counter_v2")).send().await.unwrap();
        let (status, body) = statefold_tests::http::json_of(response).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["version"]["status"], "active");
        assert_eq!(body["unchanged"], false);
        assert_eq!(body["partitions"], 1, "one deploy record in the embedded log's one partition: {body}");
        assert!(body["took_ms"].as_f64().unwrap() >= 0.0, "{body}");
    })
    .await;
}

/// The same, folding from Kafka (a real broker), deployed through the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_through_the_directory_under_load_from_kafka() {
    let broker = Broker::start();
    deploy_under_load(Some(&broker), |_server, reducers| async move {
        std::fs::copy(statefold_tests::wasm("counter_v2"), reducers.join("counter.wasm")).unwrap();
    })
    .await;
}

async fn put_module(server: &TestServer, path: &str, module: Vec<u8>) -> (u16, Value) {
    let response = server.client.put(server.url(path)).body(module).send().await.unwrap();
    statefold_tests::http::json_of(response).await
}

async fn versions(server: &TestServer) -> Vec<Value> {
    let (status, body) = server.get("/v1/reducers/counter").await;
    assert_eq!(status, 200, "{body}");
    body["versions"].as_array().unwrap().clone()
}

/// `module` with a custom section appended: another version that behaves the same.
fn with_custom_section(mut module: Vec<u8>, tag: &str) -> Vec<u8> {
    let name = b"statefold-test";
    let payload = tag.as_bytes();
    let size = 1 + name.len() + payload.len();
    assert!(size < 128 && name.len() < 128, "one-byte LEB128 sizes");
    module.extend([0, size as u8, name.len() as u8]);
    module.extend_from_slice(name);
    module.extend_from_slice(payload);
    module
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_each_with_its_reason_while_v1_folds() {
    let (dir, reducers) = setup();
    let mut config = config(dir.path(), &reducers);
    config.limits.reducer_module_bytes_max = 4 << 20;
    let server = TestServer::start_config(dir, config).await;
    let v1 = ModuleHash::of(&module("counter")).to_string();
    server.create("counter", "c").await;
    let mut expected = 0;
    // v1 folds between every attempt: the state stays v1's integer.
    let mut still_v1 = async |step: &str| {
        expected += 7;
        server.apply("counter", "c", r#"{"add": 7}"#).await;
        let (_, body) = server.get("/v1/models/counter/c").await;
        assert_eq!(body["state"], json!(expected), "after {step}");
        assert_eq!(versions(&server).await[0]["version"], v1, "after {step}");
    };
    still_v1("start").await;

    let component = |export: &str| {
        wat::parse_str(format!(r#"(component (instance $i) (export "{export}" (instance $i)))"#)).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("text", b"#!/bin/sh\necho not a reducer\n".to_vec(), "not_wasm"),
        ("core module", wat::parse_str(r#"(module (func (export "apply")))"#).unwrap(), "core_module"),
        ("wrong world", component("acme:shop/cart@1.0.0"), "wrong_world"),
        ("newer contract", component("statefold:reducer/reducer@0.3.0"), "incompatible_version"),
        ("hollow export", component("statefold:reducer/reducer@0.1.0"), "contract_mismatch"),
        ("truncated", module("counter_v2")[..5000].to_vec(), "truncated"),
        ("restore traps", module("restore"), "restore_failed"),
    ];
    for (what, bytes, code) in &cases {
        let (status, body) = put_module(&server, "/v1/reducers/counter", bytes.clone()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (422, Some(*code)), "{what}: {body}");
        still_v1(what).await;
    }
    let restore = &cases.last().unwrap();
    let (_, body) = put_module(&server, "/v1/reducers/counter", restore.1.clone()).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("trapping on purpose in restore"), "{body}");

    // Too large, unknown reducer, a stored version that does not exist: plain errors.
    // (Its own connection: the server answers before reading the body, then closes.)
    // The client may see the connection close while it still sends (a reset instead of
    // the answer); it tries again on a new connection.
    let mut attempts = 0;
    let response = loop {
        let once = reqwest::Client::new();
        match once.put(server.url("/v1/reducers/counter")).body(vec![0; 5 << 20]).send().await {
            Ok(response) => break response,
            Err(e) if attempts < 5 => {
                attempts += 1;
                eprintln!("oversized upload: {e}; again");
            }
            Err(e) => panic!("the oversized upload never got an answer: {e}"),
        }
    };
    let (status, body) = statefold_tests::http::json_of(response).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("too_large")), "{body}");
    let (status, body) = put_module(&server, "/v1/reducers/nope", module("counter_v2")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_reducer")), "{body}");
    let (status, body) =
        put_module(&server, &format!("/v1/reducers/counter?version={}", "ab".repeat(32)), Vec::new()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_version")), "{body}");
    // A version of another reducer is no version of this one (stored, but not a rollback).
    let (_, document) = server.get("/v1/reducers/document").await;
    let foreign = document["versions"][0]["version"].as_str().expect("document's version").to_owned();
    let (status, body) = put_module(&server, &format!("/v1/reducers/counter?version={foreign}"), Vec::new()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_version")), "{body}");

    // A half-written file in the directory: refused as truncated, never loaded; the
    // completed file is deployed.
    let v2 = module("counter_v2");
    std::fs::write(reducers.join("counter.wasm"), &v2[..v2.len() / 2]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let truncated = loop {
        let listed = versions(&server).await;
        if let Some(v) = listed.iter().find(|v| v["origin"] == "directory") {
            break v.clone();
        }
        assert!(Instant::now() < deadline, "the half-written file was never looked at: {listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(truncated["status"], "refused");
    assert_eq!(truncated["error"]["code"], "truncated", "{truncated}");
    still_v1("half-written file").await;
    std::fs::write(reducers.join("counter.wasm"), &v2).unwrap();
    let v2_id = ModuleHash::of(&v2).to_string();
    while versions(&server).await[0]["version"] != v2_id {
        assert!(Instant::now() < deadline + Duration::from_secs(10), "the completed file was not deployed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.apply("counter", "c", r#"{"sub": 100}"#).await;
    let (_, body) = server.get("/v1/models/counter/c").await;
    assert_eq!(body["state"], json!({"value": expected - 100, "max": expected}));

    // Every refusal is listed with its code; the active version first, v1 retired.
    let listed = versions(&server).await;
    let codes: Vec<&str> = listed.iter().filter_map(|v| v["error"]["code"].as_str()).collect();
    for (_, _, code) in &cases {
        assert!(codes.contains(code), "{code} not listed: {listed:?}");
    }
    assert_eq!(listed.iter().filter(|v| v["status"] == "active").count(), 1);
    assert!(listed.iter().any(|v| v["version"] == v1 && v["status"] == "retired"));
    // Rolling back to v1 is refused too: v1 cannot read v2's states. That is the reducer's
    // contract (restore), checked like any deploy.
    let (status, body) = put_module(&server, &format!("/v1/reducers/counter?version={v1}"), Vec::new()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("restore_failed")), "{body}");
    let (status, _) = server.get("/v1/models/document").await;
    assert_eq!(status, 200, "other kinds unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_active_versions_and_rollback_redeploys_a_stored_one() {
    let (dir, reducers) = setup();
    let server = start(dir, &reducers).await;
    server.create("counter", "c").await;
    server.apply("counter", "c", r#"{"add": 5}"#).await;
    let v2 = module("counter_v2");
    let v2b = with_custom_section(v2.clone(), "b");
    let (v2_id, v2b_id) = (ModuleHash::of(&v2).to_string(), ModuleHash::of(&v2b).to_string());
    assert_eq!(put_module(&server, "/v1/reducers/counter", v2).await.0, 200);
    let (status, body) = put_module(&server, "/v1/reducers/counter", v2b).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"]["version"], v2b_id);
    // Deploying the active version again changes nothing.
    let (status, body) = put_module(&server, &format!("/v1/reducers/counter?version={v2b_id}"), Vec::new()).await;
    assert_eq!((status, body["unchanged"].as_bool()), (200, Some(true)), "{body}");
    // Rollback: deploy the stored v2 again by its id.
    let (status, body) = put_module(&server, &format!("/v1/reducers/counter?version={v2_id}"), Vec::new()).await;
    assert_eq!(status, 200, "{body}");
    let listed = versions(&server).await;
    let status_of = |id: &str| listed.iter().find(|v| v["version"] == id).map(|v| v["status"].clone());
    assert_eq!(status_of(&v2_id), Some(json!("active")));
    assert_eq!(status_of(&v2b_id), Some(json!("retired")));
    server.apply("counter", "c", r#"{"add": 1}"#).await;

    // The directory still holds v1 (HTTP deploys do not write it) and changes while the
    // server is down: the restart keeps the store's active version.
    let dir = server.stop().await;
    std::fs::write(reducers.join("counter.wasm"), with_custom_section(module("counter"), "while down")).unwrap();
    let server = start(dir, &reducers).await;
    assert_eq!(versions(&server).await[0]["version"], v2_id);
    server.apply("counter", "c", r#"{"add": 1}"#).await;
    let (_, body) = server.get("/v1/models/counter/c").await;
    assert_eq!(body["state"], json!({"value": 7, "max": 7}));
    let (_, list) = server.get("/v1/reducers").await;
    assert_eq!(list["reducers"][0]["name"], "counter", "{list}");
    assert_eq!(list["reducers"][0]["kinds"], json!(["counter"]));
    assert_eq!(list["reducers"][0]["active"]["version"], v2_id);
    // Copying the file in again (same bytes as at the restart) deploys it: here refused,
    // since that v1 build cannot read v2's states; the active version stays.
    let v1_again = with_custom_section(module("counter"), "while down");
    std::fs::write(reducers.join("counter.wasm"), &v1_again).unwrap();
    let v1_again = ModuleHash::of(&v1_again).to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        if let Some(v) = versions(&server).await.into_iter().find(|v| v["version"] == v1_again) {
            break v;
        }
        assert!(Instant::now() < deadline, "the file copied in again was not deployed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((refused["status"].as_str(), refused["origin"].as_str()), (Some("refused"), Some("directory")));
    assert_eq!(refused["error"]["code"], "restore_failed", "{refused}");
    assert_eq!(versions(&server).await[0]["version"], v2_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuilds_states_with_the_new_reducer_and_resets_old_hashes() {
    let (dir, reducers) = setup();
    let mut config = config(dir.path(), &reducers);
    config.limits.checkpoint_interval_diffs = 4;
    config.limits.retain_checkpoints = 2;
    config.limits.replay_page_models = 4;
    let server = TestServer::start_config(dir, config).await;
    let diffs = [r#"{"add": 50}"#, r#"{"sub": 30}"#, r#"{"add": 5}"#, r#"{"sub": 10}"#, r#"{"add": 2}"#];
    for i in 0..10 {
        server.create("counter", &format!("r{i}")).await;
        for diff in &diffs[..=i % diffs.len()] {
            server.apply("counter", &format!("r{i}"), diff).await;
        }
    }
    // `p` has 13 diffs: checkpoints at seq 4, 8 and 12; two are kept, diffs up to seq 8
    // pruned. Its replay starts from the oldest retained checkpoint (value 12), so its max
    // is 27, not 100.
    server.create("counter", "p").await;
    let pruned = [r#"{"add": 100}"#, r#"{"sub": 100}"#, r#"{"sub": 1}"#, r#"{"add": 1}"#];
    for diff in pruned.iter().chain([r#"{"add": 3}"#; 9].iter()) {
        server.apply("counter", "p", diff).await;
    }
    let follower = Arc::new(Mutex::new(Follower::default()));
    let task = follow(server.events("counter", "r4", None).await, "r4".into(), follower.clone());
    assert_eq!(put_module(&server, "/v1/reducers/counter", module("counter_v2")).await.0, 200);
    // Moved by restore: v2 starts `max` at the value it found (17), not the peak (50).
    server.apply("counter", "r4", r#"{"add": 1}"#).await;
    let (_, before) = server.get("/v1/models/counter/r4").await;
    assert_eq!(before["state"], json!({"value": 18, "max": 18}));
    let old_hash = before["hash"].as_str().unwrap().to_owned();

    let (status, job) = server.post("/v1/kinds/counter/replay", "").await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["models_total"], 11);
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let (status, job) = server.get("/v1/kinds/counter/replay").await;
        assert_eq!(status, 200);
        if job["state"] == "finished" {
            break job;
        }
        assert!(Instant::now() < deadline, "replay did not finish: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((job["models_done"].as_u64(), job["models_failed"].as_u64()), (Some(11), Some(0)), "{job}");

    // States as v2 defines them over the retained history (all of it for the `r` models).
    for i in 0..10 {
        let (_, body) = server.get(&format!("/v1/models/counter/r{i}")).await;
        let (mut value, mut max) = (0i64, 0i64);
        let extra = if i == 4 { [r#"{"add": 1}"#].as_slice() } else { &[] };
        for diff in diffs[..=i % diffs.len()].iter().chain(extra) {
            value += delta_of(diff.as_bytes());
            max = max.max(value);
        }
        assert_eq!(body["state"], json!({"value": value, "max": max}), "r{i}: {body}");
        assert_eq!(body["seq"].as_u64().unwrap() as usize, i % diffs.len() + 1 + extra.len(), "r{i}: seq kept");
    }
    let (_, body) = server.get("/v1/models/counter/p").await;
    assert_eq!((body["state"].clone(), body["seq"].as_u64()), (json!({"value": 27, "max": 27}), Some(13)), "{body}");
    // A client holding a pre-replay hash: reset + snapshot, never a patch.
    let mut stream = server.events("counter", "r4", Some(&old_hash)).await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = stream.next_within(Duration::from_secs(5)).await.unwrap();
        if event.event != "message" {
            seen.push((event.event.clone(), event.json()));
        }
    }
    assert_eq!(seen[0], ("reset".into(), json!({"reason": "unknown"})));
    assert_eq!(seen[1].0, "snapshot");
    assert_eq!(seen[1].1["state"], json!({"value": 18, "max": 50}));
    assert_ne!(seen[1].1["hash"].as_str(), Some(old_hash.as_str()));
    assert_eq!(seen[2].0, "synced");
    // The client that was following live got the same: a reset, then the new state.
    let deadline = Instant::now() + Duration::from_secs(5);
    while follower.lock().await.hash.as_deref() != seen[1].1["hash"].as_str() {
        assert!(
            Instant::now() < deadline,
            "the live follower was not moved to the new chain: {:?}",
            follower.lock().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(follower.lock().await.resets, vec!["unknown".to_owned()]);
    task.abort();
    // A second replay is accepted once the first finished; the API says if one runs.
    let (status, _) = server.post("/v1/kinds/counter/replay", "").await;
    assert_eq!(status, 202);
    let (status, body) = server.post("/v1/kinds/nope/replay", "").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_kind")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_interrupted_by_a_restart_resumes_where_it_stood() {
    let (dir, reducers) = setup();
    let restarted = |dir: &Path| {
        let mut config = config(dir, &reducers);
        config.limits.replay_page_models = 1;
        config
    };
    let first = restarted(dir.path());
    let server = TestServer::start_config(dir, first).await;
    let ids: Vec<String> = (0..300).map(|i| format!("q{i}")).collect();
    for chunk in ids.chunks(50) {
        futures_util::future::join_all(chunk.iter().map(|id| server.create("counter", id))).await;
        futures_util::future::join_all(chunk.iter().map(|id| server.apply("counter", id, r#"{"add": 4}"#))).await;
    }
    let mut before = HashMap::new();
    for id in &ids {
        before.insert(id.clone(), server.get(&format!("/v1/models/counter/{id}")).await.1["hash"].clone());
    }
    let (status, _) = server.post("/v1/kinds/counter/replay", "").await;
    assert_eq!(status, 202);
    let dir = server.stop().await;
    let second = restarted(dir.path());
    let server = TestServer::start_config(dir, second).await;
    let (_, job) = server.get("/v1/kinds/counter/replay").await;
    eprintln!("after the restart: {job}");
    assert_eq!(job["models_total"], 300, "the job survived the restart: {job}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let (_, job) = server.get("/v1/kinds/counter/replay").await;
        if job["state"] == "finished" {
            break job;
        }
        assert!(Instant::now() < deadline, "{job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((job["models_done"].as_u64(), job["models_failed"].as_u64()), (Some(300), Some(0)), "{job}");
    let v1 = ModuleHash::of(&module("counter"));
    for id in &ids {
        let (_, body) = server.get(&format!("/v1/models/counter/{id}")).await;
        assert_ne!(body["hash"], before[id], "{id}: on a new chain");
        // Replayed exactly once: its first diff became the base of a chain rebased once.
        let once = Hash::genesis("counter", id).next(br#"{"add": 4}"#).rebase(&v1.0);
        assert_eq!(body["hash"], once.to_string(), "{id}: replayed once");
        assert_eq!((body["state"].clone(), body["seq"].as_u64()), (json!(4), Some(1)), "{id}");
    }
}

/// A kind's reducer moves between languages through the reducers directory (hot reload):
/// `totals` in Rust, then the JavaScript build, then the Python one, each 12 to 20 MB and so
/// deployed in chunks. A model's state carries over each move (the next version restores
/// the last one's JSON), and a restart folds on with the stored versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_moves_between_languages_through_the_reducers_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let reducers = dir.path().join("reducers");
    std::fs::create_dir(&reducers).unwrap();
    std::fs::write(reducers.join("totals.wasm"), module("totals")).unwrap();
    let mut config = config(dir.path(), &reducers);
    config.kinds = vec![KindConfig { name: "basket".into(), reducer: "totals.wasm".into(), topic: None }];
    let server = TestServer::start_config(dir, config.clone()).await;
    server.create("basket", "b").await;
    server.apply("basket", "b", r#"{"add": {"apples": 1}}"#).await;
    let mut expected = json!({"apples": 1});
    for (step, name) in ["totals_js", "totals_py"].into_iter().enumerate() {
        let bytes = module(name);
        assert!(bytes.len() > config.limits.deploy_record_bytes_max, "{name} is deployed in chunks");
        std::fs::write(reducers.join("totals.wasm.tmp"), &bytes).unwrap();
        std::fs::rename(reducers.join("totals.wasm.tmp"), reducers.join("totals.wasm")).unwrap();
        let id = ModuleHash::of(&bytes).to_string();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, body) = server.get("/v1/reducers/totals").await;
            let first = &body["versions"][0];
            if first["version"] == id.as_str() && first["status"] == "active" {
                assert_eq!(first["declared"]["name"], name, "{body}");
                assert_eq!(first["bytes"], bytes.len(), "{body}");
                break;
            }
            assert_ne!(first["status"], "refused", "{body}");
            assert!(Instant::now() < deadline, "{name} was never deployed: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let fruit = ["pears", "plums"][step];
        server.apply("basket", "b", &format!(r#"{{"add": {{"apples": 1, "{fruit}": 2}}}}"#)).await;
        expected["apples"] = json!(2 + step);
        expected[fruit] = json!(2);
        let (_, body) = server.get("/v1/models/basket/b").await;
        assert_eq!(body["state"], expected, "{name}: the state carried over");
    }
    let dir = server.stop().await;
    let server = TestServer::start_config(dir, config).await;
    server.apply("basket", "b", r#"{"add": {"plums": -2}}"#).await;
    let (_, body) = server.get("/v1/models/basket/b").await;
    assert_eq!(body["state"], json!({"apples": 3, "pears": 2}), "{body}");
    let (_, body) = server.get("/v1/reducers/totals").await;
    assert_eq!(body["versions"][0]["declared"]["name"], "totals_py", "{body}");
}

/// A client's catch-up over diffs that span a deploy comes one diff at a time (composition
/// is one version's); over diffs one version applied, one patch. The head records where
/// its version's run began, so this is known without reading the missed diffs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_across_a_deploy_sends_the_diffs_one_by_one() {
    let (dir, reducers) = setup();
    let server = start(dir, &reducers).await;
    server.create("document", "d").await;
    let mut hashes = Vec::new();
    let apply = |n: usize| format!(r#"{{"k{}": {n}}}"#, n % 2);
    for n in 1..=3 {
        hashes.push(server.apply("document", "d", &apply(n)).await["hash"].as_str().unwrap().to_owned());
    }
    // The same logic under another version id.
    let next = with_custom_section(module("document"), "next");
    let (status, body) = put_module(&server, "/v1/reducers/document", next).await;
    assert_eq!(status, 200, "{body}");
    for n in 4..=6 {
        hashes.push(server.apply("document", "d", &apply(n)).await["hash"].as_str().unwrap().to_owned());
    }
    // What a client holding the hash after diff `from` is sent before it is at seq 6.
    let events = |from: usize| {
        let since = hashes[from - 1].clone();
        let server = &server;
        async move {
            let mut stream = server.events("document", "d", Some(&since)).await;
            let mut names = Vec::new();
            loop {
                let event = stream.next_within(Duration::from_secs(10)).await.expect("an event");
                if event.event != "diff" && event.event != "patch" {
                    assert!(!["snapshot", "reset"].contains(&event.event.as_str()), "{event:?}");
                    continue;
                }
                names.push(event.event.clone());
                if event.json()["seq"] == 6 {
                    return names;
                }
            }
        }
    };
    assert_eq!(events(1).await, ["diff"; 5], "diffs 2 and 3 by the first version, 4 to 6 by the next");
    assert_eq!(events(2).await, ["diff"; 4], "3 by the first version, 4 to 6 by the next");
    assert_eq!(events(3).await, ["patch"], "4 to 6, all the next version's: one patch");
    assert_eq!(events(4).await, ["patch"], "5 and 6: one patch");
}
