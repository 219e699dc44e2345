//! Three `statefold serve` processes on one broker (a real Tansu), each folding the topic
//! into its own store. Diffs are written through all of them at random; 100 SSE clients
//! hop to a random server on every reconnect, resuming with their last hash. During the
//! test a new reducer version is deployed through one server, and another is SIGKILLed,
//! then restarted. At the end every server and every client agree on every model (state,
//! hash, seq), no client saw a gap or a repeat, and `statefold verify` passes on a
//! replica's store, finds a model corrupted on purpose, and repairs it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::prelude::*;
use serde_json::{Value, json};
use statefold::model::{CheckpointWrite, Folded, ModelKey};
use statefold::store::{Store, StoreOptions};
use statefold_tests::broker::Broker;
use statefold_tests::http::{Follower, SseStream, json_of};
use tokio::sync::RwLock;

use statefold_tests::process::Serve;

const SERVERS: usize = 3;
const MODELS: usize = 20;
const CLIENTS: usize = 100;
const DIFFS: usize = 1500;
const REDUCER: &str = "counter";

fn flags(broker: &Broker) -> Vec<String> {
    let brokers = broker.brokers();
    let flags = ["--kafka-brokers", &brokers, "--kafka-fetch-wait-ms", "10", "--kafka-check-interval-ms", "200"];
    let attest = ["--attest-interval-records", "50"];
    flags.iter().chain(&attest).map(|s| s.to_string()).collect()
}

/// The base URL of each server, `None` while it is down.
type Urls = Arc<RwLock<Vec<Option<String>>>>;

async fn pick(urls: &Urls, rng: &mut StdRng) -> (usize, String) {
    let urls = urls.read().await;
    let up: Vec<(usize, &String)> = urls.iter().enumerate().filter_map(|(i, u)| Some((i, u.as_ref()?))).collect();
    let (i, url) = up[rng.random_range(0..up.len())];
    (i, url.clone())
}

async fn connect(client: &reqwest::Client, url: &str, model: &str, since: Option<&str>) -> Option<SseStream> {
    let mut request = client.get(format!("{url}/v1/models/counter/{model}/events"));
    if let Some(since) = since {
        request = request.header("Last-Event-ID", since);
    }
    let response = request.send().await.ok()?;
    (response.status() == 200).then(|| SseStream::new(response))
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, Value) {
    json_of(client.get(url).send().await.expect("server answers")).await
}

/// A counter's value under v1 (an integer) or v2 (`{value, max}`).
fn value_of(state: &Value) -> Option<i64> {
    state.as_i64().or_else(|| state["value"].as_i64())
}

