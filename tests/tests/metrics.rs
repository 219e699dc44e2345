//! `/metrics` as Prometheus reads it: parsed by the Python `prometheus_client` parser (the
//! reference implementation's text parser), every family with help text, the histograms
//! present, and moving while a server folds diffs and serves streams.

use std::collections::BTreeMap;

use serde_json::Value;
use statefold::config::Limits;
use statefold_tests::http::TestServer;

/// Parses a scrape with `prometheus_client.parser`; returns each family's type, help and
/// samples as JSON.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    out[family.name] = {
        "type": family.type,
        "help": family.documentation,
        "samples": [[s.name, s.labels, s.value] for s in family.samples],
    }
print(json.dumps(out))
"#;

fn parse(text: &str) -> BTreeMap<String, Value> {
    use std::io::Write;
    let python = std::env::var("STATEFOLD_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = std::process::Command::new(&python)
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser refused /metrics (./dev.sh test installs prometheus-client and sets STATEFOLD_PYTHON): {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the parser's JSON")
}

/// Sum of the `_count` samples of histogram family `name` (over its labels).
fn count(families: &BTreeMap<String, Value>, name: &str) -> f64 {
    let family = families.get(name).unwrap_or_else(|| panic!("no family {name}: {:?}", families.keys()));
    assert_eq!(family["type"], "histogram", "{name}");
    family["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s[0] == format!("{name}_count"))
        .map(|s| s[2].as_f64().unwrap())
        .sum()
}

fn value(families: &BTreeMap<String, Value>, family: &str, sample: &str) -> f64 {
    let samples = families[family]["samples"].as_array().unwrap();
    samples.iter().filter(|s| s[0] == sample).map(|s| s[2].as_f64().unwrap()).sum()
}

async fn scrape(server: &TestServer) -> BTreeMap<String, Value> {
    let response = server.client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    parse(&response.text().await.unwrap())
}

const HISTOGRAMS: [&str; 6] = [
    "statefold_fold_batch_seconds",
    "statefold_store_commit_seconds",
    "statefold_reducer_call_seconds",
    "statefold_catchup_plan_seconds",
    "statefold_sse_publish_delay_seconds",
    "statefold_http_request_seconds",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_with_help_and_moving_histograms() {
    let server = TestServer::start(Limits::default()).await;
    let before = scrape(&server).await;
    for (name, family) in &before {
        assert!(!family["help"].as_str().unwrap_or("").is_empty(), "{name} has no # HELP");
    }
    for name in HISTOGRAMS {
        count(&before, name); // present (and a histogram) before anything happened
    }
    // Families the docs name, kept from before the move to prometheus-client.
    for name in [
        "statefold_fold_batches",
        "statefold_diffs_applied",
        "statefold_sse_subscribers",
        "statefold_sse_lagged",
        "statefold_ready",
        "statefold_store_commits",
        "statefold_store_commit_entries",
        "statefold_store_commit_bytes",
        "statefold_deploy_records_folded",
        "statefold_deploy_batch_max_seconds",
        "statefold_source_next_offset",
    ] {
        assert!(before.contains_key(name), "{name} missing: {:?}", before.keys());
    }

    // Load: a stream following a model while diffs are applied, a catch-up, a refusal.
    server.create("counter", "m").await;
    let mut stream = server.events("counter", "m", None).await;
    let mut last = String::new();
    for _ in 0..20 {
        last = server.apply("counter", "m", r#"{"add":1}"#).await["hash"].as_str().unwrap().to_owned();
    }
    let mut diffs = 0;
    while diffs < 20 {
        let event = stream.next().await.expect("the stream goes on");
        diffs += usize::from(event.event == "diff");
    }
    let (status, _) = server.get(&format!("/v1/models/counter/m/diffs?since={last}")).await;
    assert_eq!(status, 200);
    let (status, _) = server.post("/v1/models/counter/m/diffs?wait=applied", "not json").await;
    assert_eq!(status, 400);
    // A method of the client's own making is counted, but under `other`: clients cannot
    // grow the label set.
    let fuzz = reqwest::Method::from_bytes(b"FUZZ").unwrap();
    let response = server.client.request(fuzz, server.url("/healthz")).send().await.unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());
    server.create("counter", "big").await;
    server.apply("counter", "big", &format!(r#"{{"add":{}}}"#, i64::MAX)).await;
    let (status, body) = server.post("/v1/models/counter/big/diffs?wait=applied", r#"{"add":1}"#).await;
    assert_eq!(status, 409, "the counter refuses to overflow: {body}");

    let after = scrape(&server).await;
    for name in HISTOGRAMS {
        assert!(
            count(&after, name) > count(&before, name),
            "{name} did not move: {} then {}",
            count(&before, name),
            count(&after, name)
        );
    }
    assert_eq!(value(&after, "statefold_diffs_applied", "statefold_diffs_applied_total"), 21.0);
    // A labelled family has lines once it has a label set: rejections by code.
    let rejected = after["statefold_records_rejected"]["samples"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!((rejected[0][1]["code"].as_str(), rejected[0][2].as_f64()), (Some("refused"), Some(1.0)));
    assert_eq!(value(&after, "statefold_sse_subscribers", "statefold_sse_subscribers"), 1.0);
    assert_eq!(value(&after, "statefold_ready", "statefold_ready"), 1.0);
    // Requests are counted by route pattern and status, never by path.
    let requests = after["statefold_http_request_seconds"]["samples"].as_array().unwrap();
    let routes: Vec<(&str, &str)> = requests
        .iter()
        .filter(|s| s[0] == "statefold_http_request_seconds_count")
        .map(|s| (s[1]["route"].as_str().unwrap(), s[1]["status"].as_str().unwrap()))
        .collect();
    assert!(routes.contains(&("/v1/models/{kind}/{id}/diffs", "200")), "{routes:?}");
    assert!(routes.contains(&("/v1/models/{kind}/{id}/diffs", "400")), "{routes:?}");
    assert!(routes.iter().all(|(route, _)| !route.contains("/m/")), "{routes:?}");
    let methods: Vec<&str> = requests.iter().map(|s| s[1]["method"].as_str().unwrap()).collect();
    assert!(methods.contains(&"other") && !methods.contains(&"FUZZ"), "{methods:?}");
    drop(stream);
    server.stop().await;
}
