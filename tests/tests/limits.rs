//! Ids and sizes at their limits (issue 17, item 6), through the real router, fold and
//! store: model ids with `/`, `%`, spaces, quotes and Unicode, one of exactly 256 bytes,
//! through create, append, GET, SSE, the listing's cursor and rejections; a state of 50 MB
//! against `state_cache_bytes_max`; 1,000,000 models listed page by page.

mod common;

use serde_json::{Value, json};
use statefold::chain::Hash;
use statefold::config::Limits;
use statefold_tests::http::{SseEvent, SseStream, TestServer, json_of};

/// `id` as one URL path segment (or query value): every byte but the unreserved ones
/// percent-encoded.
fn encode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The first event past the stream's opening `retry:`.
async fn first_event(events: &mut SseStream) -> SseEvent {
    loop {
        let event = events.next().await.expect("an event");
        if event.event != "message" {
            return event;
        }
    }
}

fn ids() -> Vec<String> {
    // 256 bytes: 64 four-byte characters.
    let longest = "𝄞".repeat(64);
    assert_eq!(longest.len(), 256);
    vec![
        "a/b/c".into(),
        "100% sure".into(),
        "with space and \"quotes\"".into(),
        "naïve café – 東京 🚀".into(),
        "?query#fragment&x=1".into(),
        longest,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_and_longest_ids_pass_through_every_route() {
    let server = TestServer::start(Limits::default()).await;
    let mut expected = Vec::new();
    for id in ids() {
        let path = format!("/v1/models/counter/{}", encode(&id));
        let (status, created) = server.post("/v1/models/counter", json!({ "id": id }).to_string()).await;
        assert_eq!((status, &created["id"]), (201, &json!(id)), "{created}");
        let mut events = SseStream::new(server.client.get(server.url(&format!("{path}/events"))).send().await.unwrap());
        let snapshot = first_event(&mut events).await;
        assert_eq!(snapshot.event, "snapshot", "{id}");
        let (status, applied) = server.post(&format!("{path}/diffs?wait=applied"), r#"{"add":5}"#).await;
        assert_eq!(status, 200, "{id}: {applied}");
        let hash = Hash::genesis("counter", &id).next(br#"{"add":5}"#);
        assert_eq!(applied["hash"], hash.to_string(), "{id}: the chain over the id's bytes");
        // The live diff reaches the stream (after `synced`).
        let mut seen = None;
        while let Some(event) = events.next().await {
            if event.event == "diff" {
                seen = Some(event.json());
                break;
            }
        }
        assert_eq!(seen.expect("a diff event")["hash"], hash.to_string(), "{id}");
        let (status, model) = server.get(&path).await;
        assert_eq!((status, &model["id"], &model["state"]), (200, &json!(id), &json!(5)), "{model}");
        let (status, at) = server.get(&format!("{path}?at={hash}")).await;
        assert_eq!((status, &at["state"]), (200, &json!(5)), "{at}");
        // A diff the reducer refuses is listed under the id as it is.
        let overflow = format!(r#"{{"add":{}}}"#, i64::MAX);
        let (status, refused) = server.post(&format!("{path}/diffs?wait=applied"), overflow).await;
        assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("refused")), "{refused}");
        expected.push(id);
    }
    // One byte more than the limit is refused, and creates nothing.
    let over = format!("{}x", "𝄞".repeat(64));
    let (status, body) = server.post("/v1/models/counter", json!({ "id": over }).to_string()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_id")), "{body}");

    // The listing, a page of one at a time, the cursor carried as the server gave it.
    expected.sort();
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = after.as_deref().map(|a| format!("&after={}", encode(a))).unwrap_or_default();
        let (status, page) = server.get(&format!("/v1/models/counter?limit=1{query}")).await;
        assert_eq!(status, 200, "{page}");
        listed.extend(page["models"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()));
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(listed, expected);
    let (_, rejections) = server.get("/v1/kinds/counter/rejections?limit=100").await;
    let mut keys: Vec<String> =
        rejections["rejections"].as_array().unwrap().iter().map(|r| r["key"].as_str().unwrap().to_owned()).collect();
    keys.sort();
    assert_eq!(keys, expected, "each refused diff listed under its model's id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_state_is_folded_served_and_streamed_past_the_state_cache() {
    // The state is larger than the cache may hold (a quarter of state_cache_bytes_max at
    // most per entry): every read materializes it from the store.
    let limits = Limits { state_cache_bytes_max: 16 << 20, ..Limits::default() };
    let server = TestServer::start(limits).await;
    server.create("document", "big").await;
    let chunk = "x".repeat(1_000_000 - 64);
    for i in 0..50 {
        let diff = format!(r#"{{"part{i:02}":"{chunk}"}}"#);
        let (status, body) = server.post("/v1/models/document/big/diffs?wait=applied", diff).await;
        assert_eq!(status, 200, "diff {i}: {body}");
    }
    let response = server.client.get(server.url("/v1/models/document/big")).send().await.unwrap();
    let (status, model) = json_of(response).await;
    assert_eq!((status, model["seq"].as_u64()), (200, Some(50)));
    let state = model["state"].as_object().unwrap();
    assert_eq!(state.len(), 50);
    assert!(state.values().all(|v| v.as_str().map(str::len) == Some(chunk.len())), "every part whole");
    let bytes = serde_json::to_vec(&model["state"]).unwrap().len();
    assert!(bytes > 49_000_000, "the state is {bytes} bytes");
    // A stream opens with the whole state as its snapshot.
    let mut events = server.events("document", "big", None).await;
    let snapshot = first_event(&mut events).await;
    assert_eq!(snapshot.event, "snapshot");
    let snapshot: Value = snapshot.json();
    assert_eq!(snapshot["state"].as_object().unwrap().len(), 50);
    assert_eq!(snapshot["hash"], model["hash"]);
}

/// 1,000,000 `counter` models, folded into the store by the engine from create records
/// (the log's path, without the hours an HTTP create per model takes), then served: the
/// list answers them all page by page, each once, in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_models_are_listed_page_by_page() {
    use statefold::fold::{Engine, FoldLimits, KindSpec, Known, Versions};
    use statefold::model::{CREATE_HEADER, Record};
    use statefold::store::{Store, StoreOptions};

    const MODELS: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    {
        let runtime = common::runtime(statefold::reducer::ReducerLimits::default());
        let reducer = common::load(&runtime, "counter");
        let store = Store::open(&dir.path().join("db"), &StoreOptions::default()).unwrap();
        let versions = Versions::new(std::sync::Arc::new(Known(vec![reducer.clone()])), 2);
        let mut engine =
            Engine::new(vec![KindSpec::new("counter", "counter", &reducer)], FoldLimits::default(), versions);
        let id = |n: u64| format!("model-{n:07}");
        for batch in 0..MODELS / 10_000 {
            let records: Vec<Record> = (batch * 10_000..(batch + 1) * 10_000)
                .map(|n| Record {
                    topic: "counter".into(),
                    partition: 0,
                    offset: n,
                    key: Some(id(n).into_bytes()),
                    value: bytes::Bytes::new(),
                    timestamp_ms: None,
                    headers: vec![(CREATE_HEADER.to_owned(), Vec::new())],
                })
                .collect();
            let folded = engine.fold(&records, &store).unwrap();
            assert_eq!(folded.created.len(), 10_000);
            store.commit(&folded, &[]).unwrap();
        }
    }
    eprintln!("1,000,000 models folded into the store in {:?}", started.elapsed());
    let server = TestServer::start_in(dir, Limits::default()).await;
    let started = std::time::Instant::now();
    let (mut count, mut pages, mut last) = (0u64, 0u64, String::new());
    let mut after: Option<String> = None;
    loop {
        let query = after.as_deref().map(|a| format!("&after={}", encode(a))).unwrap_or_default();
        let (status, page) = server.get(&format!("/v1/models/counter?limit=1000{query}")).await;
        assert_eq!(status, 200, "{page}");
        for model in page["models"].as_array().unwrap() {
            let id = model["id"].as_str().unwrap();
            assert!(id > last.as_str(), "{id} after {last}: in order, each once");
            assert_eq!(model["seq"], 0);
            last = id.to_owned();
            count += 1;
        }
        pages += 1;
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    eprintln!("listed {count} models in {pages} pages in {:?}", started.elapsed());
    assert_eq!(count, MODELS);
    assert_eq!(last, "model-0999999");
    assert!(pages <= MODELS / 1000 + 1, "{pages} pages");
}
