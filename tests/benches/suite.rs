//! The benchmark suite (issue 7): `cargo bench -p statefold-tests --bench suite`.
//!
//! Prints one table; each figure stands beside the limit or baseline it is judged against,
//! measured in the same run. Measured so far: recovery (time to ready after a restart with
//! 100,000 models stored, beside opening the same RocksDB store alone), catch-up (a
//! `document` client 100,000 diffs behind: its `patch` event, beside fetching the whole
//! state), and end-to-end latency (produce to a real Tansu broker → `diff` event at an SSE
//! client, beside a consume-only rdkafka reader). Under `cargo test` it smoke-runs with
//! 1/100 of the data.
//!
//! A real server runs in-process. For recovery and catch-up its embedded log's records are
//! written straight into the store before it starts (that fold is not measured).

use std::time::{Duration, Instant};

use statefold::config::Limits;
use statefold::fold::{CREATE_HEADER, ModelKey};
use statefold::store::{Store, StoreOptions};
use statefold_tests::bench::{median, rounds};
use statefold_tests::http::{TestServer, example_config};

fn full() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The data sizes: full under `cargo bench`, 1/100 under `cargo test`.
fn scaled(n: usize) -> usize {
    if full() { n } else { (n / 100).max(1) }
}

struct Row {
    name: String,
    value: String,
    beside: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut rows = Vec::new();
    recovery(&mut rows).await;
    catch_up(&mut rows).await;
    latency(&mut rows).await;
    println!();
    println!("statefold benchmark suite ({} cores, {} rounds per figure)", cores(), rounds(5));
    println!("{:<58} {:>14}  beside (same run)", "case", "figure");
    for row in rows {
        println!("{:<58} {:>14}  {}", row.name, row.value, row.beside);
    }
}

fn limits() -> Limits {
    Limits { store_fsync: false, ..Limits::default() }
}

/// Writes `records` (key, value, create?) to the embedded log of a new data dir.
fn prefilled(topic: &str, records: impl Iterator<Item = (String, Vec<u8>, bool)>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("db"), &StoreOptions { fsync: false }).expect("store");
    for (key, value, create) in records {
        let headers = if create { vec![(CREATE_HEADER.to_owned(), Vec::new())] } else { Vec::new() };
        store.append(topic, 0, key.as_bytes(), &value, 0, &headers).expect("append");
    }
    dir
}

/// A server on `dir` with `limits`, once it has folded everything in its log.
async fn started(dir: tempfile::TempDir, limits: Limits) -> TestServer {
    let config = example_config(dir.path(), limits);
    let server = TestServer::start_config(dir, config).await;
    let app = server.running.as_ref().expect("running").app.clone();
    while !app.ready() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server
}

/// Recovery (7): a restart with 100,000 models stored, from `start` to ready.
async fn recovery(rows: &mut Vec<Row>) {
    let models = scaled(100_000);
    let dir = prefilled("counter", (0..models).map(|i| (format!("m{i}"), Vec::new(), true)));
    let dir = started(dir, limits()).await.stop().await;
    let (mut ready, mut open) = (Vec::new(), Vec::new());
    for _ in 0..rounds(5) {
        let start = Instant::now();
        let store = Store::open(&dir.path().join("db"), &StoreOptions { fsync: false }).expect("store");
        open.push(start.elapsed());
        drop(store);
        let config = example_config(dir.path(), limits());
        let start = Instant::now();
        let running = statefold::server::start(config).await.expect("starts");
        while !running.app.ready() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ready.push(start.elapsed());
        running.stop().await.expect("stops");
    }
    let (ready, open) = (median(ready), median(open));
    rows.push(Row {
        name: format!("7. restart with {models} models stored, to ready"),
        value: format!("{ready:.2?}"),
        beside: format!(
            "goal < 2 s; opening its RocksDB alone {open:.2?} ({:.1}x)",
            ready.as_secs_f64() / open.as_secs_f64()
        ),
    });
}

