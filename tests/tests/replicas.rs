//! Several servers on one broker (a real Tansu), in-process: a gateway that takes writes
//! and a read-only replica. The three-server test with hopping clients, a deploy, a
//! SIGKILLed process and `statefold verify` runs the binary: `host/tests/replicas.rs`.

use std::time::Duration;

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
