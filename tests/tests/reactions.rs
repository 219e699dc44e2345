//! Reducers' reactions on the embedded log: committed with the diff, relayed to their topic
//! once, folded by the kind that reads it (reducers driving each other), nothing from a
//! refused or failed diff, nothing again after a restart; and a reducer built against the
//! previous WIT version (0.1.0) folding beside them.

use std::time::Duration;

use document::Document;
use serde_json::{Value, json};
use statefold::config::{KindConfig, Limits};
use statefold_guest::native::Model;
use statefold_tests::http::{TestServer, example_config};
use workflow::Workflow;

fn config(dir: &std::path::Path) -> statefold::config::Config {
    let kind = |name: &str, wasm: &str, topic: Option<&str>| KindConfig {
        name: name.into(),
        reducer: statefold_tests::wasm(wasm),
        topic: topic.map(Into::into),
    };
    let mut config = example_config(dir, Limits::default());
    config.kinds = vec![
        kind("workflow", "workflow", None),
        // Kind B: reads the workflow reducer's reactions.
        kind("finished", "document", Some("workflow-finished")),
        kind("ctx", "context", None),
        kind("echo", "context", Some("echoes")),
        kind("legacy", "counter01", None),
    ];
    config
}

/// Waits until `GET path` answers 200 with a state `done` accepts.
async fn state_when(server: &TestServer, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..500 {
        let (status, body) = server.get(path).await;
        if status == 200 && done(&body["state"]) {
            return body["state"].clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = server.get(path).await;
    panic!("{path}: never as expected; last {status} {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaction_to_another_kinds_topic_is_folded_by_that_kind_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let first = config(dir.path());
    let server = TestServer::start_config(dir, first).await;
    // Runs that finish three ways, and one that never finishes (no reaction).
    let runs: Vec<(String, Vec<String>)> = (0..12)
        .map(|i| {
            let status = ["succeeded", "failed", "cancelled", ""][i % 4];
            let mut diffs = vec![
                json!({"op": "plan", "steps": ["fetch", "build"]}).to_string(),
                json!({"op": "start", "step": "fetch", "at": 10 + i}).to_string(),
                json!({"op": "complete", "step": "fetch", "at": 20 + i}).to_string(),
                json!({"op": "skip", "step": "build"}).to_string(),
            ];
            if !status.is_empty() {
                diffs.push(json!({"op": "finish", "status": status, "at": 100 + i}).to_string());
                // Refused (the run is over): emits nothing.
                diffs.push(json!({"op": "finish", "status": "failed", "at": 200 + i}).to_string());
            }
            (format!("run-{i}"), diffs)
        })
        .collect();
    for (id, diffs) in &runs {
        server.create("workflow", id).await;
        for diff in diffs {
            let (status, body) = server.post(&format!("/v1/models/workflow/{id}/diffs"), diff.clone()).await;
            assert_eq!(status, 202, "{body}");
        }
    }
    // The reference: the same diffs folded natively, their reactions folded by `document`.
    for (id, diffs) in &runs {
        let mut run = Model::<Workflow>::new(id.as_str());
        let mut finished = Model::<Document>::new(id.as_str());
        let mut reactions = 0;
        for diff in diffs {
            for reaction in run.apply_emitting(diff.as_bytes(), 0, &[]).unwrap_or_default() {
                assert_eq!((reaction.topic.as_str(), reaction.key.as_str()), ("workflow-finished", id.as_str()));
                finished.apply(&reaction.value, 0, &[]).unwrap();
                reactions += 1;
            }
        }
        let path = format!("/v1/models/finished/{id}");
        if reactions == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(server.get(&path).await.0, 404, "{id} never finished: no reaction");
            continue;
        }
        assert_eq!(reactions, 1);
        let want: Value = serde_json::from_slice(&finished.snapshot()).unwrap();
        let got = state_when(&server, &path, |s| *s == want).await;
        assert_eq!(got["run"], json!(id));
        let (_, head) = server.get(&path).await;
        assert_eq!(head["seq"], 1, "folded once: {head}");
    }

    // `context`: an emitting diff per call; a refused one and one to an invalid topic emit
    // nothing, and the failed one fails alone.
    server.create("ctx", "m").await;
    server.apply("ctx", "m", r#"{"emit":"echoes","i":1}"#).await;
    let (status, body) = server.post("/v1/models/ctx/m/diffs?wait=applied", r#"{"emit":"echoes","refuse":true}"#).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("refused")), "{body}");
    let (status, body) = server.post("/v1/models/ctx/m/diffs?wait=applied", r#"{"emit":"no such topic!"}"#).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("reducer_failed")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("not allowed in a topic name"), "{body}");
    server.apply("ctx", "m", r#"{"emit":"echoes","i":2}"#).await;
    let echo = state_when(&server, "/v1/models/echo/m", |s| s.as_array().is_some_and(|a| a.len() == 2)).await;
    let seen: Vec<(Value, Value)> =
        echo.as_array().unwrap().iter().map(|s| (s["diff"]["n"].clone(), s["diff"]["diff"]["i"].clone())).collect();
    assert_eq!(seen, [(json!(1), json!(1)), (json!(2), json!(2))], "in order, each once: {echo}");
    let relayed_header = &echo[0]["headers"];
    let id_header =
        relayed_header.as_array().unwrap().iter().find(|h| h[0] == "statefold-reaction-id").expect("identity");
    assert_eq!(id_header[1], json!(hex("ctx/1/0/m")));

    // A reducer built against statefold:reducer@0.1.0 folds beside them.
    server.create("legacy", "c").await;
    server.apply("legacy", "c", "5").await;
    let (status, body) = server.post("/v1/models/legacy/c/diffs?wait=applied", "-9").await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("refused")), "{body}");
    server.apply("legacy", "c", "2").await;
    assert_eq!(server.get("/v1/models/legacy/c").await.1["state"], json!(7));

    let (_, ready) = server.get("/readyz").await;
    assert_eq!(ready["outbox"]["pending"], 0, "{ready}");
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("statefold_reactions_relayed_total 11"), "9 runs finished, 2 echoes:\n{metrics}");

    // After a restart nothing is relayed again.
    let dir = server.stop().await;
    let again = config(dir.path());
    let server = TestServer::start_config(dir, again).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.get("/v1/models/echo/m").await.1["state"].as_array().unwrap().len(), 2);
    assert_eq!(server.get("/v1/models/finished/run-0").await.1["seq"], 1);
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}