/// Catch-up (4): a `document` client 100,000 diffs behind, its `patch` event (one
/// composed diff), beside fetching the whole state.
async fn catch_up(rows: &mut Vec<Row>) {
    let diffs = scaled(100_000);
    // A document of up to 1,000 keys, each set again and again.
    let records = std::iter::once(("doc".to_owned(), Vec::new(), true))
        .chain((0..diffs).map(|i| ("doc".to_owned(), format!(r#"{{"k{}":{i}}}"#, i % 1000).into_bytes(), false)));
    // Every diff retained (checkpoints every 1,000 diffs), so the client's hash is known.
    let retain = Limits { retain_checkpoints: diffs / 1000 + 2, ..limits() };
    let server = started(prefilled("document", records), retain).await;
    let genesis = ModelKey::new("document", "doc").genesis().to_string();
    let (mut patch, mut patch_bytes, mut state, mut state_bytes) = (Vec::new(), 0, Vec::new(), 0);
    for _ in 0..rounds(5) {
        let start = Instant::now();
        let mut events = server.events("document", "doc", Some(&genesis)).await;
        let event = loop {
            let event = events.next().await.expect("an event");
            if event.event == "patch" {
                break event;
            }
            assert_ne!(event.event, "snapshot", "a client with a retained hash gets a patch");
        };
        patch.push(start.elapsed());
        patch_bytes = event.data.len();
        let start = Instant::now();
        let response = server.client.get(server.url("/v1/models/document/doc")).send().await.expect("state");
        let body = response.bytes().await.expect("a body");
        state.push(start.elapsed());
        state_bytes = body.len();
    }
    let (patch, state) = (median(patch), median(state));
    rows.push(Row {
        name: format!("4. catch-up {diffs} diffs behind (document): patch event"),
        value: format!("{patch:.2?}"),
        beside: format!(
            "goal < 100 ms; {patch_bytes} bytes; the whole state {state:.2?}, {state_bytes} bytes ({:.1}x)",
            patch.as_secs_f64() / state.as_secs_f64()
        ),
    });
    server.stop().await;
}

/// End-to-end latency (5): a record produced to Kafka until its `diff` event reaches an
/// SSE client, at 1,000 records/s over 10 models; beside a consume-only rdkafka reader of
/// the same records in the same run (what the broker and client alone take).
async fn latency(rows: &mut Vec<Row>) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{BaseRecord, Producer};
    use std::sync::{Arc, Mutex};

    const MODELS: usize = 10;
    const RATE: u64 = 1000;
    let seconds = if full() { 5.0 } else { 0.5 };
    let broker = statefold_tests::broker::Broker::start();
    broker.create_topic("counter", 3);
    for topic in ["document", "workflow", "trap"] {
        broker.create_topic(topic, 1);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    // A short fetch wait: the broker holds an idle fetch this long (librdkafka's
    // `fetch.wait.max.ms`), a floor under latency at low rates.
    let limits = Limits { kafka_fetch_wait_ms: 5, ..limits() };
    let mut config = example_config(dir.path(), limits);
    config.kafka = Some(statefold::config::KafkaConfig::new(&broker.brokers()));
    let server = TestServer::start_config(dir, config).await;
    for i in 0..MODELS {
        server.create("counter", &format!("l{i}")).await;
    }
    // Send instants per model, in order; receive instants per model, in order.
    type Times = Arc<Mutex<Vec<Vec<Instant>>>>;
    let sent: Times = Arc::new(Mutex::new(vec![Vec::new(); MODELS]));
    let (sse, raw): (Times, Times) =
        (Arc::new(Mutex::new(vec![Vec::new(); MODELS])), Arc::new(Mutex::new(vec![Vec::new(); MODELS])));
    let mut followers = Vec::new();
    for i in 0..MODELS {
        let (_, head) = server.get(&format!("/v1/models/counter/l{i}")).await;
        let mut events = server.events("counter", &format!("l{i}"), head["hash"].as_str()).await;
        let sse = sse.clone();
        followers.push(tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if event.event == "diff" {
                    sse.lock().unwrap()[i].push(Instant::now());
                }
            }
        }));
    }
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", "statefold-bench-latency")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.queue.backoff.ms", "1")
        .create()
        .expect("a consumer");
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..3 {
        assignment.add_partition_offset("counter", partition, rdkafka::Offset::End).expect("assign");
    }
    consumer.assign(&assignment).expect("assigned");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (raw, stop) = (raw.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
                    let key = message.key().and_then(|k| std::str::from_utf8(k).ok()).unwrap_or_default();
                    if let Some(i) = key.strip_prefix('l').and_then(|n| n.parse::<usize>().ok()) {
                        raw.lock().unwrap()[i].push(Instant::now());
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await; // the reader's assignment settles
    let total = (RATE as f64 * seconds) as usize;
    let producer = broker.producer();
    // Connected and warm before the clock starts (metadata, the idempotent producer id).
    for _ in 0..10 {
        producer.send(BaseRecord::to("counter").key(b"warm-up").payload(br#"{"add":1}"#)).expect("queued");
    }
    producer.flush(Duration::from_secs(30)).expect("delivered");
    {
        let sent = sent.clone();
        tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            for n in 0..total {
                // Open loop: record n goes out at n ms, whatever happened before.
                let due = start + Duration::from_micros(n as u64 * 1_000_000 / RATE);
                while Instant::now() < due {
                    std::hint::spin_loop();
                }
                let i = n % MODELS;
                let key = format!("l{i}");
                sent.lock().unwrap()[i].push(Instant::now());
                producer.send(BaseRecord::to("counter").key(key.as_bytes()).payload(br#"{"add":1}"#)).expect("queued");
            }
            producer.flush(Duration::from_secs(30)).expect("delivered");
        })
        .await
        .expect("producer");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while sse.lock().unwrap().iter().map(Vec::len).sum::<usize>() < total
        || raw.lock().unwrap().iter().map(Vec::len).sum::<usize>() < total
    {
        assert!(Instant::now() < deadline, "not every record arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().expect("reader");
    for follower in followers {
        follower.abort();
    }
    let percentiles = |received: &Times| {
        let sent = sent.lock().unwrap();
        let mut all: Vec<Duration> = sent
            .iter()
            .zip(received.lock().unwrap().iter())
            .flat_map(|(s, r)| s.iter().zip(r).map(|(s, r)| r.saturating_duration_since(*s)))
            .collect();
        all.sort();
        (all[all.len() / 2], all[all.len() * 99 / 100])
    };
    let ((p50, p99), (raw50, raw99)) = (percentiles(&sse), percentiles(&raw));
    rows.push(Row {
        name: format!("5. produce → SSE diff event, {RATE}/s, {total} records: p50"),
        value: format!("{p50:.2?}"),
        beside: format!("consume-only rdkafka reader p50 {raw50:.2?}"),
    });
    rows.push(Row {
        name: "   same, p99".into(),
        value: format!("{p99:.2?}"),
        beside: format!("goal < 20 ms; consume-only reader p99 {raw99:.2?} (fetch wait 5 ms)"),
    });
    server.stop().await;
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
