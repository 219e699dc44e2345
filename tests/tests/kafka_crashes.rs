//! `statefold serve` folding from Kafka (a Tansu broker started by the test) while the
//! process is SIGKILLed again and again and the broker itself is stopped and restarted:
//! at the end every model equals a reference fold of the records in the topic.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::RngExt;
use statefold::chain::Hash;
use statefold_tests::broker::{Broker, produce_all};

use statefold_tests::process::Serve;

const MODELS: usize = 200;
const DIFFS: usize = 50_000;
const PARTITIONS: u32 = 3;

/// Sum of the stored positions (records folded or rejected) and whether the server is
/// ready, from `/readyz`.
async fn progress(client: &reqwest::Client, serve: &Serve) -> Option<(u64, bool)> {
    let response = client.get(format!("{}/readyz", serve.url)).send().await.ok()?;
    let ready = response.status() == 200;
    let body: serde_json::Value = response.json().await.ok()?;
    let next = body["partitions"].as_array()?.iter().filter_map(|p| p["next"].as_u64()).sum();
    Some((next, ready))
}

/// Polls `/readyz` until `done(folded, ready)` holds.
async fn wait_until(client: &reqwest::Client, serve: &Serve, what: &str, done: impl Fn(u64, bool) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((next, ready)) = progress(client, serve).await
            && done(next, ready)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 120 s; stderr: {}",
            std::fs::read_to_string(&serve.stderr).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_and_a_broker_restart_during_ingestion_lose_and_repeat_nothing() {
    let mut broker = Broker::start();
    broker.create_topic("counter", PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let flags: Vec<String> = [
        "--kafka-brokers",
        &broker.brokers(),
        "--kafka-fetch-wait-ms",
        "10",
        "--kafka-check-interval-ms",
        "200",
        "--batch-records-max",
        "500",
    ]
    .map(String::from)
    .to_vec();
    let client = reqwest::Client::new();
    // Built before the producer starts: the kills must fall during ingestion (a build here
    // once took longer than the whole production).
    statefold_tests::statefold_binary();
    statefold_tests::wasm("counter");

    // Another service produces 50,000 diffs over 200 models, over about 15 s.
    let producer = broker.producer();
    let producing = std::thread::spawn(move || {
        let mut rng = rand::rng();
        let diffs: Vec<(String, Vec<u8>)> = (0..DIFFS)
            .map(|_| {
                let model = format!("m{}", rng.random_range(0..MODELS));
                (model, format!(r#"{{"add":{}}}"#, rng.random_range(1..1000)).into_bytes())
            })
            .collect();
        for chunk in diffs.chunks(500) {
            produce_all(&producer, "counter", chunk);
            std::thread::sleep(Duration::from_millis(150));
        }
    });

    let mut serve = Serve::start_with(dir.path(), &flags);
    let mut rng = rand::rng();
    let mut folded_at_kills = Vec::new();
    for kill in 1..=5 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        if kill == 3 {
            // The broker goes away during ingestion: the server says it is not ready, and
            // is ready again once the broker is back.
            wait_until(&client, &serve, "ready before the broker stops", |_, ready| ready).await;
            broker.stop();
            wait_until(&client, &serve, "unready while the broker is down", |_, ready| !ready).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (_, ready) = progress(&client, &serve).await.expect("the server answers");
            assert!(!ready, "still unready while the broker is down");
            broker.restart();
            wait_until(&client, &serve, "ready again after the broker restarted", |_, ready| ready).await;
        }
        let (folded, _) = progress(&client, &serve).await.expect("the server answers");
        serve.signal("KILL");
        serve.wait();
        folded_at_kills.push(folded);
        serve = Serve::start_with(dir.path(), &flags);
    }
    producing.join().expect("the producer thread");
    assert!(
        folded_at_kills.iter().all(|n| (*n as usize) < DIFFS),
        "every kill happened during ingestion: folded {folded_at_kills:?} of {DIFFS}"
    );

    // The reference: a fold of exactly the records in the topic.
    let records = broker.read_all("counter", PARTITIONS);
    assert_eq!(records.len(), DIFFS, "the broker has every produced record once");
    let mut reference: BTreeMap<String, (i64, Hash, u64)> = BTreeMap::new();
    for (_, _, key, value) in &records {
        let id = String::from_utf8(key.clone().unwrap()).unwrap();
        let add = serde_json::from_slice::<serde_json::Value>(value).unwrap()["add"].as_i64().unwrap();
        let entry = reference.entry(id.clone()).or_insert_with(|| (0, Hash::genesis("counter", &id), 0));
        *entry = (entry.0 + add, entry.1.next(value), entry.2 + 1);
    }
    wait_until(&client, &serve, "every record folded", |next, ready| ready && next as usize == DIFFS).await;

    assert_eq!(reference.len(), MODELS);
    for (id, (sum, hash, seq)) in &reference {
        let model: serde_json::Value =
            client.get(format!("{}/v1/models/counter/{id}", serve.url)).send().await.unwrap().json().await.unwrap();
        assert_eq!(model["seq"].as_u64(), Some(*seq), "{id}: every diff applied exactly once: {model}");
        assert_eq!(model["hash"].as_str(), Some(hash.to_string().as_str()), "{id}: the hash chain");
        assert_eq!(model["state"].as_i64(), Some(*sum), "{id}: the state");
    }
    let metrics = client.get(format!("{}/metrics", serve.url)).send().await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("statefold_records_rejected_total{"), "nothing was rejected: {metrics}");
}
