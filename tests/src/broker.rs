//! A real Kafka-compatible broker for the tests: Tansu, on a free loopback port, with
//! `sqlite://` storage in a temporary directory (durable across its restarts; its
//! `memory://` engine returns nothing for a fetch from a non-zero offset).
//!
//! The binary is `$STATEFOLD_TANSU`, else `tansu` on `PATH` (`./dev.sh test` installs it).
//! A missing broker fails the test: Kafka tests are never skipped.
//!
//! Tansu 0.6.0 quirks this works around: it reads `sqlite:///abs/path` as relative, so it
//! runs in its directory with `sqlite://tansu.db`; on SIGTERM it stops its storage but
//! keeps its listener open for seconds, answering every request with an error, and a
//! produce after that can panic it — so it is stopped with SIGKILL (sqlite keeps every
//! committed write) and restarted only once its port is free; its `header` table has no
//! index, which makes a fetch scan every stored header once per record (see
//! [`Broker::index_headers`]).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

/// The tansu binary the tests run.
pub fn tansu() -> PathBuf {
    if let Some(path) = std::env::var_os("STATEFOLD_TANSU") {
        return path.into();
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("tansu"))
        .find(|path| path.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "the Kafka tests need the Tansu broker: run ./dev.sh test (it installs it), or `cargo install tansu --features libsql` and put it on PATH (or set STATEFOLD_TANSU)"
        )
    })
}

/// A record read back: (partition, offset, key, value).
pub type ReadRecord = (u32, u64, Option<Vec<u8>>, Vec<u8>);

/// A running (or stopped) Tansu broker.
pub struct Broker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
}

impl Broker {
    pub fn start() -> Broker {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut broker = Broker { child: None, dir, addr: SocketAddr::from(([127, 0, 0, 1], port)) };
        broker.restart();
        broker
    }

    /// `host:port`, for `bootstrap.servers`.
    /// A broker with the topics of [`crate::http::example_config`]'s kinds (`counter`
    /// with 3 partitions, the others with 1).
    pub fn with_example_topics() -> Broker {
        let broker = Broker::start();
        broker.create_topic("counter", 3);
        for topic in ["document", "workflow", "trap"] {
            broker.create_topic(topic, 1);
        }
        broker
    }

    pub fn brokers(&self) -> String {
        self.addr.to_string()
    }

