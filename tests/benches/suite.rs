//! The benchmark suite (issue 7): `cargo bench -p statefold-tests --bench suite`.
//!
//! Prints one table; each figure stands beside the limit or baseline it is judged against,
//! measured in the same run. Measured so far: recovery (time to ready after a restart with
//! 100,000 models stored, beside opening the same RocksDB store alone) and catch-up (a
//! `document` client 100,000 diffs behind: its `patch` event, beside fetching the whole
//! state). Under `cargo test` it smoke-runs with 1/100 of the data.
//!
//! Both run a real server in-process on the embedded log, whose records are written
//! straight into the store before it starts (the fold at start is not measured here).

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

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
