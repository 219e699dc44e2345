//! Reactions relayed to Kafka while `statefold serve` is SIGKILLed 20 times during
//! ingestion: a downstream consumer sees every reaction of 20,000 diffs, in per-model order,
//! equal to a reference fold's reactions, once each after de-duplicating by the
//! `statefold-reaction-id` header.
//!
//! Tansu 0.6 has no EndTxn handler (its router serves InitProducerId, AddPartitionsToTxn,
//! AddOffsetsToTxn and TxnOffsetCommit, not EndTxn: librdkafka reports "EndTxnRequest not
//! supported by broker"), so the transactional relay cannot commit a transaction here. The
//! test runs the relay for brokers without transactions (`--relay-at-least-once`):
//! acknowledged produces, then the position committed to the relay group. A kill between the
//! two re-sends at most one run (`relay_batch_records_max` reactions) per kill; the test
//! bounds the copies by that and checks what a de-duplicating consumer sees.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use rand::RngExt;
use serde_json::{Value, json};
use statefold_tests::broker::{Broker, produce_all};
use statefold_tests::process::Serve;

const MODELS: usize = 100;
const DIFFS: usize = 20_000;
const KILLS: usize = 20;
const PARTITIONS: u32 = 3;
const RELAY_BATCH: usize = 200;

/// (records folded, outbox pending, ready) from `/readyz`.
async fn progress(client: &reqwest::Client, serve: &Serve) -> Option<(u64, u64, bool)> {
    let response = client.get(format!("{}/readyz", serve.url)).send().await.ok()?;
    let ready = response.status() == 200;
    let body: Value = response.json().await.ok()?;
    let next =
        body["partitions"].as_array()?.iter().filter(|p| p["topic"] == "ctx").filter_map(|p| p["next"].as_u64()).sum();
    Some((next, body["outbox"]["pending"].as_u64()?, ready))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_during_ingestion_relay_every_reaction_once_in_order() {
    let broker = Broker::start();
    broker.create_topic("ctx", PARTITIONS);
    broker.create_topic("echoes", PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let flags: Vec<String> = [
        "--kind",
        "ctx=context.wasm",
        "--kafka-brokers",
        &broker.brokers(),
        "--kafka-fetch-wait-ms",
        "10",
        "--kafka-check-interval-ms",
        "200",
        "--batch-records-max",
        "500",
        "--relay-batch-records-max",
        &RELAY_BATCH.to_string(),
        "--relay-at-least-once",
    ]
    .map(String::from)
    .to_vec();
    let client = reqwest::Client::new();
    // Built before the producer starts: the kills must fall during ingestion.
    statefold_tests::statefold_binary();
    statefold_tests::wasm("context");

    // Another service produces 20,000 diffs that each emit, over about 20 s.
    let producer = broker.producer();
    let producing = std::thread::spawn(move || {
        let mut rng = rand::rng();
        let diffs: Vec<(String, Vec<u8>)> = (0..DIFFS)
            .map(|i| {
                (
                    format!("m{}", rng.random_range(0..MODELS)),
                    json!({"emit": "echoes", "i": i}).to_string().into_bytes(),
                )
            })
            .collect();
        for chunk in diffs.chunks(250) {
            produce_all(&producer, "ctx", chunk);
            std::thread::sleep(Duration::from_millis(200));
        }
    });

    let mut serve = Serve::spawn(dir.path(), &flags);
    let mut rng = rand::rng();
    let mut at_kills = Vec::new();
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(400..1200))).await;
        at_kills.push(progress(&client, &serve).await.map(|(next, pending, _)| (next, pending)));
        serve.signal("KILL");
        serve.wait();
        serve = Serve::spawn(dir.path(), &flags);
    }
    producing.join().expect("the producer thread");
    let folded_during: Vec<u64> = at_kills.iter().flatten().map(|(next, _)| *next).collect();
    assert!(folded_during.iter().any(|n| (*n as usize) < DIFFS), "kills happened during ingestion: {at_kills:?}");

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some((next, 0, true)) = progress(&client, &serve).await
            && next as usize == DIFFS
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not folded and relayed within 180 s: {:?}; stderr: {}",
            progress(&client, &serve).await,
            std::fs::read_to_string(&serve.stderr).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The reference: the context reducer's reactions to the diffs in the topic, per model.
    let mut reference: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for record in broker.read_records("ctx", PARTITIONS) {
        let id = String::from_utf8(record.key.clone().unwrap()).unwrap();
        let diff: Value = serde_json::from_slice(&record.value).unwrap();
        let seen = reference.entry(id).or_default();
        seen.push(json!({"n": seen.len() + 1, "diff": diff}));
    }
    assert_eq!(reference.values().map(Vec::len).sum::<usize>(), DIFFS);

    // Read uncommitted: without transactions (above) every record is committed, so it is the
    // same set.
    let relayed = broker.read_records("echoes", PARTITIONS);
    let mut first: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut ids = HashSet::new();
    let mut copies = 0;
    for record in &relayed {
        let header = |name: &str| {
            record.headers.iter().find(|(n, _)| n == name).map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        let id = header("statefold-reaction-id").expect("every reaction carries its identity");
        let model = header("statefold-model").expect("and its model");
        assert_eq!(record.key.as_deref(), Some(model.as_bytes()), "keyed by the model");
        if !ids.insert(id) {
            copies += 1;
            continue;
        }
        first.entry(model).or_default().push(serde_json::from_slice(&record.value).unwrap());
    }
    assert_eq!(first, reference, "every reaction, once, in each model's order");
    println!("{} reactions relayed, {copies} copies re-sent after the {KILLS} kills", relayed.len() - copies);
    assert!(copies <= KILLS * RELAY_BATCH, "{copies} copies: more than one run re-sent per kill");
}
