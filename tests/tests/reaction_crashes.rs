//! Reactions relayed to Kafka while `statefold serve`, default config, is SIGKILLed 20 times
//! or more during ingestion: a plain downstream consumer (no de-duplication) reads every
//! reaction of 20,000 diffs exactly once, in per-model order, equal to a reference fold's
//! reactions.
//!
//! Tansu 0.6 has no EndTxn handler, so this is the relay without transactions (the
//! default): acknowledged produces, then the position committed; a kill between the two
//! leaves a run written and not recorded, which the next start reads back from the output
//! partitions (from the relay's marks) and skips. With that read-back disabled, the same
//! run writes copies and this test fails on the first one.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use rand::RngExt;
use serde_json::{Value, json};
use statefold_tests::broker::{Broker, produce_all};
use statefold_tests::process::Serve;

const MODELS: usize = 100;
const DIFFS: usize = 20_000;
/// Kills at least, and on until 3 of them fell inside a run (each does with a chance of
/// about 1 in 3 here), at most `KILLS_MAX`.
const KILLS: usize = 20;
const KILLS_MAX: usize = 60;
const HITS: usize = 3;
const PARTITIONS: u32 = 3;
/// Runs of a few hundred milliseconds on Tansu: a kill while the relay works through the
/// backlog of a restart most likely falls between a run's first acknowledged record and its
/// position's commit, which leaves a run written and not recorded.
const RELAY_BATCH: usize = 2000;

/// (records folded, outbox pending, ready) from `/readyz`.
async fn progress(client: &reqwest::Client, serve: &Serve) -> Option<(u64, u64, bool)> {
    let response = client.get(format!("{}/readyz", serve.url)).send().await.ok()?;
    let ready = response.status() == 200;
    let body: Value = response.json().await.ok()?;
    let next =
        body["partitions"].as_array()?.iter().filter(|p| p["topic"] == "ctx").filter_map(|p| p["next"].as_u64()).sum();
    Some((next, body["outbox"]["pending"].as_u64()?, ready))
}

/// How many starts so far found a run written past their position (each logs it).
fn recoveries(dir: &std::path::Path) -> usize {
    let mut found = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("stderr-")) {
            found +=
                std::fs::read_to_string(&path).unwrap().matches("relay recovery: reactions already written").count();
        }
    }
    found
}

/// Reactions this server's life relayed (`statefold_reactions_relayed_total`).
async fn relayed(client: &reqwest::Client, serve: &Serve) -> Option<u64> {
    let text = client.get(format!("{}/metrics", serve.url)).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix("statefold_reactions_relayed_total ")).and_then(|n| n.trim().parse().ok())
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
    while at_kills.len() < KILLS || (recoveries(dir.path()) < HITS && at_kills.len() < KILLS_MAX) {
        // Once this life's relay has relayed its first run, at a random moment after the
        // read-backs of its other partitions (tens of milliseconds each), while it works
        // through the backlog the kills leave.
        let deadline = Instant::now() + Duration::from_secs(30);
        while relayed(&client, &serve).await.unwrap_or(0) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..500))).await;
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

    // Every record as a plain consumer reads it (read uncommitted), none dropped.
    let relayed = broker.read_records("echoes", PARTITIONS);
    let mut got: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut ids = HashSet::new();
    let mut copies = Vec::new();
    for record in &relayed {
        let header = |name: &str| {
            record.headers.iter().find(|(n, _)| n == name).map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        let id = header("statefold-reaction-id").expect("every reaction carries its identity");
        let model = header("statefold-model").expect("and its model");
        assert_eq!(record.key.as_deref(), Some(model.as_bytes()), "keyed by the model");
        if !ids.insert(id.clone()) {
            copies.push((id, record.partition, record.offset));
        }
        got.entry(model).or_default().push(serde_json::from_slice(&record.value).unwrap());
    }
    // Each start that found reactions written past its position says so: the kills hit the
    // window this test is about (else it proves nothing).
    let recovered = recoveries(dir.path());
    let kills = at_kills.len();
    println!(
        "{} reactions read after {kills} kills, {recovered} starts found a run written past their position (kills at (folded, pending): {at_kills:?})",
        relayed.len()
    );
    if !copies.is_empty() {
        // What each life's relay did, oldest first, to tell where the copies came from.
        let mut logs: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        logs.sort();
        for path in logs.iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("stderr-"))) {
            let text = std::fs::read_to_string(path).unwrap();
            eprintln!("--- {}", path.display());
            text.lines().filter(|l| l.contains("relay")).for_each(|l| eprintln!("{l}"));
        }
        let last = copies.last().unwrap();
        panic!("{} copies, the first: {:?}, the last: {last:?}", copies.len(), copies.first());
    }
    assert_eq!(got, reference, "every reaction, once, in each model's order");
    assert!(recovered > 0, "no kill fell between a run's produce and its position's commit");
}

/// A new user's first run: the example kinds on the tests' broker, `[reactions]` as it comes.
/// Until the reaction topic exists the relay cannot produce, and `/readyz` says so (503,
/// the reason naming the topic) within seconds; once it exists, the one finished run's
/// reaction reaches it, once: a plain consumer still reads exactly one record 8 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_config_server_relays_a_finished_run_once_and_says_when_it_cannot() {
    use statefold::config::{KafkaConfig, Limits};
    use statefold_tests::http::{TestServer, example_config};

    let broker = Broker::with_example_topics();
    let dir = tempfile::tempdir().unwrap();
    let mut config = example_config(dir.path(), Limits::default());
    config.kafka = Some(KafkaConfig::new(&broker.brokers()));
    assert_eq!(config.reactions, statefold::config::ReactionsConfig::default());
    let server = TestServer::start_config(dir, config).await;

    let producer = broker.producer();
    let run = [
        json!({"op": "plan", "steps": ["build"]}).to_string().into_bytes(),
        json!({"op": "start", "step": "build", "at": 1}).to_string().into_bytes(),
        json!({"op": "complete", "step": "build", "at": 2}).to_string().into_bytes(),
        json!({"op": "finish", "status": "succeeded", "at": 3}).to_string().into_bytes(),
    ];
    let diffs: Vec<(String, Vec<u8>)> = run.iter().map(|d| ("run-1".to_string(), d.clone())).collect();
    produce_all(&producer, "workflow", &diffs);

    // No `workflow-finished` topic yet: unready, with the reason.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = server.get("/readyz").await;
        if status == 503 && body["error"]["message"].as_str().is_some_and(|m| m.contains("workflow-finished")) {
            break (status, body);
        }
        assert!(Instant::now() < deadline, "the relay's problem never reached /readyz: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((status, body["outbox"]["pending"].as_u64()), (503, Some(1)), "{body}");
    let run_state = server.get("/v1/models/workflow/run-1").await;
    assert_eq!(run_state.1["state"]["status"], "succeeded", "{run_state:?}");

    broker.create_topic("workflow-finished", 3);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = server.get("/readyz").await;
        if status == 200 && body["outbox"]["pending"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the reaction was not relayed: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let records = broker.read_records("workflow-finished", 3);
    assert_eq!(records.len(), 1, "one finished run, one reaction: {records:?}");
    assert_eq!(records[0].key.as_deref(), Some(&b"run-1"[..]));
    let reaction: Value = serde_json::from_slice(&records[0].value).unwrap();
    assert_eq!((reaction["run"].as_str(), reaction["status"].as_str()), (Some("run-1"), Some("succeeded")));
    assert_eq!(records[0].partition, statefold::model::partition_of(b"run-1", 3), "the key's murmur2 partition");
}
