//! A kind's topic deleted and recreated under a stored position (issue 17, item 1), with
//! the real binary, Tansu and RocksDB: the server stops folding that kind alone and says
//! why (log, `/readyz`, `/metrics`, 503 `kind_stopped` to writes), and `statefold reset`
//! refolds it from the new topic's start, equal to a reference fold of what the log holds.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use statefold::chain::Hash;
use statefold_tests::broker::{Broker, produce_all};
use statefold_tests::process::Serve;

fn flags(broker: &Broker) -> Vec<String> {
    let brokers = broker.brokers();
    [
        "--kind",
        "counter=counter.wasm",
        "--kind",
        "document=document.wasm",
        "--kafka-brokers",
        &brokers,
        "--kafka-fetch-wait-ms",
        "10",
        "--kafka-check-interval-ms",
        "200",
    ]
    .map(String::from)
    .to_vec()
}

/// Deletes `counter` and creates it again, empty. Tansu 0.6 deletes every topic with it, so
/// `document` is created again too (an operator's Kafka would leave it).
fn recreate_counter(broker: &Broker) {
    broker.delete_topic("counter");
    broker.create_topic("counter", 3);
    broker.create_topic("document", 1);
}

fn produce(broker: &Broker, count: usize, base: i64) {
    let records: Vec<(String, Vec<u8>)> =
        (0..count).map(|i| (format!("m{}", i % 6), format!(r#"{{"add":{}}}"#, base + i as i64).into_bytes())).collect();
    produce_all(&broker.producer(), "counter", &records);
}

async fn readyz(client: &reqwest::Client, serve: &Serve) -> (u16, Value) {
    let response = client
        .get(format!("{}/readyz", serve.url))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}; stderr: {}", std::fs::read_to_string(&serve.stderr).unwrap_or_default()));
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Polls `/readyz` until `done` holds.
async fn wait_readyz(client: &reqwest::Client, serve: &Serve, what: &str, done: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = readyz(client, serve).await;
        if done(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 60 s: {status} {body}; stderr: {}",
            std::fs::read_to_string(&serve.stderr).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/readyz` says a kind's folding is stopped.
fn stopped(status: u16, body: &Value) -> bool {
    status == 503 && body["error"]["message"].as_str().is_some_and(|m| m.contains("is stopped"))
}

/// Records of `counter` folded, per `/readyz`.
fn folded(body: &Value) -> u64 {
    let partitions = body["partitions"].as_array().unwrap();
    partitions.iter().filter(|p| p["topic"] == "counter").filter_map(|p| p["next"].as_u64()).sum()
}

fn stop(serve: &mut Serve) {
    serve.signal("KILL");
    serve.wait();
}

/// `statefold reset KIND` with the server's flags.
fn reset(dir: &Path, broker: &Broker, kind: &str) -> String {
    let counter = statefold_tests::wasm("counter");
    let mut args: Vec<String> = vec!["reset".into(), kind.into(), "--data-dir".into()];
    args.push(dir.join("data").display().to_string());
    args.push("--reducers-dir".into());
    args.push(counter.parent().unwrap().display().to_string());
    args.extend(flags(broker));
    let output = std::process::Command::new(statefold_tests::statefold_binary()).args(&args).output().unwrap();
    assert!(output.status.success(), "reset failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// Each model's (state, hash, seq) as a fold of what the topic holds.
fn reference(broker: &Broker) -> BTreeMap<String, (i64, Hash, u64)> {
    let mut out: BTreeMap<String, (i64, Hash, u64)> = BTreeMap::new();
    for (_, _, key, value) in broker.read_all("counter", 3) {
        let id = String::from_utf8(key.unwrap()).unwrap();
        let add = serde_json::from_slice::<Value>(&value).unwrap()["add"].as_i64().unwrap();
        let entry = out.entry(id.clone()).or_insert_with(|| (0, Hash::genesis("counter", &id), 0));
        *entry = (entry.0 + add, entry.1.next(&value), entry.2 + 1);
    }
    out
}

async fn assert_equals_reference(client: &reqwest::Client, serve: &Serve, broker: &Broker) {
    for (id, (sum, hash, seq)) in reference(broker) {
        let model: Value =
            client.get(format!("{}/v1/models/counter/{id}", serve.url)).send().await.unwrap().json().await.unwrap();
        assert_eq!(
            (model["state"].as_i64(), model["hash"].as_str(), model["seq"].as_u64()),
            (Some(sum), Some(hash.to_string().as_str()), Some(seq)),
            "{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_stops_its_kind_until_reset_then_refolds_from_the_new_log() {
    let broker = Broker::with_example_topics();
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut serve = Serve::spawn(dir.path(), &flags(&broker));
    produce(&broker, 30, 1);
    wait_readyz(&client, &serve, "the first 30 records folded", |s, b| s == 200 && folded(b) == 30).await;
    let before: Value =
        client.get(format!("{}/v1/models/counter/m0", serve.url)).send().await.unwrap().json().await.unwrap();
    stop(&mut serve);

    // The topic is deleted and recreated, and grows past the stored positions with other
    // records: read from the stored positions, it would fold a different log silently.
    recreate_counter(&broker);
    produce(&broker, 90, 1000);
    let mut serve = Serve::spawn(dir.path(), &flags(&broker));
    let body = wait_readyz(&client, &serve, "unready, naming the kind", stopped).await;
    let message = body["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("counter") && message.contains("deleted and recreated"), "{body}");
    assert_eq!(folded(&body), 30, "nothing of the new topic folded: {body}");
    let metrics = client.get(format!("{}/metrics", serve.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("statefold_kind_stopped{kind=\"counter\"} 1"), "{metrics}");
    assert!(metrics.contains("statefold_kind_stopped{kind=\"document\"} 0"), "{metrics}");
    let log = std::fs::read_to_string(&serve.stderr).unwrap();
    assert!(log.contains("stopped folding the topic"), "{log}");
    // Writes to the stopped kind are refused and store nothing; reads answer what was folded.
    let append = client.post(format!("{}/v1/models/counter/m0/diffs", serve.url)).body(r#"{"add":1}"#).send();
    let answer = append.await.unwrap();
    assert_eq!(answer.status(), 503);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "kind_stopped", "{answer}");
    let now: Value =
        client.get(format!("{}/v1/models/counter/m0", serve.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(now, before, "the stopped kind serves what it had folded");
    // The other kind goes on.
    let created = client.post(format!("{}/v1/models/document", serve.url)).body(r#"{"id":"d1"}"#).send().await.unwrap();
    assert_eq!(created.status(), 201);
    let path = format!("{}/v1/models/document/d1/diffs?wait=applied", serve.url);
    let applied = client.post(path).body(r#"{"title":"still folding"}"#).send().await.unwrap();
    assert_eq!(applied.status(), 200, "{:?}", applied.text().await);
    assert_eq!(broker.read_all("counter", 3).len(), 90, "the refused append is not in the log");
    stop(&mut serve);

    // The operator resets the kind: the next start folds the new topic from its start.
    let said = reset(dir.path(), &broker, "counter");
    assert!(said.contains("reset counter: 6 models forgotten"), "{said}");
    let mut serve = Serve::spawn(dir.path(), &flags(&broker));
    wait_readyz(&client, &serve, "the new topic folded", |s, b| s == 200 && folded(b) == 90).await;
    assert_equals_reference(&client, &serve, &broker).await;
    let document: Value =
        client.get(format!("{}/v1/models/document/d1", serve.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(document["state"]["title"], "still folding", "the other kind kept its state: {document}");

    // Deleted and recreated again, now shorter than what was folded: the stored position is
    // past the log's end. (Under a running server the checker finds this too; not tested
    // here: deleting a topic on Tansu 0.6 under a live librdkafka consumer crashed the
    // consumer's process in librdkafka.)
    stop(&mut serve);
    recreate_counter(&broker);
    produce(&broker, 3, 5000);
    let serve = Serve::spawn(dir.path(), &flags(&broker));
    let body = wait_readyz(&client, &serve, "unready at start", stopped).await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("before the stored position"), "{body}");
}
