//! SSE over real HTTP: many clients connecting at random points, dropping and resuming
//! with their last id while diffs arrive; slow clients; the write deadline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::prelude::*;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use statefold::chain::Hash;
use statefold::config::Limits;
use statefold_guest::merge_patch;
use statefold_tests::http::{SseStream, TestServer};

/// A client's local copy of the model, folded from the events it received.
#[derive(Debug, Default)]
struct Local {
    state: Option<Value>,
    hash: Option<Hash>,
    seq: u64,
    events: u64,
    resets: Vec<String>,
    patches: u64,
}

#[derive(Deserialize)]
struct DiffData<'a> {
    prev: String,
    hash: String,
    seq: u64,
    #[serde(borrow)]
    diff: &'a RawValue,
}

impl Local {
    /// Applies one event; panics on a gap, a repeat or a broken chain.
    fn apply(&mut self, who: &str, event: &statefold_tests::http::SseEvent) {
        if event.event == "message" && event.retry.is_some() {
            return; // `retry:` at the start of a stream
        }
        self.events += 1;
        match event.event.as_str() {
            "reset" => {
                self.resets.push(event.json()["reason"].as_str().unwrap().to_owned());
                self.state = None;
                self.hash = None;
            }
            "snapshot" => {
                let data = event.json();
                self.state = Some(data["state"].clone());
                self.hash = Some(data["hash"].as_str().unwrap().parse().unwrap());
                self.seq = data["seq"].as_u64().unwrap();
                assert_eq!(event.id.as_deref(), data["hash"].as_str(), "{who}: snapshot id");
            }
            "patch" => {
                let data = event.json();
                let from: Hash = data["from"].as_str().unwrap().parse().unwrap();
                assert_eq!(Some(from), self.hash, "{who}: patch from a hash the client does not hold");
                let state = self.state.as_mut().expect("a patch needs a state");
                merge_patch::apply(state, &data["diff"]);
                self.hash = Some(data["to"].as_str().unwrap().parse().unwrap());
                assert!(data["seq"].as_u64().unwrap() > self.seq, "{who}: patch does not move forward");
                self.seq = data["seq"].as_u64().unwrap();
                self.patches += 1;
            }
            "diff" => {
                let data: DiffData<'_> = serde_json::from_str(&event.data).unwrap();
                let prev: Hash = data.prev.parse().unwrap();
                assert_eq!(
                    Some(prev),
                    self.hash,
                    "{who}: gap or repeat: diff {} does not follow the held hash",
                    data.seq
                );
                assert_eq!(data.seq, self.seq + 1, "{who}: seq");
                let hash: Hash = data.hash.parse().unwrap();
                assert_eq!(prev.next(data.diff.get().as_bytes()), hash, "{who}: hash chain");
                let patch: Value = serde_json::from_str(data.diff.get()).unwrap();
                merge_patch::apply(self.state.as_mut().expect("a diff needs a state"), &patch);
                self.hash = Some(hash);
                self.seq = data.seq;
                assert_eq!(event.id.as_deref(), Some(data.hash.as_str()));
            }
            "synced" => {
                let hash: Hash = event.json()["hash"].as_str().unwrap().parse().unwrap();
                assert_eq!(Some(hash), self.hash, "{who}: synced at a hash the client does not hold");
            }
            "error" => panic!("{who}: error event {}", event.data),
            other => panic!("{who}: unexpected event {other}"),
        }
    }
}

