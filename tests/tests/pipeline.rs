//! The fold thread and its commit thread (issue 23): folding batch N+1 overlaps committing
//! batch N. With batches of 16 records, a head cache of 16 models and two resident models
//! of 64, nearly every batch reads heads, checkpoints and diffs the batches just before it
//! wrote; those reads wait for the commit in flight, so every model ends at the reference
//! fold, and again after a restart and more diffs. A real server on the embedded log, the
//! real `counter.wasm`, RocksDB.

use std::collections::BTreeMap;

use serde_json::json;
use statefold::chain::Hash;
use statefold::config::Limits;
use statefold::model::CREATE_HEADER;
use statefold::store::{Store, StoreOptions};
use statefold_tests::http::TestServer;

const MODELS: u64 = 64;

fn limits() -> Limits {
    Limits {
        batch_records_max: 16,
        head_cache_models_max: 16,
        reducer_resident_models_max: 2,
        checkpoint_interval_diffs: 5,
        checkpoint_tail_percent: 0,
        retain_checkpoints: 2,
        // Each commit waits for the disk: the fold of the next batch is well under way
        // while one is in flight.
        store_fsync: true,
        ..Limits::default()
    }
}

/// Diff `i` of the run: `{"add":k}` to a model drawn by a fixed pseudo-random sequence
/// (so that a batch shares about a quarter of its models with the one before).
fn diff(i: u64) -> (String, String) {
    let mut x = i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 32;
    (format!("m{}", x % MODELS), json!({ "add": i % 7 + 1 }).to_string())
}

/// Each model's (state, seq, hash) after `diffs` diffs.
fn reference(diffs: u64) -> BTreeMap<String, (u64, u64, Hash)> {
    let mut models: BTreeMap<String, (u64, u64, Hash)> =
        (0..MODELS).map(|m| (format!("m{m}"), (0, 0, Hash::genesis("counter", &format!("m{m}"))))).collect();
    for i in 0..diffs {
        let (id, value) = diff(i);
        let (state, seq, hash) = models.get_mut(&id).expect("a model");
        *state += i % 7 + 1;
        *seq += 1;
        *hash = hash.next(value.as_bytes());
    }
    models
}

async fn check(server: &TestServer, diffs: u64) {
    for (id, (state, seq, hash)) in reference(diffs) {
        let (status, model) = server.get(&format!("/v1/models/counter/{id}")).await;
        assert_eq!(status, 200, "{id}: {model}");
        assert_eq!(
            (&model["state"], &model["seq"], &model["hash"]),
            (&json!(state), &json!(seq), &json!(hash.to_string())),
            "{id} after {diffs} diffs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fold_reading_what_the_batch_before_wrote_waits_for_its_commit() {
    const FIRST: u64 = 6_000;
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(&dir.path().join("db"), &StoreOptions::default()).unwrap();
        let create = vec![(CREATE_HEADER.to_owned(), Vec::new())];
        for m in 0..MODELS {
            store.append("counter", 0, format!("m{m}").as_bytes(), b"", 0, &create).unwrap();
        }
        for i in 0..FIRST {
            let (id, value) = diff(i);
            store.append("counter", 0, id.as_bytes(), value.as_bytes(), 0, &[]).unwrap();
        }
    }
    // Ready once it has folded the whole log, in batches of 16.
    let server = TestServer::start_in(dir, limits()).await;
    check(&server, FIRST).await;
    // A restart: nothing cached; then more diffs through the API, one request at a time.
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, limits()).await;
    check(&server, FIRST).await;
    for i in FIRST..FIRST + 200 {
        let (id, value) = diff(i);
        server.apply("counter", &id, &value).await;
    }
    check(&server, FIRST + 200).await;
}
