//! The served OpenAPI document against what the server answers: Schemathesis (a
//! schema-driven fuzzer, from PyPI) generates requests from `/v1/openapi.json`, valid and
//! invalid, in every phase (examples, coverage, fuzzing, stateful), and checks every
//! response: no 5xx, a status the document lists for the operation, its content type,
//! headers and body schema, a schema-valid request accepted and a schema-violating one
//! refused, and (our check,
//! `tests/schemathesis/statefold_hooks.py`) that a refused write leaves the log as it was.
//!
//! `PUT /v1/reducers/{name}` takes its `application/wasm` bodies from the hooks' serializer:
//! the module the server runs for that name (a full deploy check, answered `unchanged`),
//! or bytes that are no module.
//!
//! The SSE stream (`GET …/events`) is read up to its first event (`max-stream-events` in
//! the run's `schemathesis.toml`: a stream never ends, and one with nothing more to send
//! would hold each case for the request timeout), which is checked against the document's
//! `itemSchema` (`StreamEvent`): a snapshot, a patch, a diff, `synced`, a reset or an
//! error, as the generated request earns it. tests/sse.rs covers the rest of a stream.

use statefold::config::Limits;
use statefold_tests::http::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_response_off_the_document() {
    // Waits short (a generated `?folded=` or `?wait=applied` that cannot be met answers
    // 504 after wait_applied_ms_max; an unknown hash waits failover_wait_ms).
    let limits = Limits { wait_applied_ms_max: 300, failover_wait_ms: 100, ..Limits::default() };
    let server = TestServer::start(limits).await;
    // Models to find, so that reads of a known kind and id are part of the run.
    server.create("counter", "c1").await;
    server.apply("counter", "c1", r#"{"add":2}"#).await;
    server.create("document", "d1").await;
    server.apply("document", "d1", r#"{"title":"t"}"#).await;

    let python = std::env::var("STATEFOLD_PYTHON").unwrap_or_else(|_| "python3".into());
    let schema = server.url("/v1/openapi.json");
    let base = server.url("");
    let report = tempfile::tempdir().unwrap();
    // 40 in the suite; a longer run: STATEFOLD_SCHEMATHESIS_EXAMPLES=600 (about 5 minutes).
    let examples = std::env::var("STATEFOLD_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "40".into());
    let args: Vec<String> = [
        "-c",
        "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
        "run",
        &schema,
        "--url",
        &base,
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,positive_data_acceptance,negative_data_rejection,refused_writes_store_nothing",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        &examples,
        "--seed",
        "7",
        // One worker: `refused_writes_store_nothing` compares the log before and after.
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
        "--report",
        "junit",
        "--report-dir",
    ]
    .into_iter()
    .map(String::from)
    .chain([report.path().display().to_string()])
    .collect();
    let cwd = report.path().to_owned();
    std::fs::write(cwd.join("schemathesis.toml"), "max-stream-events = 1\n").unwrap();
    let hooks_dir = statefold_tests::workspace_root().join("tests/schemathesis");
    let base_url = base.clone();
    let modules = statefold_tests::wasm("counter").parent().unwrap().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .args(&args)
            // Its cache (`.schemathesis/`) goes to the temp dir, not the repository.
            .current_dir(&cwd)
            .env("NO_COLOR", "1")
            // tests/schemathesis/statefold_hooks.py: the check that a refused write
            // stores nothing.
            .env("PYTHONPATH", hooks_dir)
            .env("SCHEMATHESIS_HOOKS", "statefold_hooks")
            .env("STATEFOLD_URL", base_url)
            .env("STATEFOLD_MODULES", modules)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"))
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "Schemathesis found responses off the document (./dev.sh test installs it and sets STATEFOLD_PYTHON):\n{stdout}\n{stderr}"
    );
    // It ran operations, not nothing; its summary goes to the test's output.
    assert!(stdout.contains("passed"), "{stdout}");
    let summary = stdout.split("SUMMARY").nth(1).unwrap_or(&stdout);
    println!("Schemathesis:{summary}");
    server.stop().await;
}
