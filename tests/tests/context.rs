//! What a reducer is fed (issue 17, item 4): the `context` reducer keeps each diff's
//! context (offset, timestamp, headers, the hash before it) in its state. On two replicas
//! of a real Tansu topic, the state is the reference fold of what the log holds after a
//! live fold with constant eviction and rebuilds (two resident models for six), a deploy, a
//! replay (a new chain from `Hash::rebase`), and `statefold verify`'s refold.

use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use serde_json::{Value, json};
use statefold::chain::Hash;
use statefold::config::{Config, KafkaConfig, KindConfig, Limits};
use statefold::model::Record;
use statefold_tests::broker::Broker;
use statefold_tests::http::{TestServer, example_config, json_of};

const MODELS: usize = 6;

fn config(dir: &std::path::Path, broker: &Broker) -> Config {
    let limits = Limits {
        kafka_fetch_wait_ms: 10,
        kafka_check_interval_ms: 200,
        reducer_resident_models_max: 2,
        checkpoint_interval_diffs: 3,
        checkpoint_tail_percent: 0,
        retain_checkpoints: 1000,
        ..Limits::default()
    };
    let mut config = example_config(dir, limits);
    config.kinds = vec![KindConfig { name: "context".into(), reducer: statefold_tests::wasm("context"), topic: None }];
    config.kafka = Some(KafkaConfig::new(&broker.brokers()));
    config
}

/// `count` diffs round-robin over the models, each with headers and its own timestamp.
fn produce(broker: &Broker, from: usize, count: usize) {
    let producer = broker.producer();
    for i in from..from + count {
        let key = format!("m{}", i % MODELS);
        let value = json!({ "n": i }).to_string();
        let trace = format!("t{i}");
        let headers = OwnedHeaders::new()
            .insert(Header { key: "trace", value: Some(trace.as_bytes()) })
            .insert(Header { key: "bin", value: Some(&[0u8, 1, 255][..]) });
        let record = BaseRecord::to("context")
            .key(&key)
            .payload(&value)
            .headers(headers)
            .timestamp(1_700_000_000_000 + i as i64);
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Each model's state as the reference fold of `records`. After a replay by `replayed`
/// (nothing pruned), the model's first version is the base of a new chain: the hash after
/// its first diff is rebased ([`Hash::rebase`]) and the rest chain from there.
fn reference(records: &[Record], replayed: Option<[u8; 32]>) -> Vec<(String, Value, Hash)> {
    (0..MODELS)
        .map(|m| {
            let id = format!("m{m}");
            let mut hash = Hash::genesis("context", &id);
            let mut seen = Vec::new();
            for record in records.iter().filter(|r| r.key.as_deref() == Some(id.as_bytes())) {
                let headers: Vec<Value> = record.headers.iter().map(|(n, v)| json!([n, hex(v)])).collect();
                let diff: Value = serde_json::from_slice(&record.value).unwrap();
                seen.push(json!({
                    "offset": record.offset,
                    "timestamp_ms": record.timestamp_ms,
                    "headers": headers,
                    "prev": hash.to_string(),
                    "diff": diff,
                }));
                hash = hash.next(&record.value);
                if let (Some(reducer), 1) = (replayed, seen.len()) {
                    hash = hash.rebase(&reducer);
                }
            }
            (id, Value::Array(seen), hash)
        })
        .collect()
}

/// Waits until every model on `server` is at the reference's hash, then compares states.
async fn assert_reference(server: &TestServer, expected: &[(String, Value, Hash)], what: &str) {
    for (id, state, hash) in expected {
        let path = format!("/v1/models/context/{id}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let model = loop {
            let (status, model) = server.get(&path).await;
            if status == 200 && model["hash"] == hash.to_string() {
                break model;
            }
            assert!(Instant::now() < deadline, "{what}: {id} never reached {hash}: {model}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(&model["state"], state, "{what}: {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reducer_is_fed_the_same_context_on_every_path_and_replica() {
    let broker = Broker::start();
    broker.create_topic("context", 2);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let data_b = dir_b.path().to_owned();
    let config_a = config(dir_a.path(), &broker);
    let config_b = config(&data_b, &broker);
    let a = TestServer::start_config(dir_a, config_a).await;
    let b = TestServer::start_config(dir_b, config_b).await;

    // Live, with two resident models for six: every model is evicted and rebuilt from its
    // checkpoint and stored diffs over and over.
    produce(&broker, 0, 48);
    let expected = reference(&broker.read_records("context", 2), None);
    for server in [&a, &b] {
        assert_reference(server, &expected, "live").await;
    }

    // A deploy (the same code, another module: a custom section appended) through one
    // replica; later diffs are applied by the new version on both.
    let mut module = std::fs::read(statefold_tests::wasm("context")).unwrap();
    module.extend_from_slice(&[0x00, 0x08, 0x03, b'v', b'e', b'r', b'2', b'2', b'2', b'2']);
    let response = a.client.put(a.url("/v1/reducers/context")).body(module).send().await.unwrap();
    let (status, deployed) = json_of(response).await;
    assert_eq!((status, deployed["unchanged"].as_bool()), (200, Some(false)), "{deployed}");
    produce(&broker, 48, 12);
    let expected = reference(&broker.read_records("context", 2), None);
    for server in [&a, &b] {
        assert_reference(server, &expected, "after a deploy").await;
    }

    // A replay through the other replica: every model rebuilt by the active version, its
    // chain restarting from its first version, rebased.
    let (status, job) = b.post("/v1/kinds/context/replay", "").await;
    assert_eq!(status, 202, "{job}");
    let version = deployed["version"]["version"].as_str().unwrap();
    let reducer: [u8; 32] = (0..32)
        .map(|i| u8::from_str_radix(&version[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let records: Vec<Record> =
        broker.read_records("context", 2).into_iter().filter(|r| r.header("statefold-replay").is_none()).collect();
    let records: Vec<Record> = records.into_iter().filter(|r| r.header("statefold-deploy").is_none()).collect();
    let expected = reference(&records, Some(reducer));
    for server in [&a, &b] {
        assert_reference(server, &expected, "after a replay").await;
    }

    // `statefold verify` refolds the log beside the running replica and finds it equal.
    let wasm = statefold_tests::wasm("context");
    let output = std::process::Command::new(statefold_tests::statefold_binary())
        .arg("verify")
        .args(["--kind", "context=context.wasm", "--reducers-dir"])
        .arg(wasm.parent().unwrap())
        .args(["--kafka-brokers", &broker.brokers(), "--kafka-fetch-wait-ms", "10", "--data-dir"])
        .arg(&data_b)
        .args(["--checkpoint-interval-diffs", "3", "--checkpoint-tail-percent", "0", "--retain-checkpoints", "1000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains(&format!("{MODELS} models compared, 0 mismatched")),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
