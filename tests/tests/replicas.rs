//! Several servers on one broker (a real Tansu), in-process: a gateway that takes writes
//! and a read-only replica. The three-server test with hopping clients, a deploy, a
//! SIGKILLed process and `statefold verify` runs the binary: `tests/replica_processes.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use statefold::config::{Config, KafkaConfig, Limits};
use statefold_tests::broker::Broker;
use statefold_tests::http::{TestServer, example_config};

fn config(dir: &std::path::Path, broker: &Broker) -> Config {
    let limits = Limits { kafka_fetch_wait_ms: 10, kafka_check_interval_ms: 200, ..Limits::default() };
    let mut config = example_config(dir, limits);
    config.kafka = Some(KafkaConfig::new(&broker.brokers()));
    config
}

/// A gateway that takes writes and a read-only stream server: writes through the gateway
/// are read on the other, which can wait for a given record (`?folded=P:O`); writes to the
/// read-only server are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replica_serves_what_the_gateway_wrote() {
    let broker = Broker::with_example_topics();
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
    let put = reader.client.put(reader.url("/v1/reducers/counter")).body(vec![0u8; 8]);
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

/// Three replicas, one of which rejects what the others apply (a smaller `diff_bytes_max`:
/// a configuration every replica must share). Their partition digests, exchanged through
/// the attestation topic, agree until then; then the odd one reports itself diverged and
/// goes unready, and the other two stay ready and name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_folds_differently_is_detected_and_taken_out_of_service() {
    let broker = Broker::with_example_topics();
    broker.create_topic("statefold-attestations", 1);
    let mut servers = Vec::new();
    for odd in [false, false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), &broker);
        config.limits.attest_interval_records = 10;
        if odd {
            config.limits.diff_bytes_max = 64;
        }
        servers.push(TestServer::start_config(dir, config).await);
    }
    servers[0].create("counter", "m").await;
    let append = async |server: &TestServer, diff: &str| {
        let (status, body) = server.post("/v1/models/counter/m/diffs", diff.to_owned()).await;
        assert_eq!(status, 202, "{body}");
        format!("{}:{}", body["partition"], body["offset"])
    };
    let readyz = async |server: &TestServer| server.get("/readyz").await;
    // Until the wide diff, every replica agrees with every other.
    let mut last = String::new();
    for n in 0..60 {
        last = append(&servers[n % 3], r#"{"add":1}"#).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for server in &servers {
        loop {
            let (status, body) = readyz(server).await;
            let peers = body["replicas"]["peers"].as_array().cloned().unwrap_or_default();
            if status == 200 && peers.len() == 2 && peers.iter().all(|p| p["agrees"] == true) {
                break;
            }
            assert!(Instant::now() < deadline, "replicas never compared their digests: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, model) = server.get(&format!("/v1/models/counter/m?folded={last}")).await;
        assert_eq!(model["state"], json!(60), "{model}");
    }

    // A diff of 100 bytes: applied by two, rejected `too_large` by the third. Then more
    // diffs, so the partition passes more attestation points.
    let wide = format!(r#"{{"add":1{}}}"#, " ".repeat(100));
    append(&servers[0], &wide).await;
    for n in 0..30 {
        last = append(&servers[n % 2], r#"{"add":1}"#).await;
    }
    let (_, odd) = servers[2].get(&format!("/v1/models/counter/m?folded={last}")).await;
    let (_, even) = servers[0].get(&format!("/v1/models/counter/m?folded={last}")).await;
    assert_eq!(
        (odd["state"].clone(), even["state"].clone()),
        (json!(90), json!(91)),
        "the odd one rejected the wide diff"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = readyz(&servers[2]).await;
        if status == 503 {
            assert_eq!(body["error"]["code"], "diverged", "{body}");
            assert!(body["error"]["message"].as_str().unwrap().contains("statefold verify"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "the odd replica never noticed: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let odd_id = readyz(&servers[2]).await.1["replicas"]["server"].as_str().unwrap().to_owned();
    for server in &servers[..2] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = readyz(server).await;
            assert_eq!(status, 200, "a replica in the majority stays in service: {body}");
            let peers = body["replicas"]["peers"].as_array().unwrap().clone();
            let disagreeing: Vec<&Value> = peers.iter().filter(|p| p["agrees"] == false).collect();
            if disagreeing.len() == 1 {
                assert_eq!(disagreeing[0]["server"], odd_id.as_str(), "{body}");
                break;
            }
            assert!(Instant::now() < deadline, "the majority never saw the odd one: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let metrics = servers[2].client.get(servers[2].url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("statefold_replica_diverged 1"), "{metrics}");
}

/// A deploy and a replay through one of three replicas while diffs keep arriving through
/// all: both are records in the log, so every replica rebuilds every model for the replay
/// at the same place (at its next diff, or between batches), and they end with the same
/// hashes, seqs and states; their digests keep agreeing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_through_one_replica_rebuilds_the_same_states_on_all() {
    let broker = Broker::with_example_topics();
    broker.create_topic("statefold-attestations", 1);
    let mut servers = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), &broker);
        config.limits.attest_interval_records = 10;
        config.limits.replay_page_models = 2;
        config.limits.checkpoint_interval_diffs = 3;
        servers.push(Arc::new(TestServer::start_config(dir, config).await));
    }
    const MODELS: usize = 12;
    let mut sums = vec![Vec::<i64>::new(); MODELS];
    for (i, sum) in sums.iter_mut().enumerate() {
        servers[i % 3].create("counter", &format!("m{i}")).await;
        // A peak, then down: v1 keeps no max; v2 rebuilt over the history sees the peak.
        for add in [40, -30, 5] {
            let diff = if add > 0 { json!({"add": add}) } else { json!({"sub": -add}) };
            servers[(i + 1) % 3].apply("counter", &format!("m{i}"), &diff.to_string()).await;
            sum.push(add);
        }
    }
    let module = std::fs::read(statefold_tests::wasm("counter_v2")).unwrap();
    let response = servers[0].client.put(servers[0].url("/v1/reducers/counter")).body(module);
    let (status, body) = statefold_tests::http::json_of(response.send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");

    // Diffs through the other two while the replay is written and runs.
    let writers = {
        let servers = servers.clone();
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for n in 0..60 {
                let i = n % MODELS;
                let (status, body) =
                    servers[1 + n % 2].post(&format!("/v1/models/counter/m{i}/diffs"), r#"{"add":1}"#).await;
                assert_eq!(status, 202, "{body}");
                sent.push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };
    let (status, job) = servers[0].post("/v1/kinds/counter/replay", "").await;
    assert_eq!(status, 202, "{job}");
    for i in writers.await.unwrap() {
        sums[i].push(1);
    }
    // Every replica finishes its replay (each ran it from the log) and agrees on everything.
    for server in &servers {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, job) = server.get("/v1/kinds/counter/replay").await;
            if status == 200 && job["state"] == "finished" {
                assert_eq!(job["models_failed"], 0, "{job}");
                break;
            }
            assert!(Instant::now() < deadline, "the replay never finished: {job}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for (i, sum) in sums.iter().enumerate() {
        let (value, max) = sum.iter().fold((0, 0), |(v, m), d| (v + d, i64::max(m, v + d)));
        let mut seen = Vec::new();
        for server in &servers {
            let deadline = Instant::now() + Duration::from_secs(30);
            let body = loop {
                let (_, body) = server.get(&format!("/v1/models/counter/m{i}")).await;
                if body["seq"] == json!(sum.len()) {
                    break body;
                }
                assert!(Instant::now() < deadline, "m{i}: {body}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert_eq!(body["state"], json!({"value": value, "max": max}), "m{i}: rebuilt by v2 from its first diff");
            seen.push(json!([body["hash"], body["seq"], body["state"]]));
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "m{i}: replicas disagree: {seen:?}");
    }
    for server in &servers {
        let (status, body) = server.get("/readyz").await;
        assert_eq!(status, 200, "{body}");
        let peers = body["replicas"]["peers"].as_array().unwrap();
        assert!(peers.iter().all(|p| p["agrees"] == true), "digests agree after the replay: {body}");
    }
}

/// A deploy whose records reached only some partitions (here: one record produced by hand
/// to partition 0, as a deploy cut short would leave) switches those partitions only; the
/// same version deployed again is not taken as `unchanged`, and completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_cut_short_is_completed_by_deploying_again() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer};

    let broker = Broker::with_example_topics();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &broker);
    let server = TestServer::start_config(dir, config).await;
    let v2 = std::fs::read(statefold_tests::wasm("counter_v2")).unwrap();
    let producer = broker.producer();
    let headers = OwnedHeaders::new().insert(Header { key: "statefold-deploy", value: Some("counter") });
    let record = BaseRecord::<[u8], [u8]>::to("counter").partition(0).key(b"x").payload(&v2).headers(headers);
    producer.send(record).map_err(|(e, _)| e).unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();

    let path = "/v1/reducers/counter";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = server.get(path).await;
        if body["versions"][0]["status"] == "active" && body["versions"][0]["origin"] == "log" {
            break;
        }
        assert!(Instant::now() < deadline, "the hand-made deploy record was never folded: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let put = async || {
        let response = server.client.put(server.url(path)).body(v2.clone()).send().await.unwrap();
        statefold_tests::http::json_of(response).await
    };
    let (status, body) = put().await;
    assert_eq!(
        (status, body["unchanged"].as_bool(), body["partitions"].as_u64()),
        (200, Some(false), Some(3)),
        "{body}"
    );
    let (status, body) = put().await;
    assert_eq!((status, body["unchanged"].as_bool()), (200, Some(true)), "now every partition folds with it: {body}");
}
