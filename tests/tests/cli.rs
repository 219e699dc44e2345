//! The `statefold` binary, as a user runs it, on a real reducer built from `reducers/`.

use statefold_tests::process::Serve;

#[test]
fn cli_check_prints_what_a_reducer_declares() {
    let bin = statefold_tests::statefold_binary();
    let out = std::process::Command::new(&bin)
        .args(["reducer", "check"])
        .arg(statefold_tests::wasm("document"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "reducer:       document 0.1.0",
        "contract:      statefold:reducer@0.1.0",
        "capabilities:  merge, delta",
        "empty state:   {} (round-trips)",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }

    let core = std::env::temp_dir().join(format!("statefold-core-{}.wasm", std::process::id()));
    std::fs::write(&core, wat::parse_str("(module)").unwrap()).unwrap();
    let out = std::process::Command::new(&bin).args(["reducer", "check"]).arg(&core).output().unwrap();
    std::fs::remove_file(&core).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("a core WebAssembly module, not a component"), "{stderr}");
}

/// `statefold replay KIND` against a running server: starts the replay, prints progress,
/// exits 0 when every model is rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_replay_runs_a_replay_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start_with(dir.path(), &["--replay-page-models".into(), "2".into()]);
    let client = reqwest::Client::new();
    serve.wait_ready(&client).await;
    for i in 0..5 {
        let create = client.post(format!("{}/v1/models/counter", serve.url)).body(format!(r#"{{"id":"m{i}"}}"#));
        assert_eq!(create.send().await.unwrap().status(), 201);
        let url = format!("{}/v1/models/counter/m{i}/diffs?wait=applied", serve.url);
        let answer = client.post(url).body(r#"{"add": 2}"#).send().await.unwrap();
        assert_eq!(answer.status(), 200);
    }
    let before: serde_json::Value =
        client.get(format!("{}/v1/models/counter/m3", serve.url)).send().await.unwrap().json().await.unwrap();
    let url = serve.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(statefold_tests::statefold_binary())
            .args(["replay", "counter", "--interval-s", "0.05", "--url", &url])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.trim_end().ends_with("replay counter: 5/5 models rebuilt, 0 failed (finished)"), "{stdout}");
    let after: serde_json::Value =
        client.get(format!("{}/v1/models/counter/m3", serve.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!((&after["state"], &after["seq"]), (&before["state"], &before["seq"]), "same reducer, same state");
    assert_ne!(after["hash"], before["hash"], "a replay starts a new chain");
    // An unknown kind: the server's error, exit 1.
    let out = std::process::Command::new(statefold_tests::statefold_binary())
        .args(["replay", "nope", "--url", &serve.url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown kind"), "{}", String::from_utf8_lossy(&out.stderr));
    serve.signal("TERM");
    assert!(serve.wait().success());
}
