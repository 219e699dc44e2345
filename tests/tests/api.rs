//! The HTTP API over real HTTP, against the real router, store and .wasm reducers.

use serde_json::{Value, json};
use statefold::chain::Hash;
use statefold::config::Limits;
use statefold_tests::http::TestServer;

/// The model's state and version, as GET returns them.
async fn snapshot(server: &TestServer, kind: &str, id: &str) -> (u16, Value) {
    server.get(&format!("/v1/models/{kind}/{id}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_append_read_list() {
    let server = TestServer::start(Limits::default()).await;
    let created = server.create("counter", "c1").await;
    let genesis = Hash::genesis("counter", "c1");
    assert_eq!(created, json!({"id": "c1", "hash": genesis.to_string(), "seq": 0}));

    // A generated id.
    let (status, generated) = server.post("/v1/models/counter", "").await;
    assert_eq!(status, 201, "{generated}");
    assert_eq!(generated["id"].as_str().unwrap().len(), 32);

    let v1 = server.apply("counter", "c1", r#"{"add":5}"#).await;
    let h1 = genesis.next(br#"{"add":5}"#);
    // Offsets are the topic's: the two create records came first.
    assert_eq!(v1, json!({"id": "c1", "hash": h1.to_string(), "seq": 1, "offset": 2}));
    let v2 = server.apply("counter", "c1", r#"{"sub":2}"#).await;
    let h2 = h1.next(br#"{"sub":2}"#);
    assert_eq!(v2["hash"], h2.to_string());

    let response = server.client.get(server.url("/v1/models/counter/c1")).send().await.unwrap();
    assert_eq!(response.headers()["etag"], format!("\"{h2}\""));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"kind": "counter", "id": "c1", "hash": h2.to_string(), "seq": 2, "offset": 3, "state": 3}));
    let not_modified = server
        .client
        .get(server.url("/v1/models/counter/c1"))
        .header("If-None-Match", format!("\"{h2}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);

    // A past version.
    let (status, at) = server.get(&format!("/v1/models/counter/c1?at={h1}")).await;
    assert_eq!((status, &at["state"], &at["seq"]), (200, &json!(5), &json!(1)));
    let (status, at0) = server.get(&format!("/v1/models/counter/c1?at={genesis}")).await;
    assert_eq!((status, &at0["state"]), (200, &json!(0)));

    // What a client at h1 / genesis misses: the diff itself / a merged diff.
    let (_, missing) = server.get(&format!("/v1/models/counter/c1/diffs?since={h1}")).await;
    let counter = blake3::hash(&std::fs::read(statefold_tests::wasm("counter")).unwrap()).to_hex().to_string();
    assert_eq!(
        missing,
        json!({"kind": "patch", "from": h1.to_string(), "to": h2.to_string(), "seq": 2, "diff": {"sub": 2}, "version": counter})
    );
    let (_, merged) = server.get(&format!("/v1/models/counter/c1/diffs?since={genesis}")).await;
    assert_eq!(merged["kind"], "patch");
    assert_eq!(merged["diff"], json!({"add": 3}));
    let (_, current) = server.get(&format!("/v1/models/counter/c1/diffs?since={h2}")).await;
    assert_eq!(current, json!({"kind": "up_to_date", "hash": h2.to_string(), "seq": 2}));
    let unknown = Hash::genesis("x", "y");
    let (_, reset) = server.get(&format!("/v1/models/counter/c1/diffs?since={unknown}")).await;
    assert_eq!((&reset["kind"], &reset["reset"], &reset["state"]), (&json!("snapshot"), &json!("unknown"), &json!(3)));

    // Listing, paged.
    for id in ["c2", "c3"] {
        server.create("counter", id).await;
    }
    let (_, page) = server.get("/v1/models/counter?limit=2").await;
    let ids: Vec<&str> = page["models"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    let (_, rest) = server.get(&format!("/v1/models/counter?limit=10&after={}", page["next"].as_str().unwrap())).await;
    assert_eq!(rest["models"].as_array().unwrap().len(), 2, "4 models in all: {page} {rest}");
    assert_eq!(rest["next"], Value::Null);

    let (status, openapi) = server.get("/v1/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/v1/models/{kind}",
        "/v1/models/{kind}/{id}",
        "/v1/models/{kind}/{id}/diffs",
        "/v1/models/{kind}/{id}/events",
        "/v1/kinds/{kind}/rejections",
        "/v1/kinds/{kind}/replay",
        "/v1/reducers",
        "/v1/reducers/{name}",
    ] {
        assert!(openapi["paths"][path].is_object(), "OpenAPI lacks {path}");
    }
    let (status, _) = server.get("/healthz").await;
    assert_eq!(status, 200);
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("statefold_diffs_applied_total 2"), "{metrics}");
    assert!(metrics.contains("statefold_deploy_records_folded_total 0"), "{metrics}");
}

/// Every bad input: its status and code, and nothing stored for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_stores_nothing() {
    // Unknown hashes and models are answered after failover_wait_ms (they may be versions
    // this replica has not folded yet): short here.
    let limits = Limits { diff_bytes_max: 64, failover_wait_ms: 100, ..Limits::default() };
    let server = TestServer::start(limits).await;
    server.create("counter", "c").await;
    server.create("trap", "t").await;
    let good = server.apply("counter", "c", r#"{"add":1}"#).await;
    let (_, before) = snapshot(&server, "counter", "c").await;

    let cases: Vec<(&str, String, &str, u16, &str)> = vec![
        ("unknown kind", "/v1/models/nope/c/diffs".into(), r#"{"add":1}"#, 404, "unknown_kind"),
        ("unknown model", "/v1/models/counter/nope/diffs".into(), r#"{"add":1}"#, 404, "unknown_model"),
        ("malformed JSON", "/v1/models/counter/c/diffs".into(), r#"{"add":"#, 400, "malformed_json"),
        (
            "too large",
            "/v1/models/counter/c/diffs".into(),
            &*Box::leak(format!(r#"{{"add":1,"pad":"{}"}}"#, "x".repeat(64)).into_boxed_str()),
            413,
            "too_large",
        ),
        ("refused by the reducer", "/v1/models/counter/c/diffs?wait=applied".into(), r#"{"mul":2}"#, 409, "refused"),
        (
            "overflow refused",
            "/v1/models/counter/c/diffs?wait=applied".into(),
            r#"{"add":9223372036854775807}"#,
            409,
            "refused",
        ),
        ("reducer trap", "/v1/models/trap/t/diffs?wait=applied".into(), r#""trap""#, 422, "reducer_failed"),
        ("bad wait", "/v1/models/counter/c/diffs?wait=soon".into(), r#"{"add":1}"#, 400, "bad_query"),
        ("existing model", "/v1/models/counter".into(), r#"{"id":"c"}"#, 409, "model_exists"),
        ("create: malformed body", "/v1/models/counter".into(), r#"{"id":"#, 400, "malformed_json"),
        ("create: invalid id", "/v1/models/counter".into(), "{\"id\":\"a\\u0000b\"}", 400, "invalid_id"),
        ("create: unknown kind", "/v1/models/nope".into(), r#"{"id":"x"}"#, 404, "unknown_kind"),
    ];
    for (what, path, body, status, code) in cases {
        let (got, response) = server.post(&path, body.to_owned()).await;
        assert_eq!((got, response["error"]["code"].as_str()), (status, Some(code)), "{what}: {response}");
        assert!(response["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {response}");
    }
    let gets: Vec<(&str, String, u16, &str)> = vec![
        ("state of unknown kind", "/v1/models/nope/c".into(), 404, "unknown_kind"),
        ("state of unknown model", "/v1/models/counter/nope".into(), 404, "unknown_model"),
        ("malformed hash", "/v1/models/counter/c?at=xyz".into(), 400, "malformed_hash"),
        ("unknown hash", format!("/v1/models/counter/c?at={}", "0".repeat(64)), 404, "unknown_hash"),
        ("diffs without since", "/v1/models/counter/c/diffs".into(), 400, "bad_query"),
        ("diffs, malformed since", "/v1/models/counter/c/diffs?since=12".into(), 400, "malformed_hash"),
        ("events, malformed since", "/v1/models/counter/c/events?since=zz".into(), 400, "malformed_hash"),
        ("events, unknown model", "/v1/models/counter/nope/events".into(), 404, "unknown_model"),
        ("list of unknown kind", "/v1/models/nope".into(), 404, "unknown_kind"),
        ("no such route", "/v2/whatever".into(), 404, "not_found"),
        ("replay progress, none run", "/v1/kinds/counter/replay".into(), 404, "no_replay"),
        ("folded at no such partition", "/v1/models/counter/c?folded=5:0".into(), 404, "unknown_position"),
        ("folded past the log's end", "/v1/models/counter/c?folded=0:1000000".into(), 404, "unknown_position"),
        ("a page of no models", "/v1/models/counter?limit=0".into(), 400, "bad_query"),
    ];
    for (what, path, status, code) in gets {
        let (got, response) = server.get(&path).await;
        assert_eq!((got, response["error"]["code"].as_str()), (status, Some(code)), "{what}: {response}");
    }

    // Nothing was stored: same state and version, and the next diff chains from `good`.
    let (_, after) = snapshot(&server, "counter", "c").await;
    assert_eq!(after, before);
    let (_, list) = server.get("/v1/models/counter").await;
    assert_eq!(list["models"].as_array().unwrap().len(), 1, "{list}");
    let next = server.apply("counter", "c", r#"{"add":2}"#).await;
    let expected = good["hash"].as_str().unwrap().parse::<Hash>().unwrap().next(br#"{"add":2}"#);
    assert_eq!((next["hash"].as_str().unwrap(), &next["seq"]), (expected.to_string().as_str(), &json!(2)));
    let (_, trap) = snapshot(&server, "trap", "t").await;
    assert_eq!(trap["seq"], 0, "{trap}");
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        "statefold_records_rejected_total{code=\"refused\"} 2",
        "statefold_records_rejected_total{code=\"reducer_failed\"} 1",
    ] {
        assert!(metrics.contains(line), "two refusals and a trap: {line} in {metrics}");
    }
}

/// `GET /v1/reducers/{name}/versions/{version}/module`: the bytes the server folds with, for
/// a client to fold with the same code; a version not recorded for that reducer is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reducer_version_module_is_served_as_stored() {
    let server = TestServer::start(Limits::default()).await;
    let (status, shown) = server.get("/v1/reducers/workflow").await;
    assert_eq!(status, 200, "{shown}");
    let version = shown["versions"][0]["version"].as_str().unwrap().to_owned();
    let response = server
        .client
        .get(server.url(&format!("/v1/reducers/workflow/versions/{version}/module")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/wasm");
    assert!(response.headers()["cache-control"].to_str().unwrap().contains("immutable"));
    let bytes = response.bytes().await.unwrap();
    assert_eq!(&bytes[..], &std::fs::read(statefold_tests::wasm("workflow")).unwrap()[..]);
    // The workflow module asked for under another reducer's name, and a made-up version.
    for path in [
        format!("/v1/reducers/counter/versions/{version}/module"),
        format!("/v1/reducers/workflow/versions/{}/module", "0".repeat(64)),
    ] {
        let (status, body) = server.get(&path).await;
        assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_version")), "{path}: {body}");
    }
    let (status, body) = server.get(&format!("/v1/reducers/nothing/versions/{version}/module")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_reducer")), "{body}");
}
