//! Documented error answers that need a setting, a file or a connection of their own, each
//! asserted alone (status and code), against the real router and store on port 0. The
//! Kafka ones (`unavailable`, `not_ready`, `wait_timeout`, `invalid_deploy`) are in
//! `kafka.rs`; `tests/readme.rs` checks that every code in docs/reference.md is named by a test.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::Value;
use statefold::config::Limits;
use statefold_tests::http::{TestServer, json_of};

async fn put_module(server: &TestServer, name: &str, module: Vec<u8>) -> (u16, Value) {
    let response = server.client.put(server.url(&format!("/v1/reducers/{name}"))).body(module).send().await.unwrap();
    json_of(response).await
}

fn code(body: &Value) -> Option<&str> {
    body["error"]["code"].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_cannot_be_read_is_bad_body_and_stores_nothing() {
    let server = TestServer::start(Limits::default()).await;
    server.create("counter", "m").await;
    // A chunked body whose chunk size is not hexadecimal: the server cannot read it.
    let address = server.url("").trim_start_matches("http://").trim_end_matches('/').to_owned();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = "POST /v1/models/counter/m/diffs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{\"add\":1}\r\n0\r\n\r\n";
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""code":"bad_body""#), "{answer}");
    let (_, model) = server.get("/v1/models/counter/m").await;
    assert_eq!(model["seq"], 0, "nothing applied: {model}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_sse_subscribers_max_are_too_many_subscribers() {
    let server = TestServer::start(Limits { sse_subscribers_max: 1, ..Limits::default() }).await;
    server.create("counter", "m").await;
    let mut first = server.events("counter", "m", None).await;
    assert!(first.next().await.is_some(), "the first stream is served");
    let (status, body) =
        json_of(server.client.get(server.url("/v1/models/counter/m/events")).send().await.unwrap()).await;
    assert_eq!((status, code(&body)), (503, Some("too_many_subscribers")), "{body}");
    drop(first);
    // Its slot is given back once the first stream is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = server.client.get(server.url("/v1/models/counter/m/events")).send().await.unwrap();
        if response.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_no_longer_retained_is_410_pruned() {
    let limits =
        Limits { checkpoint_interval_diffs: 5, checkpoint_tail_percent: 0, retain_checkpoints: 1, ..Limits::default() };
    let server = TestServer::start(limits).await;
    let first = server.create("counter", "m").await;
    let genesis = first["hash"].as_str().unwrap().to_owned();
    let early = server.apply("counter", "m", r#"{"add":1}"#).await["hash"].as_str().unwrap().to_owned();
    for _ in 0..20 {
        server.apply("counter", "m", r#"{"add":1}"#).await;
    }
    for hash in [&genesis, &early] {
        let (status, body) = server.get(&format!("/v1/models/counter/m?at={hash}")).await;
        assert_eq!((status, code(&body)), (410, Some("pruned")), "{body}");
    }
    // What a client at that hash is missing is still answered: with the whole state.
    let (status, body) = server.get(&format!("/v1/models/counter/m/diffs?since={early}")).await;
    assert_eq!((status, body["kind"].as_str()), (200, Some("snapshot")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_refusals_name_their_reason_and_the_active_version_goes_on() {
    let server = TestServer::start(Limits::default()).await;
    server.create("counter", "m").await;
    let counter = std::fs::read(statefold_tests::wasm("counter")).unwrap();

    // A component section that does not parse (complete, not cut short).
    let invalid = [&b"\0asm\x0d\x00\x01\x00"[..], &[0x01, 0x04, 0xff, 0xff, 0xff, 0xff]].concat();
    // counter.wasm importing an interface the sandbox does not provide: the same bytes with
    // one WASI interface renamed (same length, everywhere it is named).
    let imports = String::from_utf8_lossy(&counter).contains("wasi:cli/environment");
    assert!(imports, "counter.wasm imports wasi:cli/environment");
    let renamed = replace_all(&counter, b"wasi:cli/environment", b"wasi:cli/environmenx");
    let cases = [
        (invalid, "invalid_component"),
        (renamed, "unsupported_imports"),
        (std::fs::read(statefold_tests::wasm("nameless")).unwrap(), "describe_failed"),
        (std::fs::read(statefold_tests::wasm("cbor")).unwrap(), "unsupported_format"),
    ];
    for (module, expected) in cases {
        let (status, body) = put_module(&server, "counter", module).await;
        assert_eq!((status, code(&body)), (422, Some(expected)), "{body}");
    }
    let (_, versions) = server.get("/v1/reducers/counter").await;
    assert_eq!(versions["versions"][0]["status"], "active", "the first version goes on: {versions}");
    let applied = server.apply("counter", "m", r#"{"add":2}"#).await;
    assert_eq!(applied["seq"], 1, "{applied}");

    // A module larger than a deploy record may carry goes in chunks, and folds.
    let small = TestServer::start(Limits { deploy_record_bytes_max: 100_000, ..Limits::default() }).await;
    let v2 = std::fs::read(statefold_tests::wasm("counter_v2")).unwrap();
    assert!(v2.len() > 200_000, "counter_v2.wasm is {} bytes", v2.len());
    let (status, body) = put_module(&small, "counter", v2.clone()).await;
    // (Past reducer_module_bytes_max a module is refused 413 `too_large`: tests/tests/deploy.rs.)
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"]["bytes"], v2.len(), "{body}");
    small.create("counter", "m").await;
    let applied = small.apply("counter", "m", r#"{"add":2}"#).await;
    let (_, state) = small.get("/v1/models/counter/m").await;
    assert_eq!(state["state"], serde_json::json!({"value": 2, "max": 2}), "v2 folds: {applied} {state}");
}

fn replace_all(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    let mut at = 0;
    while let Some(found) = out[at..].windows(from.len()).position(|w| w == from) {
        out[at + found..at + found + to.len()].copy_from_slice(to);
        at += found + to.len();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replay_while_one_runs_is_replay_running() {
    let server = TestServer::start(Limits { replay_page_models: 1, ..Limits::default() }).await;
    for i in 0..300 {
        server.create("counter", &format!("m{i}")).await;
    }
    server.apply("counter", "m299", r#"{"add":1}"#).await;
    let replay = || server.client.post(server.url("/v1/kinds/counter/replay")).send();
    let (status, first) = json_of(replay().await.unwrap()).await;
    assert_eq!(status, 202, "{first}");
    let (status, body) = json_of(replay().await.unwrap()).await;
    assert_eq!((status, code(&body)), (409, Some("replay_running")), "one page of one model between batches: {body}");
}