/// The i-th diff of the writer: merge patches that set, nest, replace and delete, so that
/// some runs compose and some do not (then the catch-up is a delta).
fn diff(i: u64) -> String {
    match i % 10 {
        3 => format!(r#"{{"k{}":null}}"#, i % 20),
        5 => format!(r#"{{"o":{{"a":{i},"b":[{i}]}}}}"#),
        7 => format!(r#"{{"o":{i}}}"#),
        _ => format!(r#"{{"k{}":{i},"n":{i}}}"#, i % 20),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_resume_exactly_while_five_thousand_diffs_arrive() {
    const CLIENTS: usize = 200;
    const DIFFS: u64 = 5000;
    // Checkpoints every 200 diffs, 2 kept: hashes more than ~400 diffs old are pruned.
    let limits = Limits {
        checkpoint_interval_diffs: 200,
        retain_checkpoints: 2,
        // Clients resume with made-up hashes too: answered after this.
        failover_wait_ms: 200,
        ..Limits::default()
    };
    let server = Arc::new(TestServer::start(limits).await);
    server.create("document", "doc").await;
    let seen: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let done: Arc<tokio::sync::watch::Sender<Option<Hash>>> = Arc::new(tokio::sync::watch::channel(None).0);

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (server, seen, done) = (server.clone(), seen.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let who = format!("client {c}");
            let mut rng = StdRng::seed_from_u64(c as u64);
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..2000))).await;
            let mut local = Local::default();
            // Where it connects first.
            let mode = c % 5;
            let since: Option<String> = match mode {
                0 => None,
                1 => Some(server.get("/v1/models/document/doc").await.1["hash"].as_str().unwrap().to_owned()),
                2 => seen.lock().unwrap().iter().rev().take(50).choose(&mut rng).cloned(),
                3 => Some(hex_of(rng.random::<[u8; 32]>())),
                _ => {
                    // A hash from the start, once the model is far enough along for it to
                    // be pruned (checkpoints at 200, 400, 600: diffs through 400 go).
                    while server.get("/v1/models/document/doc").await.1["seq"].as_u64().unwrap() < 1000 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    seen.lock().unwrap().first().cloned()
                }
            };
            if let Some(since) = &since {
                // The client holds the state at that hash, if the server still has it.
                let (status, at) = server.get(&format!("/v1/models/document/doc?at={since}")).await;
                match status {
                    200 => {
                        local.state = Some(at["state"].clone());
                        local.seq = at["seq"].as_u64().unwrap();
                    }
                    404 | 410 => {}
                    other => panic!("{who}: GET ?at= answered {other}: {at}"),
                }
                local.hash = Some(since.parse().unwrap());
            }
            let mut stream = server.events("document", "doc", since.as_deref()).await;
            let mut budget: u64 = rng.random_range(1..400);
            let mut quiet = 0;
            loop {
                let final_hash = *done.borrow();
                if final_hash.is_some() && local.hash == final_hash {
                    return local;
                }
                // Wake every second to notice the end; a stream quiet for 30 s is stuck.
                let event = match tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
                    Ok(Some(event)) => event,
                    Ok(None) => panic!("{who}: stream ended"),
                    Err(_) => {
                        quiet += 1;
                        assert!(
                            quiet < 30,
                            "{who}: no event for 30 s, held {:?} seq {}, final {final_hash:?}",
                            local.hash,
                            local.seq
                        );
                        continue;
                    }
                };
                quiet = 0;
                local.apply(&who, &event);
                if let Some(id) = &event.id {
                    let mut seen = seen.lock().unwrap();
                    if seen.len() < 20_000 {
                        seen.push(id.clone());
                    }
                }
                budget = budget.saturating_sub(1);
                if budget == 0 && done.borrow().is_none() {
                    // Drop the connection, wait, resume with the last id seen.
                    drop(stream);
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
                    let last = local.hash.map(|h| h.to_string());
                    stream = server.events("document", "doc", last.as_deref()).await;
                    budget = rng.random_range(1..400);
                }
            }
        }));
    }

    let started = std::time::Instant::now();
    for i in 0..DIFFS {
        let (status, body) = server.post("/v1/models/document/doc/diffs", diff(i)).await;
        assert_eq!(status, 202, "{body}");
        if i % 500 == 0 {
            let (_, head) = server.get("/v1/models/document/doc").await;
            eprintln!("writer: {i} diffs sent at {:?}, head seq {}", started.elapsed(), head["seq"]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let last = server.apply("document", "doc", r#"{"end":true}"#).await;
    let final_hash: Hash = last["hash"].as_str().unwrap().parse().unwrap();
    done.send_replace(Some(final_hash));
    let (_, head) = server.get("/v1/models/document/doc").await;
    assert_eq!(head["seq"], DIFFS + 1);

    let mut patches = 0;
    let mut resets = std::collections::BTreeMap::new();
    for client in clients {
        let local = client.await.expect("client task");
        assert_eq!(local.hash, Some(final_hash));
        assert_eq!(local.state.as_ref(), Some(&head["state"]));
        patches += local.patches;
        for reason in local.resets {
            *resets.entry(reason).or_insert(0) += 1;
        }
    }
    // The run exercised what it claims to.
    assert!(patches > 0, "no client caught up by patch");
    assert!(resets.contains_key("unknown"), "{resets:?}");
    assert!(resets.contains_key("pruned"), "{resets:?}");
}

fn hex_of(bytes: [u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates a document and follows it until `synced`: the stream and the client's copy.
async fn follow_new_document(server: &TestServer, id: &str) -> (SseStream, Local) {
    server.create("document", id).await;
    let mut stream = server.events("document", id, None).await;
    let mut local = Local::default();
    for _ in 0..3 {
        // retry, snapshot, synced
        local.apply(id, &stream.next_within(Duration::from_secs(10)).await.unwrap());
    }
    (stream, local)
}

/// Appends `n` diffs of `pad_bytes` each (over `keys` keys) without waiting, then one more
/// waited for; returns the final hash.
async fn flood(server: &TestServer, id: &str, n: usize, pad_bytes: usize, keys: usize) -> Hash {
    let pad = "x".repeat(pad_bytes);
    for i in 0..n {
        let diff = format!(r#"{{"k{}":"{pad}{i}"}}"#, i % keys);
        let (status, _) = server.post(&format!("/v1/models/document/{id}/diffs"), diff).await;
        assert_eq!(status, 202);
    }
    let last = server.apply("document", id, r#"{"end":1}"#).await;
    last["hash"].as_str().unwrap().parse().unwrap()
}

/// A client that reads nothing while diffs pile up: the server drops its place in the
/// ring (bounded memory) and, when it reads again, sends one patch: it ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_costs_bounded_memory_and_ends_exact() {
    let limits = Limits { sse_queue_events_max: 16, ..Limits::default() };
    let server = TestServer::start(limits).await;
    let (mut slow, mut local) = follow_new_document(&server, "slow").await;
    // 20 MB of diffs: more than the socket buffers and far more than 16 ring slots.
    let final_hash = flood(&server, "slow", 1000, 20_000, 50).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    while local.hash != Some(final_hash) {
        let event = slow.next_within(Duration::from_secs(10)).await.expect("stream open");
        local.apply("slow", &event);
    }
    let (_, head) = server.get("/v1/models/document/slow").await;
    assert_eq!(local.state.as_ref(), Some(&head["state"]));
    assert!(local.patches >= 1, "the slow client was caught up by a patch");
    let lagged = server.running.as_ref().unwrap().app.metrics().sse_lagged.get();
    assert!(lagged >= 1, "the slow client lost its place in the bounded ring");
    assert!(local.events < 1000, "{} events for 1001 diffs: the backlog was not replayed one by one", local.events);
}

/// A client that takes no bytes for longer than the write deadline is disconnected; it
/// resumes with its last id and ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_is_disconnected_and_resumes() {
    let limits = Limits { http_write_timeout_ms: 300, sse_queue_events_max: 8, ..Limits::default() };
    let server = TestServer::start(limits).await;
    let (mut stream, mut local) = follow_new_document(&server, "stall").await;
    // Fill the socket while the client reads nothing, for longer than the deadline. Each
    // diff sets a key of its own, so whatever mix of diffs and patches the server sends,
    // it must send at least the final state (9 MB): more than the kernel buffers for a
    // client that reads nothing (a send buffer of at most `tcp_wmem`'s 4 MiB here, plus the
    // receive window the client opened while it read).
    let final_hash = flood(&server, "stall", 300, 30_000, 300).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // What was buffered still arrives, then the stream ends: the server hung up.
    let mut ended = false;
    while local.hash != Some(final_hash) {
        match stream.next_within(Duration::from_secs(10)).await {
            Some(event) => local.apply("stall", &event),
            None => {
                ended = true;
                let last = local.hash.map(|h| h.to_string());
                stream = server.events("document", "stall", last.as_deref()).await;
            }
        }
    }
    assert!(ended, "the server never disconnected the stalled client");
    let (_, head) = server.get("/v1/models/document/stall").await;
    assert_eq!(local.state.as_ref(), Some(&head["state"]));
}

/// The stream's framing: `retry:` first, `Cache-Control: no-cache`, heartbeat comments while
/// idle, and `Last-Event-ID` overriding `?since=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_heartbeats_and_last_event_id() {
    let limits = Limits { sse_heartbeat_ms: 100, sse_retry_ms: 1234, ..Limits::default() };
    let server = TestServer::start(limits).await;
    server.create("counter", "hb").await;
    let v1 = server.apply("counter", "hb", r#"{"add":1}"#).await;
    let v2 = server.apply("counter", "hb", r#"{"add":2}"#).await;

    // ?since=v2 would be up to date; the header (v1) wins: one patch to v2.
    let response = server
        .client
        .get(server.url(&format!("/v1/models/counter/hb/events?since={}", v2["hash"].as_str().unwrap())))
        .header("Last-Event-ID", v1["hash"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = SseStream::new(response);
    let retry = stream.next_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(retry.retry, Some(1234));
    let patch = stream.next_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!((patch.event.as_str(), patch.json()["diff"].clone()), ("patch", serde_json::json!({"add": 2})));
    assert_eq!(patch.json()["from"], v1["hash"]);
    let synced = stream.next_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!((synced.event.as_str(), synced.json()["hash"].clone()), ("synced", v2["hash"].clone()));
    assert_eq!(synced.id, None, "synced does not move the client");

    // Idle: heartbeats, then the next diff arrives live.
    tokio::time::sleep(Duration::from_millis(450)).await;
    server.apply("counter", "hb", r#"{"add":3}"#).await;
    let live = stream.next_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!((live.event.as_str(), live.json()["prev"].clone()), ("diff", v2["hash"].clone()));
    assert!(stream.comments >= 2, "{} heartbeat comments in 450 ms at 100 ms", stream.comments);

    // An empty `Last-Event-ID` is as if absent: `?since=v1` still applies (one patch).
    let response = server
        .client
        .get(server.url(&format!("/v1/models/counter/hb/events?since={}", v1["hash"].as_str().unwrap())))
        .header("Last-Event-ID", "")
        .send()
        .await
        .unwrap();
    let mut stream = SseStream::new(response);
    let _retry = stream.next_within(Duration::from_secs(5)).await.unwrap();
    let patch = stream.next_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!((patch.event.as_str(), patch.json()["from"].clone()), ("patch", v1["hash"].clone()), "{patch:?}");
}