/// `statefold verify` on a server's data dir; (success, stdout).
fn verify(dir: &Path, broker: &Broker, repair: bool) -> (bool, String) {
    let reducers = statefold_tests::wasm("counter").parent().unwrap().to_owned();
    let mut command = Command::new(statefold_tests::statefold_binary());
    command
        .args(["verify", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--reducers-dir")
        .arg(&reducers)
        .args(["--kind", &format!("counter={REDUCER}.wasm")])
        .args(flags(broker));
    if repair {
        command.arg("--repair");
    }
    let output = command.output().expect("statefold verify runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("verify: refolded"), "progress is shown: {stderr}");
    (output.status.success(), format!("{stdout}\n--- stderr:\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replica_processes_a_deploy_a_sigkill_and_hopping_clients_agree_then_verify() {
    let broker = Broker::start();
    broker.create_topic("counter", 3);
    broker.create_topic("statefold-attestations", 1);
    let dirs: Vec<tempfile::TempDir> = (0..SERVERS).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut servers: Vec<Option<Serve>> =
        dirs.iter().map(|d| Some(Serve::start_with(d.path(), &flags(&broker)))).collect();
    let http = reqwest::Client::new();
    for server in servers.iter().flatten() {
        server.wait_ready(&http).await;
    }
    let urls: Urls = Arc::new(RwLock::new(servers.iter().map(|s| s.as_ref().map(|s| s.url.clone())).collect()));
    let mut rng = StdRng::seed_from_u64(11);

    for i in 0..MODELS {
        let url = urls.read().await[i % SERVERS].clone().unwrap();
        let response = http.post(format!("{url}/v1/models/counter")).body(format!(r#"{{"id":"m{i}"}}"#)).send().await;
        let (status, body) = json_of(response.unwrap()).await;
        assert_eq!(status, 201, "{body}");
    }

    // 100 clients, 5 per model, each hopping to a random server after a few events.
    let done = Arc::new(AtomicBool::new(false));
    let final_heads: Arc<RwLock<BTreeMap<String, String>>> = Arc::new(RwLock::new(BTreeMap::new()));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (urls, done, final_heads) = (urls.clone(), done.clone(), final_heads.clone());
        let model = format!("m{}", c % MODELS);
        let mut rng = StdRng::seed_from_u64(c as u64);
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let who = format!("client {c} ({model})");
            let (mut chain, mut hops) = (Follower::default(), 0);
            loop {
                let (_, url) = pick(&urls, &mut rng).await;
                let Some(mut stream) = connect(&http, &url, &model, chain.hash.as_deref()).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue; // that server just went down: another one
                };
                hops += 1;
                let budget = rng.random_range(3..12);
                let mut seen = 0;
                while seen < budget {
                    let event = match tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
                        Ok(Some(event)) => event,
                        Ok(None) | Err(_) => break, // the server died, or quiet: hop anyway
                    };
                    chain.see(&who, &event);
                    seen += 1;
                }
                if done.load(Ordering::Relaxed) {
                    let head = final_heads.read().await.get(&model).cloned();
                    if head.is_some() && head == chain.hash {
                        return (chain, hops);
                    }
                }
            }
        }));
    }

    // Writers: diffs through random servers that are up. At 1/3 a new version is deployed
    // through server 0; at 1/2 server 2 is SIGKILLed; at 3/4 it is started again.
    let mut sent: BTreeMap<String, i64> = BTreeMap::new();
    let mut v2 = String::new();
    let started = Instant::now();
    for n in 0..DIFFS {
        if n == DIFFS / 3 {
            let url = urls.read().await[0].clone().unwrap();
            let module = std::fs::read(statefold_tests::wasm("counter_v2")).unwrap();
            let response = http.put(format!("{url}/v1/reducers/{REDUCER}")).body(module).send().await.unwrap();
            let (status, body) = json_of(response).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["partitions"], 3, "a deploy record in every partition: {body}");
            v2 = body["version"]["version"].as_str().unwrap().to_owned();
        }
        if n == DIFFS / 2 {
            urls.write().await[2] = None;
            let mut killed = servers[2].take().unwrap();
            killed.signal("KILL");
            killed.wait();
        }
        if n == 3 * DIFFS / 4 {
            let restarted = Serve::start_with(dirs[2].path(), &flags(&broker));
            restarted.wait_ready(&http).await;
            urls.write().await[2] = Some(restarted.url.clone());
            servers[2] = Some(restarted);
        }
        let (_, url) = pick(&urls, &mut rng).await;
        let model = format!("m{}", rng.random_range(0..MODELS));
        let add = rng.random_range(1..10);
        let response =
            http.post(format!("{url}/v1/models/counter/{model}/diffs")).body(json!({"add": add}).to_string());
        let (status, body) = json_of(response.send().await.unwrap()).await;
        assert_eq!(status, 202, "{body}");
        *sent.entry(model).or_default() += add;
        if n % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await; // about 500 diffs/s
        }
    }
    eprintln!("{DIFFS} diffs written in {:?}", started.elapsed());

    // Every server, the restarted one too, agrees on every model: state, hash, seq.
    let all: Vec<String> = urls.read().await.iter().map(|u| u.clone().unwrap()).collect();
    let mut heads = BTreeMap::new();
    for i in 0..MODELS {
        let model = format!("m{i}");
        let expected = sent.get(&model).copied().unwrap_or(0);
        let mut seen: Vec<Value> = Vec::new();
        for url in &all {
            let deadline = Instant::now() + Duration::from_secs(30);
            let body = loop {
                let (_, body) = get(&http, &format!("{url}/v1/models/counter/{model}")).await;
                if value_of(&body["state"]) == Some(expected) {
                    break body;
                }
                assert!(Instant::now() < deadline, "{url}, {model}: {body}, expected {expected}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            seen.push(json!([body["hash"], body["seq"], body["state"]]));
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{model}: servers disagree: {seen:?}");
        assert!(seen[0][2].is_object(), "{model}: v2 folds after the deploy: {seen:?}");
        heads.insert(model, seen[0][0].as_str().unwrap().to_owned());
    }
    // Each server, including the two that did not take the deploy, records v2 as active.
    for url in &all {
        let (status, body) = get(&http, &format!("{url}/v1/reducers/{REDUCER}")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (body["versions"][0]["version"].as_str(), body["versions"][0]["status"].as_str()),
            (Some(&*v2), Some("active")),
            "{url}: {body}"
        );
        assert_eq!(body["versions"][0]["origin"], "http", "the deploy record carries its origin: {body}");
    }
    // Their partition digests, exchanged through the attestation topic, agree: each is
    // ready and agrees with both others (the restarted one included).
    for url in &all {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = get(&http, &format!("{url}/readyz")).await;
            let peers = body["replicas"]["peers"].as_array().cloned().unwrap_or_default();
            if status == 200 && peers.len() >= 2 && peers.iter().all(|p| p["agrees"] == true) {
                break;
            }
            assert!(peers.iter().all(|p| p["agrees"] == true), "{url}: a replica disagrees: {body}");
            assert!(Instant::now() < deadline, "{url}: digests never compared: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    *final_heads.write().await = heads.clone();
    done.store(true, Ordering::Relaxed);

    // Every client ends at its model's head, having hopped between servers.
    let (mut hops, mut resets) = (0, 0);
    for (c, task) in clients.into_iter().enumerate() {
        let (chain, client_hops) =
            tokio::time::timeout(Duration::from_secs(60), task).await.expect("client finished").unwrap();
        assert_eq!(chain.hash.as_deref(), Some(heads[&format!("m{}", c % MODELS)].as_str()), "client {c}");
        hops += client_hops;
        resets += chain.resets.len();
    }
    eprintln!("{CLIENTS} clients: {hops} connections, {resets} resets");
    assert!(hops >= 3 * CLIENTS, "clients hopped: {hops}");
    assert_eq!(resets, 0, "a hash from one replica always resumes on another");

    // Verify beside a running server: it passes.
    let (ok, out) = verify(dirs[1].path(), &broker, false);
    assert!(ok && out.contains(&format!("{MODELS} models compared, 0 mismatched")), "{out}");

    // Stop server 1, corrupt one model's state in its store (a checkpoint at its head
    // whose state is not what its diffs fold to; the chain is untouched).
    let mut stopped = servers[1].take().unwrap();
    stopped.signal("TERM");
    assert!(stopped.wait().success());
    {
        let store =
            Store::open(&dirs[1].path().join("data/db"), &StoreOptions { fsync: true, ..StoreOptions::default() })
                .unwrap();
        let model = ModelKey::new("counter", "m0");
        let mut head = store.read().head(&model).unwrap().unwrap();
        let offset = head.offset.unwrap();
        let checkpoint = CheckpointWrite {
            model: model.clone(),
            seq: head.seq,
            offset,
            hash: head.hash,
            reducer: head.reducer,
            snapshot: br#"{"value":-1,"max":-1}"#.to_vec(),
        };
        if head.checkpoint() != Some((head.seq, offset)) {
            head.checkpoints.push((head.seq, offset));
        }
        let folded = Folded { checkpoints: vec![checkpoint], heads: vec![(model, head)], ..Folded::default() };
        store.commit(&folded, &[]).unwrap();
    }
    let (ok, out) = verify(dirs[1].path(), &broker, false);
    assert!(!ok, "verify fails on a corrupted model: {out}");
    assert!(out.contains("MISMATCH counter/m0 (state)") && out.contains("1 mismatched"), "{out}");
    let (ok, out) = verify(dirs[1].path(), &broker, true);
    assert!(ok && out.contains("1 repaired"), "{out}");
    let (ok, out) = verify(dirs[1].path(), &broker, false);
    assert!(ok && out.contains("0 mismatched"), "after the repair: {out}");

    // The repaired server serves m0 as the others do.
    let restarted = Serve::start_with(dirs[1].path(), &flags(&broker));
    restarted.wait_ready(&http).await;
    let (_, repaired) = get(&http, &format!("{}/v1/models/counter/m0", restarted.url)).await;
    let (_, other) = get(&http, &format!("{}/v1/models/counter/m0", all[0])).await;
    assert_eq!((repaired["hash"].clone(), repaired["state"].clone()), (other["hash"].clone(), other["state"].clone()));
}
