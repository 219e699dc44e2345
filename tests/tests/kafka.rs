//! Statefold folding from a real Kafka-compatible broker (Tansu, started per test): poison
//! records recorded and skipped, appends through the API produced to Kafka, and records
//! produced by another team's client (Python's confluent-kafka).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::producer::BaseRecord;
use serde_json::json;
use statefold::chain::Hash;
use statefold::config::{Config, KafkaConfig, Limits};
use statefold_tests::broker::{Broker, produce_all};
use statefold_tests::http::{TestServer, example_config};

fn kafka_config(dir: &std::path::Path, broker: &Broker, limits: Limits) -> Config {
    let mut config = example_config(dir, limits);
    config.kafka = Some(KafkaConfig::new(&broker.brokers()));
    config
}

fn limits() -> Limits {
    Limits { kafka_fetch_wait_ms: 10, kafka_check_interval_ms: 200, ..Limits::default() }
}

/// Polls `GET path` until `done` holds for its body.
async fn wait_for(server: &TestServer, path: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = server.get(path).await;
        if status == 200 && done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "GET {path} never got there: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_recorded_and_skipped_and_their_partition_goes_on() {
    let broker = Broker::with_example_topics();
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(dir.path(), &broker, Limits { diff_bytes_max: 1024, ..limits() });
    let server = TestServer::start_config(dir, config).await;

    // Another service produces straight to the topics: good and poison records mixed.
    let producer = broker.producer();
    let big = json!({"add": 1, "pad": "x".repeat(2000)}).to_string();
    let counter: Vec<(Option<&str>, String)> = vec![
        (Some("m1"), r#"{"add":1}"#.into()),
        (None, r#"{"add":11}"#.into()),                     // no key
        (Some("bad\u{1}id"), r#"{"add":12}"#.into()),       // invalid key
        (Some("m1"), big),                                  // over diff_bytes_max
        (Some("m1"), format!(r#"{{"add":{}}}"#, i64::MAX)), // refused: overflow
        (Some("m1"), "not json".into()),                    // refused: malformed
        (Some("m1"), r#"{"add":2}"#.into()),
    ];
    for (key, value) in &counter {
        let mut record = BaseRecord::<str, str>::to("counter").payload(value.as_str());
        if let Some(key) = key {
            record = record.key(key);
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    // Every partition keeps going after its poison: ten more models, spread over all three.
    let more: Vec<(String, Vec<u8>)> = (0..10).map(|i| (format!("n{i}"), br#"{"add":7}"#.to_vec())).collect();
    produce_all(&producer, "counter", &more);
    let trap = |diff: &str| ("t1".to_owned(), diff.as_bytes().to_vec());
    produce_all(&producer, "trap", &[trap(r#""inc""#), trap(r#""trap""#), trap(r#""trap""#), trap(r#""inc""#)]);

    let m1 = wait_for(&server, "/v1/models/counter/m1", |b| b["seq"] == 2).await;
    assert_eq!(m1["state"], 3, "only the good diffs are applied: {m1}");
    let hash = Hash::genesis("counter", "m1").next(br#"{"add":1}"#).next(br#"{"add":2}"#);
    assert_eq!(m1["hash"], hash.to_string(), "the chain covers applied diffs only");
    for i in 0..10 {
        wait_for(&server, &format!("/v1/models/counter/n{i}"), |b| b["state"] == 7).await;
    }

    // Each rejection is listed with the record's partition and offset, as read back from Kafka.
    let records = broker.read_all("counter", 3);
    let where_is = |value: &[u8]| {
        let found = records.iter().find(|(_, _, _, v)| v == value).expect("the record is in the topic");
        (found.0, found.1)
    };
    let (_, listed) = server.get("/v1/kinds/counter/rejections").await;
    let listed: Vec<(u64, u64, String)> = listed["rejections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (r["partition"].as_u64().unwrap(), r["offset"].as_u64().unwrap(), r["code"].as_str().unwrap().to_owned())
        })
        .collect();
    let expected_codes = ["invalid_key", "invalid_key", "too_large", "refused", "refused"];
    let mut expected: Vec<(u64, u64, String)> = counter[1..6]
        .iter()
        .zip(expected_codes)
        .map(|((_, value), code)| {
            let (partition, offset) = where_is(value.as_bytes());
            (u64::from(partition), offset, code.to_owned())
        })
        .collect();
    expected.sort();
    assert_eq!(listed, expected);

    let (_, trap) = server.get("/v1/kinds/trap/rejections").await;
    let trap = trap["rejections"].as_array().unwrap().clone();
    assert_eq!(trap.len(), 2, "{trap:?}");
    assert!(trap.iter().all(|r| r["code"] == "reducer_failed" && r["key"] == "t1"), "{trap:?}");
    let t1 = wait_for(&server, "/v1/models/trap/t1", |b| b["seq"] == 2).await;
    assert_eq!(t1["state"], 2, "a trap fails only its own diff: {t1}");

    // Paging through rejections.
    let (_, page) = server.get("/v1/kinds/counter/rejections?limit=2").await;
    assert_eq!(page["rejections"].as_array().unwrap().len(), 2);
    let next = page["next"].as_str().unwrap().to_owned();
    let (_, rest) = server.get(&format!("/v1/kinds/counter/rejections?after={next}")).await;
    assert_eq!(rest["rejections"].as_array().unwrap().len(), 3);
    let (status, bad) = server.get("/v1/kinds/counter/rejections?after=nope").await;
    assert_eq!((status, bad["error"]["code"].as_str()), (400, Some("bad_query")));

    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        "statefold_records_rejected_total{code=\"invalid_key\"} 2",
        "statefold_records_rejected_total{code=\"too_large\"} 1",
        "statefold_records_rejected_total{code=\"refused\"} 2",
        "statefold_records_rejected_total{code=\"reducer_failed\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_produced_to_kafka_and_answered_once_folded() {
    let broker = Broker::with_example_topics();
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(dir.path(), &broker, limits());
    let server = TestServer::start_config(dir, config).await;

    let (status, created) = server.post("/v1/models/counter", json!({"id": "api"}).to_string()).await;
    assert_eq!(status, 201, "{created}");
    let mut hash = Hash::genesis("counter", "api");
    assert_eq!(created["hash"], hash.to_string());
    for n in 1..=20 {
        let diff = format!(r#"{{"add":{n}}}"#);
        let (status, version) = server.post("/v1/models/counter/api/diffs?wait=applied", diff.clone()).await;
        assert_eq!(status, 200, "{version}");
        hash = hash.next(diff.as_bytes());
        assert_eq!((version["seq"].as_u64(), version["hash"].as_str()), (Some(n), Some(hash.to_string().as_str())));
    }
    let (status, refused) =
        server.post("/v1/models/counter/api/diffs?wait=applied", format!(r#"{{"add":{}}}"#, i64::MAX)).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("refused")), "{refused}");
    let (status, again) = server.post("/v1/models/counter", json!({"id": "api"}).to_string()).await;
    assert_eq!((status, again["error"]["code"].as_str()), (409, Some("model_exists")));

    // The records are in the topic, keyed by model id, one partition for the model.
    let records = broker.read_all("counter", 3);
    let mine: Vec<_> = records.iter().filter(|(_, _, k, _)| k.as_deref() == Some(b"api")).collect();
    assert_eq!(mine.len(), 22, "create, 20 diffs, the refused one");
    assert!(mine.iter().all(|r| r.0 == mine[0].0), "one partition per model");

    let (_, ready) = server.get("/readyz").await;
    assert_eq!(ready["ready"], true, "{ready}");
    let partitions = ready["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 6, "counter's 3, and 1 each for the other kinds: {ready}");
}

/// What another team's service does: produce diffs with its own Kafka client, with the
/// partitioner given (`murmur2_random`, as docs/kafka.md asks, or librdkafka's default).
const PYTHON_PRODUCER: &str = r#"
import json, sys
from confluent_kafka import Producer
brokers, count, prefix, partitioner = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
settings = {"bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all"}
if partitioner != "default":
    settings["partitioner"] = partitioner
p = Producer(settings)
failed = []
for i in range(count):
    model = "%s%d" % (prefix, i % 10)
    p.produce("counter", key=model, value=json.dumps({"add": i}),
              on_delivery=lambda err, msg: err and failed.append(str(err)))
    p.poll(0)
left = p.flush(60)
if failed or left:
    sys.exit("not delivered: %r, %d left" % (failed[:3], left))
"#;

/// Runs [`PYTHON_PRODUCER`]: `count` diffs over ten models named `prefix0..9`.
fn python_produce(brokers: &str, count: usize, prefix: &str, partitioner: &str) {
    let python = std::env::var("STATEFOLD_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = std::process::Command::new(&python)
        .args(["-c", PYTHON_PRODUCER, brokers, &count.to_string(), prefix, partitioner])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        output.status.success(),
        "the Python producer failed (./dev.sh test installs confluent-kafka and sets STATEFOLD_PYTHON): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diffs_from_another_teams_python_producer_are_folded() {
    let broker = Broker::with_example_topics();
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(dir.path(), &broker, limits());
    let server = TestServer::start_config(dir, config).await;

    python_produce(&broker.brokers(), 1000, "py", "murmur2_random");

    // The reference fold of what is in the topic: librdkafka's murmur2_random put every
    // record on the partition Statefold computes for its model.
    let (reference, rejected) = reference_with_partitions(&broker);
    assert_eq!(rejected, [], "records off their model's partition");
    assert_eq!(reference.len(), 10);
    for (id, (sum, hash, seq)) in &reference {
        let model = wait_for(&server, &format!("/v1/models/counter/{id}"), |b| b["seq"] == *seq).await;
        assert_eq!((&model["state"], &model["hash"]), (&json!(sum), &json!(hash.to_string())), "{id}");
    }
}

/// Each model's (sum, hash, seq).
type Reference = BTreeMap<String, (i64, Hash, u64)>;

/// The reference fold of the `counter` topic: a record on its key's partition (the Java
/// client's partitioner) is applied, any other is rejected `wrong_partition`.
fn reference_with_partitions(broker: &Broker) -> (Reference, Vec<(u64, u64)>) {
    let mut reference = Reference::new();
    let mut rejected = Vec::new();
    for (partition, offset, key, value) in broker.read_all("counter", 3) {
        let id = String::from_utf8(key.unwrap()).unwrap();
        if statefold::model::partition_of(id.as_bytes(), 3) != partition {
            rejected.push((u64::from(partition), offset));
            continue;
        }
        let entry = reference.entry(id.clone()).or_insert((0, Hash::genesis("counter", &id), 0));
        if value.is_empty() {
            continue; // the API's create record
        }
        entry.0 += serde_json::from_slice::<serde_json::Value>(&value).unwrap()["add"].as_i64().unwrap();
        entry.1 = entry.1.next(&value);
        entry.2 += 1;
    }
    rejected.sort();
    (reference, rejected)
}

/// Issue 17's reproduction: two replicas on a 3-partition topic; half of 20 models written by
/// a Python service with librdkafka's default partitioner (`consistent_random`), half through
/// one server's API. Records off their model's partition are rejected `wrong_partition` on
/// both replicas alike, whatever the fetch timing; no replica stops; both agree with the
/// reference fold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_off_their_models_partition_are_rejected_alike_on_every_replica() {
    let broker = Broker::with_example_topics();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config_a = kafka_config(dir_a.path(), &broker, limits());
    let config_b = kafka_config(dir_b.path(), &broker, limits());
    let a = TestServer::start_config(dir_a, config_a).await;
    let b = TestServer::start_config(dir_b, config_b).await;

    // The same ids through both paths: the API's appends land on the key's partition, the
    // Python producer's on crc32's, which for most keys is another.
    for i in 0..10 {
        a.create("counter", &format!("doc{i}")).await;
    }
    let brokers = broker.brokers();
    let python = tokio::task::spawn_blocking(move || python_produce(&brokers, 200, "doc", "default"));
    for round in 0..20 {
        for i in 0..10 {
            let (status, body) =
                a.post(&format!("/v1/models/counter/doc{i}/diffs"), format!(r#"{{"add":{round}}}"#)).await;
            assert_eq!(status, 202, "{body}");
        }
    }
    python.await.unwrap();

    let (reference, rejected) = reference_with_partitions(&broker);
    assert!(!rejected.is_empty(), "crc32 put some records off their model's partition");
    assert_eq!(reference.len(), 10);
    for server in [&a, &b] {
        for (id, (sum, hash, seq)) in &reference {
            let model = wait_for(server, &format!("/v1/models/counter/{id}"), |m| m["seq"] == *seq).await;
            assert_eq!((&model["state"], &model["hash"]), (&json!(sum), &json!(hash.to_string())), "{id}");
        }
        let (_, listed) = server.get("/v1/kinds/counter/rejections?limit=1000").await;
        let listed = listed["rejections"].as_array().unwrap();
        let mut got: Vec<(u64, u64)> =
            listed.iter().map(|r| (r["partition"].as_u64().unwrap(), r["offset"].as_u64().unwrap())).collect();
        got.sort();
        assert_eq!(got, rejected, "the same records rejected on each replica");
        assert!(listed.iter().all(|r| r["code"] == "wrong_partition"), "{listed:?}");
        let message = listed[0]["message"].as_str().unwrap();
        assert!(message.contains("murmur2"), "the rejection says which partitioner: {message}");
        let (status, ready) = server.get("/readyz").await;
        assert_eq!(status, 200, "producer input never stops a server: {ready}");
    }
}

/// The Kafka side of the documented errors, each asserted alone: `wait_timeout` (a record
/// not folded within `wait_applied_ms_max`), `invalid_deploy` (a deploy record whose module
/// cannot load), and with the broker down `unavailable` (an append the log did not take:
/// nothing is stored) and `/readyz`'s `not_ready`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_errors_answer_alone_and_a_refused_append_stores_nothing() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::Producer;

    let mut broker = Broker::with_example_topics();
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits { wait_applied_ms_max: 300, kafka_produce_timeout_ms: 1000, ..limits() };
    let config = kafka_config(dir.path(), &broker, limits.clone());
    let server = TestServer::start_config(dir, config).await;
    server.create("counter", "m").await;
    server.apply("counter", "m", r#"{"add":1}"#).await;

    // A record this server will not have folded within wait_applied_ms_max.
    let (status, body) = server.get("/v1/models/counter/m?folded=0:1000000").await;
    assert_eq!((status, body["error"]["code"].as_str()), (504, Some("wait_timeout")), "{body}");

    // A deploy record carrying no reducer: rejected where it is folded, the partition goes on.
    let producer = broker.producer();
    let headers = OwnedHeaders::new().insert(Header { key: "statefold-deploy", value: Some("document") });
    let record = BaseRecord::<[u8], [u8]>::to("document").key(b"x").payload(b"not a module").headers(headers);
    producer.send(record).map_err(|(e, _)| e).unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    let listed = wait_for(&server, "/v1/kinds/document/rejections", |b| b["rejections"][0].is_object()).await;
    assert_eq!(listed["rejections"][0]["code"], "invalid_deploy", "{listed}");
    server.create("document", "d").await;
    server.apply("document", "d", r#"{"still":"folding"}"#).await;

    let records_before = broker.read_all("counter", 3).len();
    broker.stop();
    let (status, body) = server.post("/v1/models/counter/m/diffs", r#"{"add":1000}"#).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("unavailable")), "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, ready) = server.get("/readyz").await;
        if status == 503 {
            assert_eq!(ready["error"]["code"], "not_ready", "{ready}");
            break;
        }
        assert!(Instant::now() < deadline, "still ready with the broker down: {ready}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.restart();
    wait_for(&server, "/readyz", |b| b["ready"] == true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(broker.read_all("counter", 3).len(), records_before, "the refused append is not in the log");
    let model = wait_for(&server, "/v1/models/counter/m", |_| true).await;
    assert_eq!(model["state"], 1, "{model}");

    // A produce queue that cannot take the record (kafka_produce_queue_bytes_max): 503
    // `unavailable` at once, nothing stored.
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(dir.path(), &broker, Limits { kafka_produce_queue_bytes_max: 1024, ..limits.clone() });
    let small = TestServer::start_config(dir, config).await;
    wait_for(&small, "/v1/models/counter/m", |m| m["state"] == 1).await;
    let big = format!(r#"{{"add":1,"pad":"{}"}}"#, "x".repeat(8 << 10));
    let (status, body) = small.post("/v1/models/counter/m/diffs", big).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("unavailable")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("queue"), "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(broker.read_all("counter", 3).len(), records_before, "the refused append is not in the log");
}
