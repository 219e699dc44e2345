//! `statefold serve` as a process: restart after SIGKILL and SIGTERM on the same data dir,
//! streams resuming from the hashes clients hold, and corruption stopping the process.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use rand::prelude::*;
use serde_json::json;
use statefold::chain::Hash;
use statefold::model::CREATE_HEADER;
use statefold::store::{Store, StoreOptions};
use statefold_tests::http::{SseStream, json_of};

use statefold_tests::process::Serve;

/// The reference fold of the counter: the sum, and the hash chain over the diff bytes.
fn reference(id: &str, diffs: &[String]) -> (i64, Hash) {
    let mut hash = Hash::genesis("counter", id);
    let mut sum = 0;
    for diff in diffs {
        let value: serde_json::Value = serde_json::from_str(diff).unwrap();
        sum += value["add"].as_i64().unwrap();
        hash = hash.next(diff.as_bytes());
    }
    (sum, hash)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigkill_and_sigterm_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut server = Serve::start(dir.path());
    server.wait_ready(&client).await;
    for m in 0..10 {
        let response = client
            .post(format!("{}/v1/models/counter", server.url))
            .body(format!(r#"{{"id":"m{m}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        sent.insert(format!("m{m}"), Vec::new());
    }
    // A client follows m0 and holds a hash when the server dies.
    let mut stream =
        SseStream::new(client.get(format!("{}/v1/models/counter/m0/events", server.url)).send().await.unwrap());
    let mut n = 0u64;
    for round in 0..3 {
        for _ in 0..400 {
            n += 1;
            let id = format!("m{}", (n * 7919) % 10);
            let diff = format!(r#"{{"add":{}}}"#, n % 13);
            let response = client
                .post(format!("{}/v1/models/counter/{id}/diffs", server.url))
                .body(diff.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202, "{:?}", json_of(response).await);
            sent.get_mut(&id).unwrap().push(diff);
        }
        // Kill mid-fold the first two rounds (no flush, no goodbye), stop politely the last.
        if round < 2 {
            server.signal("KILL");
        } else {
            server.signal("TERM");
            assert!(server.wait().success(), "SIGTERM exits 0");
        }
        server.wait();
        server = Serve::start(dir.path());
        server.wait_ready(&client).await;
    }

    // The stream from before the first kill: the last hash it got is where it resumes.
    let mut held: Option<Hash> = None;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
        if let Some(id) = event.id {
            held = Some(id.parse().unwrap());
        }
    }
    let held = held.expect("the client saw at least the snapshot");

    for (id, diffs) in &sent {
        let (sum, hash) = reference(id, diffs);
        let (status, body) =
            json_of(client.get(format!("{}/v1/models/counter/{id}", server.url)).send().await.unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(
            (&body["state"], &body["seq"], body["hash"].as_str().unwrap()),
            (&json!(sum), &json!(diffs.len()), hash.to_string().as_str()),
            "{id}: every accepted diff applied exactly once"
        );
    }
    let mut resumed = SseStream::new(
        client
            .get(format!("{}/v1/models/counter/m0/events", server.url))
            .header("Last-Event-ID", held.to_string())
            .send()
            .await
            .unwrap(),
    );
    let (_, final_hash) = reference("m0", &sent["m0"]);
    loop {
        let event = resumed.next_within(Duration::from_secs(10)).await.expect("stream open");
        match event.event.as_str() {
            "patch" => {
                let data = event.json();
                assert_eq!(data["from"], held.to_string(), "resumes from the held hash");
                assert_eq!(data["to"], final_hash.to_string());
            }
            "synced" => {
                assert_eq!(event.json()["hash"], final_hash.to_string());
                break;
            }
            "message" => {}
            other => panic!("unexpected {other}: {}", event.data),
        }
    }
    server.signal("TERM");
    assert!(server.wait().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_stops_the_process_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut server = Serve::start(dir.path());
    server.wait_ready(&client).await;
    client.post(format!("{}/v1/models/counter", server.url)).body(r#"{"id":"m"}"#).send().await.unwrap();
    let applied = client
        .post(format!("{}/v1/models/counter/m/diffs?wait=applied", server.url))
        .body(r#"{"add":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), 200);
    server.signal("TERM");
    assert!(server.wait().success());

    // Damage the model's head behind Statefold's back.
    {
        let path = dir.path().join("data/db");
        let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), &path).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &path, &families).unwrap();
        db.put_cf(db.cf_handle("heads").unwrap(), b"counter\0m", [1u8, 2, 3]).unwrap();
    }
    let mut server = Serve::start(dir.path());
    let (status, body) = json_of(client.get(format!("{}/v1/models/counter/m", server.url)).send().await.unwrap()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (500, Some("store")), "{body}");
    let exit = server.wait();
    assert!(!exit.success(), "a corrupted store stops the process");
    let stderr = std::fs::read_to_string(&server.stderr).unwrap();
    assert!(stderr.contains("store corrupted: head at key counter\\0m"), "{stderr}");
}

/// Issue 17, item 3: the disk fills up (every file the process writes is limited to 6 MB,
/// so RocksDB's log file hits EFBIG, as a full disk gives ENOSPC). No failed write is
/// acknowledged; writes answer 503 `store_unwritable`; reads go on; `/readyz` says why;
/// after a restart with room, the model is the reference fold of what was acknowledged
/// (plus, at most, the one append the log took before folding stopped), and folding goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_acknowledges_nothing_it_did_not_store_and_a_restart_continues() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let args: Vec<String> = ["--kind", "document=document.wasm"].map(String::from).to_vec();
    let server = Serve::spawn_with_file_limit(dir.path(), &args, 6 << 20);
    server.wait_ready(&client).await;
    let post = |path: &str, body: String| client.post(format!("{}{path}", server.url)).body(body).send();
    let (status, _) = json_of(post("/v1/models/document", r#"{"id":"big"}"#.into()).await.unwrap()).await;
    assert_eq!(status, 201);
    // Each diff replaces one 512 KiB field: the state stays small, the log grows.
    let diff =
        |i: usize| format!(r#"{{"blob":"{}","n":{i}}}"#, format!("{i:x}").repeat(1 << 19).get(..1 << 19).unwrap());
    let mut acknowledged = Vec::new();
    let refused = loop {
        let i = acknowledged.len();
        assert!(i < 200, "6 MB never filled up");
        let response = post("/v1/models/document/big/diffs?wait=applied", diff(i)).await.unwrap();
        let (status, body) = json_of(response).await;
        match status {
            200 => acknowledged.push(diff(i)),
            503 => break body,
            other => panic!("append {i}: {other} {body}"),
        }
    };
    assert_eq!(refused["error"]["code"], "store_unwritable", "{refused}");
    assert!(acknowledged.len() >= 4, "some appends fit: {}", acknowledged.len());
    let unacknowledged = diff(acknowledged.len());

    // Once the store failed a write: every write is refused at once, reads go on.
    let (status, body) = json_of(post("/v1/models/document/big/diffs", r#"{"n":-1}"#.into()).await.unwrap()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("store_unwritable")), "{body}");
    let (status, body) = json_of(post("/v1/models/document", r#"{"id":"other"}"#.into()).await.unwrap()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("store_unwritable")), "{body}");
    let (status, ready) = json_of(client.get(format!("{}/readyz", server.url)).send().await.unwrap()).await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready["error"]["message"].as_str().unwrap().contains("the store cannot write"), "{ready}");
    let (status, model) =
        json_of(client.get(format!("{}/v1/models/document/big", server.url)).send().await.unwrap()).await;
    assert_eq!(status, 200, "reads go on: {model}");
    assert!(model["seq"].as_u64().unwrap() <= acknowledged.len() as u64 + 1, "{}", model["seq"]);
    let mut server = server;
    server.signal("KILL");
    server.wait();

    // Room again: a restart continues from the last commit.
    let server = Serve::spawn(dir.path(), &args);
    server.wait_ready(&client).await;
    let (_, model) = json_of(client.get(format!("{}/v1/models/document/big", server.url)).send().await.unwrap()).await;
    let chain = |diffs: &[String]| diffs.iter().fold(Hash::genesis("document", "big"), |h, d| h.next(d.as_bytes()));
    let with_the_last = [acknowledged.clone(), vec![unacknowledged]].concat();
    let expected = if model["seq"] == acknowledged.len() as u64 { &acknowledged } else { &with_the_last };
    assert_eq!(model["seq"], expected.len() as u64, "every acknowledged diff, and at most the one in flight");
    assert_eq!(model["hash"], chain(expected).to_string(), "the chain over exactly those diffs");
    assert_eq!(model["state"]["n"], expected.len() as u64 - 1);
    let response = client
        .post(format!("{}/v1/models/document/big/diffs?wait=applied", server.url))
        .body(r#"{"after":"restart"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "folding goes on");
}

/// A backlog folded with the WAL on, batch N+1 folded while batch N commits, and heads
/// written only when more than their diffs change: SIGKILLed at random moments while it
/// folds, each restart goes on from the last commit. At the end every model is the
/// reference fold, and any of its hashes still resolves (`?at=`, through the hash index).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_while_a_backlog_folds_lose_and_repeat_nothing() {
    const MODELS: usize = 200;
    const DIFFS: usize = 100_000;
    const KILLS: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(23);
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    {
        let store = Store::open(&dir.path().join("data").join("db"), &StoreOptions::default()).unwrap();
        let create = vec![(CREATE_HEADER.to_owned(), Vec::new())];
        for m in 0..MODELS {
            store.append("counter", 0, format!("m{m}").as_bytes(), b"", 0, &create).unwrap();
            sent.insert(format!("m{m}"), Vec::new());
        }
        for i in 0..DIFFS {
            let id = format!("m{}", rng.random_range(0..MODELS));
            let diff = format!(r#"{{"add":{}}}"#, i % 13);
            store.append("counter", 0, id.as_bytes(), diff.as_bytes(), 0, &[]).unwrap();
            sent.get_mut(&id).unwrap().push(diff);
        }
    }
    let client = reqwest::Client::new();
    let args = ["--batch-records-max", "250"].map(String::from);
    let mut mid_fold = 0;
    for _ in 0..KILLS {
        let mut server = Serve::start_with(dir.path(), &args);
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        let ready = client.get(format!("{}/readyz", server.url)).send().await.is_ok_and(|r| r.status() == 200);
        mid_fold += usize::from(!ready);
        server.signal("KILL");
        server.wait();
    }
    assert!(mid_fold >= 2, "only {mid_fold} of the {KILLS} kills came before the backlog was folded");
    let server = Serve::start_with(dir.path(), &args);
    server.wait_ready_within(&client, Duration::from_secs(120)).await;
    let get = |path: String| {
        let request = client.get(format!("{}{path}", server.url)).send();
        async move { json_of(request.await.unwrap()).await }
    };
    for (id, diffs) in &sent {
        let (sum, hash) = reference(id, diffs);
        let (status, body) = get(format!("/v1/models/counter/{id}")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (&body["state"], &body["seq"], body["hash"].as_str().unwrap()),
            (&json!(sum), &json!(diffs.len()), hash.to_string().as_str()),
            "{id}: every record folded exactly once"
        );
        let k = rng.random_range(1..=diffs.len());
        let (sum, hash) = reference(id, &diffs[..k]);
        let (status, body) = get(format!("/v1/models/counter/{id}?at={hash}")).await;
        assert_eq!((status, &body["state"], &body["seq"]), (200, &json!(sum), &json!(k)), "{id} at seq {k}: {body}");
    }
}

/// A bad configuration is refused at start, with a message naming what is wrong.
#[test]
fn bad_configuration_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let output = Command::new(statefold_tests::statefold_binary()).arg("serve").args(args).output().unwrap();
        assert!(!output.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    assert!(run(&["--data-dir", data]).contains("no kinds configured"));
    assert!(run(&["--data-dir", data, "--kind", "c=missing.wasm"]).contains("missing.wasm not found"));
    let counter = statefold_tests::wasm("counter");
    let kind = format!("Bad Name={}", counter.display());
    assert!(run(&["--data-dir", data, "--kind", &kind]).contains("kind name \"Bad Name\""));
    let kind = format!("c={}", counter.display());
    let stderr = run(&["--data-dir", data, "--kind", &kind, "--batch-records-max", "0"]);
    assert!(stderr.contains("limits.batch_records_max: must be positive"), "{stderr}");
    let config = dir.path().join("statefold.toml");
    std::fs::write(&config, "[limits]\ndiff_byte_max = 5\n").unwrap();
    let stderr = run(&["--config", config.to_str().unwrap()]);
    assert!(stderr.contains("unknown field `diff_byte_max`"), "{stderr}");
}