    fn url(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    /// Starts the broker (again) on the same port and storage; returns once it accepts
    /// connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        let deadline = Instant::now() + Duration::from_secs(10);
        // The port may still be held by the last instance's sockets for a moment.
        while TcpListener::bind(self.addr).is_err() {
            assert!(Instant::now() < deadline, "port {} stays busy", self.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .expect("a log file");
        let child = Command::new(tansu())
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .args(["broker", "--listener-url", &self.url(), "--advertised-listener-url", &self.url()])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        while TcpStream::connect(self.addr).is_err() {
            if Instant::now() > deadline {
                panic!("tansu does not listen on {}; its log: {}", self.addr, self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.index_headers(deadline);
    }

    /// Tansu 0.6's schema has no index on its `header` table, and its fetch looks up each
    /// record's headers with its own query: a full scan of every header of every topic per
    /// record. A fetch of a few thousand records, once another topic holds tens of
    /// thousands of records with headers (a relay's reactions), took over librdkafka's
    /// `socket.timeout.ms` (60 s) beside a running server; the consumer then retried the
    /// same fetch forever. The index (created once Tansu has created its schema, which it
    /// mostly does before it listens: a start where it listened first was seen, so the
    /// table is waited for until `deadline`; SQLite re-prepares Tansu's statements) makes
    /// each lookup a seek. Tansu's data and answers are unchanged.
    fn index_headers(&self, deadline: Instant) {
        let db = rusqlite::Connection::open(self.dir.path().join("tansu.db")).expect("Tansu's sqlite database");
        db.busy_timeout(Duration::from_secs(10)).expect("a busy timeout");
        let exists = "select count(*) from sqlite_master where type = 'table' and name = 'header'";
        while db.query_row(exists, [], |row| row.get::<_, i64>(0)).expect("sqlite_master reads") == 0 {
            assert!(Instant::now() < deadline, "Tansu never created its header table; its log: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        db.execute("create index if not exists statefold_tests_header_record on header (topition, offset_id)", [])
            .expect("an index on Tansu's header table");
    }

    /// Stops the broker abruptly (see the module doc), and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    /// Deletes a topic. Tansu 0.6 deletes every topic with it: recreate the others the test
    /// needs.
    pub fn delete_topic(&self, name: &str) {
        self.topic(&["delete", name]);
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        self.topic(&["create", name, "--partitions", &partitions.to_string()]);
    }

    /// `tansu topic ARGS` against this broker.
    fn topic(&self, args: &[&str]) {
        let output = Command::new(tansu())
            .env_clear()
            .arg("topic")
            .args(args)
            .args(["--broker", &self.url()])
            .output()
            .expect("tansu topic runs");
        assert!(
            output.status.success(),
            "tansu topic {}: {}{}; broker log: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
    }

    /// An idempotent producer (acks=all) that delivers in the background; `flush` waits.
    pub fn producer(&self) -> ThreadedProducer<DefaultProducerContext> {
        ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "120000")
            .set("partitioner", "murmur2_random")
            .create()
            .expect("a producer")
    }

    /// A consumer's settings: group `group` (assigned partitions, no offsets committed),
    /// a fetch waiting at most `fetch_wait_ms` at the broker, and no backoff between
    /// fetches. Callers add what differs (isolation, CRC checks) before `create`.
    pub fn consumer_config(&self, group: &str, fetch_wait_ms: u64) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.brokers())
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
            .set("fetch.queue.backoff.ms", "1");
        config
    }

    /// Every record of a topic as (partition, offset, key, value), read back from the
    /// broker (what a reference fold is computed from).
    pub fn read_all(&self, topic: &str, partitions: u32) -> Vec<ReadRecord> {
        self.read_records(topic, partitions)
            .into_iter()
            .map(|r| (r.partition, r.offset, r.key, r.value.to_vec()))
            .collect()
    }

    /// Every record of a topic, whole (timestamps and headers too), in (partition, offset)
    /// order.
    pub fn read_records(&self, topic: &str, partitions: u32) -> Vec<statefold::model::Record> {
        use rdkafka::message::Headers;
        let consumer: BaseConsumer = self
            .consumer_config("statefold-tests-reader", 10)
            // Every record, as the broker holds it (Tansu 0.6's read_committed does not filter
            // aborted records anyway).
            .set("isolation.level", "read_uncommitted")
            .create()
            .expect("a consumer");
        let mut list = TopicPartitionList::new();
        let mut ends = Vec::new();
        for partition in 0..partitions {
            list.add_partition_offset(topic, partition as i32, Offset::Beginning).unwrap();
            let (_, high) =
                consumer.fetch_watermarks(topic, partition as i32, Duration::from_secs(10)).expect("watermarks");
            ends.push(high as u64);
        }
        consumer.assign(&list).unwrap();
        let total: u64 = ends.iter().sum();
        let mut out = Vec::with_capacity(total as usize);
        // What fails is no record for a minute, not a slow read.
        let stalled_after = Duration::from_secs(60);
        let mut deadline = Instant::now() + stalled_after;
        while (out.len() as u64) < total {
            assert!(
                Instant::now() < deadline,
                "read {} of {total} records of {topic}; none for {stalled_after:?}",
                out.len()
            );
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    deadline = Instant::now() + stalled_after;
                    out.push(statefold::model::Record {
                        topic: topic.into(),
                        partition: m.partition() as u32,
                        offset: m.offset() as u64,
                        key: m.key().map(<[u8]>::to_vec),
                        value: bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                        timestamp_ms: m.timestamp().to_millis(),
                        headers: m
                            .headers()
                            .map(|h| {
                                h.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect()
                            })
                            .unwrap_or_default(),
                    })
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
        }
        out.sort_by_key(|r| (r.partition, r.offset));
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Produces `(key, value)` records and waits until every one is acknowledged.
pub fn produce_all(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, records: &[(String, Vec<u8>)]) {
    for (key, value) in records {
        let mut record = BaseRecord::to(topic).key(key.as_bytes()).payload(value.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back)) => {
                    assert!(
                        e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        "produce: {e}"
                    );
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("every record acknowledged");
}
