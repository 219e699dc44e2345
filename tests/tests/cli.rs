//! The `statefold` binary, as a user runs it, on a real reducer built from `reducers/`.

use std::path::{Path, PathBuf};

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
        "contract:      statefold:reducer@0.2.0",
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

/// `statefold ARGS`, run to its end off the async threads: (exit code, stdout, stderr).
async fn run(args: Vec<String>, envs: Vec<(&'static str, String)>) -> (Option<i32>, String, String) {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(statefold_tests::statefold_binary()).args(&args).envs(envs).output()
    })
    .await
    .unwrap()
    .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `statefold deploy` and `statefold versions` against a server with `[auth]`: without a
/// token, the server's 401; with one (`STATEFOLD_TOKEN`), the new version deployed and
/// listed first; a file that is not a reducer, the server's refusal and exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_deploy_and_versions_speak_to_a_server_with_a_token() {
    const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes!";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("auth.toml");
    std::fs::write(&config, format!("[auth]\naudience = \"statefold\"\nhs256_secret = \"{SECRET}\"\n")).unwrap();
    let serve = Serve::start_with(dir.path(), &args(&["--config", config.to_str().unwrap()]));
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let claims = serde_json::json!({"sub": "ci", "aud": "statefold", "exp": exp,
        "grants": [{"actions": ["deploy", "read"], "models": "counter/*"}]});
    let token = statefold_tests::http::hs256_token(SECRET, &claims);
    let url = serve.url.clone();

    let (code, _, stderr) = run(args(&["versions", "counter", "--server", &url]), vec![]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("401") && stderr.contains("unauthenticated"), "{stderr}");

    let v2 = statefold_tests::wasm("counter_v2").display().to_string();
    let with = vec![("STATEFOLD_TOKEN", token.clone())];
    let (code, stdout, stderr) = run(args(&["deploy", &v2, "--name", "counter", "--server", &url]), with.clone()).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("counter: deployed: version ") && stdout.contains("(counter 2.0.0), 1 partition(s)"),
        "{stdout}"
    );
    let id = stdout.split("version ").nth(1).unwrap().split(' ').next().unwrap().to_owned();
    // Again: already active.
    let (code, stdout, _) = run(args(&["deploy", &v2, "--name", "counter", "--server", &url]), with.clone()).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("already active"), "{stdout}");

    let (code, stdout, stderr) = run(args(&["versions", "counter", "--server", &url]), with.clone()).await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "reducer counter (kinds: counter)", "{stdout}");
    assert!(lines[2].starts_with(&id[..16]) && lines[2].contains("active") && lines[2].contains("ci"), "{stdout}");
    assert!(lines[2].contains("counter 2.0.0") && lines[3].contains("retired"), "{stdout}");

    let garbage = dir.path().join("counter.wasm");
    std::fs::write(&garbage, b"not a component").unwrap();
    let (code, _, stderr) = run(args(&["deploy", garbage.to_str().unwrap(), "--server", &url]), with).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("422") && stderr.contains("not_wasm"), "{stderr}");
}

/// `statefold tail` follows a model across a restart of its server (same port): every
/// diff's seq is printed exactly once (or covered by the one patch after the resume),
/// and Ctrl-C (SIGINT) ends it with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tail_prints_every_event_once_across_a_server_restart() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let port = statefold_tests::process::free_port();
    let mut serve = Serve::on_port(dir.path(), port, &[]);
    let http = reqwest::Client::new();
    serve.wait_ready(&http).await;
    let url = serve.url.clone();
    let create = http.post(format!("{url}/v1/models/counter")).body(r#"{"id":"t"}"#).send().await.unwrap();
    assert_eq!(create.status(), 201);

    let mut tail = std::process::Command::new(statefold_tests::statefold_binary())
        .args(["tail", "counter/t", "--server", &url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = next_line(&mut lines).await;
    assert!(first.starts_with("snapshot seq 0 "), "{first}");
    let append = |n: i64| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let answer =
                http.post(format!("{url}/v1/models/counter/t/diffs?wait=applied")).body(format!(r#"{{"add":{n}}}"#));
            assert_eq!(answer.send().await.unwrap().status(), 200);
        }
    };
    let mut printed = Vec::new();
    for n in 1..=3 {
        append(n).await;
        printed.push(next_line(&mut lines).await);
    }
    // Restart the server on the same port; two diffs land while the tail is cut off.
    serve.signal("TERM");
    assert!(serve.wait().success());
    let mut serve = Serve::on_port(dir.path(), port, &[]);
    serve.wait_ready(&http).await;
    append(4).await;
    append(5).await;
    // The resume: one patch from seq 3 to 5 (or, if the tail reconnected between the two, a
    // patch and a diff); then live diffs.
    let mut seen = 3;
    while seen < 5 {
        let line = next_line(&mut lines).await;
        seen = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        printed.push(line);
    }
    for n in 6..=7 {
        append(n).await;
        printed.push(next_line(&mut lines).await);
    }
    let seqs: Vec<u64> = printed.iter().map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "each seq once, in order: {printed:?}");
    assert_eq!(seqs.last(), Some(&7), "{printed:?}");
    assert!(printed.iter().any(|l| l.starts_with("patch ")), "the resume is a patch: {printed:?}");
    assert!(printed[..3].iter().all(|l| l.starts_with("diff ")), "{printed:?}");

    let status = std::process::Command::new("kill").args(["-INT", &tail.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = tail.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut tail.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("reconnecting") && stderr.contains("tail: stopped"), "{stderr}");
    assert!(lines.recv().await.is_none(), "nothing more printed");
    serve.signal("TERM");
    assert!(serve.wait().success());
}

/// The tail's next line of output (within 20 s).
async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    let line = tokio::time::timeout(std::time::Duration::from_secs(20), lines.recv()).await;
    line.expect("a line within 20 s").expect("the tail runs")
}

/// `statefold test`: cases that hold pass, with the hash a real server gives the same diff;
/// a wrong expected state (with the paths that differ), a wrong hash, an unexpected
/// refusal, and a merge that breaks its law (a deliberately broken reducer) each fail
/// with a readable line, exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_test_folds_cases_and_checks_the_laws() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    // The hash a server gives `{"add": 2}` (as written) appended to counter/case.
    let server = statefold_tests::http::TestServer::start(statefold::config::Limits::default()).await;
    server.create("counter", "case").await;
    let (status, body) = server.post("/v1/models/counter/case/diffs?wait=applied", r#"{"add": 2}"#).await;
    assert_eq!(status, 200, "{body}");
    let hash = body["hash"].as_str().unwrap().to_owned();
    server.stop().await;

    let counter = statefold_tests::wasm("counter").display().to_string();
    let good = write(
        "good.jsonl",
        &format!(
            "# a counter\n{{\"diff\": {{\"add\": 2}}, \"state\": 2, \"hash\": \"{hash}\"}}\n{{\"diff\": {{\"sub\": 5}}, \"state\": -3}}\n\
             {{\"diff\": {{\"sub\": 9223372036854775807}}, \"refused\": \"overflow\"}}\n{{\"model\": \"other\", \"diff\": {{\"add\": 1}}, \"state\": 1}}\n\
             {{\"diff\": {{\"add\": 10}}, \"state\": 7}}\n"
        ),
    );
    let (code, stdout, stderr) = run(args(&["test", &counter, &good, "--laws"]), vec![]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("5 lines, 4 diffs applied, 1 refused as expected"), "{stdout}");
    assert!(
        stdout.contains("merges checked") && stdout.contains("no delta declared") && stdout.ends_with("ok\n"),
        "{stdout}"
    );

    let bad = write(
        "bad.jsonl",
        &format!(
            "{{\"diff\": {{\"add\": 2}}, \"state\": 3, \"hash\": \"{}\"}}\n{{\"diff\": {{\"add\": \"x\"}}}}\n",
            "0".repeat(64)
        ),
    );
    let (code, stdout, _) = run(args(&["test", &counter, &bad]), vec![]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "FAIL line 1 (model \"case\"): the state differs from the expected one:\n    /: expected 3, got 2"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("FAIL line 1 (model \"case\"): hash {hash}, expected {}", "0".repeat(64))),
        "{stdout}"
    );
    assert!(stdout.contains("FAIL line 2 (model \"case\"): refused:"), "{stdout}");

    // A nested state: the differing paths are named.
    let document = statefold_tests::wasm("document").display().to_string();
    let nested = write(
        "nested.jsonl",
        "{\"diff\": {\"a\": {\"b\": 1, \"c\": [1, 2]}}, \"state\": {\"a\": {\"b\": 2, \"c\": [1, 2]}}}\n{\"diff\": {\"d\": true}}\n",
    );
    let (code, stdout, _) = run(args(&["test", &document, &nested, "--laws"]), vec![]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("    /a/b: expected 2, got 1"), "{stdout}");
    assert!(stdout.contains("deltas checked"), "the document reducer's delta law ran: {stdout}");
    assert_eq!(stdout.matches("FAIL").count(), 1, "only the wrong state: {stdout}");

    // The broken merge: caught on the cases' run.
    let badmerge = statefold_tests::wasm("badmerge").display().to_string();
    let run_of_three = write(
        "three.jsonl",
        "{\"diff\": {\"add\": 1}}\n{\"diff\": {\"add\": 2}}\n{\"diff\": {\"add\": 4}, \"state\": 7}\n",
    );
    let (code, stdout, _) = run(args(&["test", &badmerge, &run_of_three, "--laws"]), vec![]).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL merge law, model \"case\", lines 1 to 2: their merge {\"add\":1} gives 1; applied one by one they give 3"),
        "{stdout}"
    );
    // Without --laws the same cases pass: the states folded diff by diff are right.
    let (code, stdout, _) = run(args(&["test", &badmerge, &run_of_three]), vec![]).await;
    assert_eq!(code, Some(0), "{stdout}");
}

/// The language test's steps for one language: build the project, and bump its version.
struct Language {
    lang: &'static str,
    /// What `statefold new` says it created.
    created: &'static str,
    /// Builds the project; the path of its `.wasm`.
    build: fn(&Path) -> PathBuf,
    /// Where the project says its version.
    manifest: &'static str,
    version_0_1: &'static str,
    version_0_2: &'static str,
}

/// A command run to its end in `dir`, which must succeed.
fn command(dir: &Path, program: &str, list: &[&str], envs: &[(&str, &Path)]) {
    let out = std::process::Command::new(program)
        .args(list)
        .current_dir(dir)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_os_str())))
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(out.status.success(), "{program} {list:?}: {}{}", text(&out.stdout), text(&out.stderr));
}

fn build_rust(project: &Path) -> PathBuf {
    // The workspace's lock pins the same dependency versions, so the build reuses what
    // the test build compiled for wasm32-wasip2 (in the same target directory).
    std::fs::copy(statefold_tests::workspace_root().join("Cargo.lock"), project.join("Cargo.lock")).unwrap();
    let target = statefold_tests::target_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    command(
        project,
        &cargo,
        &["build", "--quiet", "--release", "--target", "wasm32-wasip2"],
        &[("CARGO_TARGET_DIR", &target)],
    );
    target.join("wasm32-wasip2/release/tally.wasm")
}

/// The README's commands: `npm install` (from npm's cache, which `./dev.sh` filled with the
/// same pinned packages for reducers/totals-js, when it can), `npm run build`.
fn build_js(project: &Path) -> PathBuf {
    if !project.join("node_modules").exists() {
        command(project, "npm", &["install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"], &[]);
    }
    command(project, "npm", &["run", "--silent", "build"], &[]);
    project.join("tally.wasm")
}

/// The README's commands: a virtualenv with the pinned componentize-py, then its build.
fn build_python(project: &Path) -> PathBuf {
    if !project.join(".venv").exists() {
        command(project, "python3", &["-m", "venv", ".venv"], &[]);
        command(project, ".venv/bin/pip", &["install", "--quiet", "-r", "requirements.txt"], &[]);
    }
    let args = ["-d", "wit/reducer.wit", "-w", "guest", "componentize", "reducer", "-o", "tally.wasm"];
    command(project, ".venv/bin/componentize-py", &args, &[]);
    project.join("tally.wasm")
}

/// From an empty directory: `statefold new` → build → `statefold test` → a server folding
/// the new kind → a changed version rebuilt and `statefold deploy`ed to it (a JavaScript or
/// Python module in chunks: it is larger than a log record) → its models fold with the new
/// version.
async fn new_build_test_deploy(language: Language) {
    let work = tempfile::tempdir().unwrap();
    let project = work.path().join("tally");
    let (code, stdout, stderr) =
        run(args(&["new", "tally", "--lang", language.lang, "--dir", project.to_str().unwrap()]), vec![]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let created = format!("created {} (reducer tally, {}", project.display(), language.created);
    assert!(stdout.starts_with(&created), "{stdout}");
    let build = |project: PathBuf| async move {
        tokio::task::spawn_blocking(move || (language.build)(&project)).await.unwrap()
    };
    let wasm = build(project.clone()).await;
    let cases = project.join("cases.jsonl").display().to_string();
    let (code, stdout, stderr) = run(args(&["test", wasm.to_str().unwrap(), &cases, "--laws"]), vec![]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.starts_with("tally 0.1.0 on ") && stdout.contains("6 lines, 4 diffs applied, 2 refused as expected"),
        "{stdout}"
    );
    assert!(stdout.contains("deltas checked"), "{stdout}");

    // A server with the kind `basket` folded by it.
    let reducers = work.path().join("reducers");
    std::fs::create_dir_all(&reducers).unwrap();
    std::fs::copy(&wasm, reducers.join("tally.wasm")).unwrap();
    let (data, port) = (work.path().join("data"), statefold_tests::process::free_port());
    let listen = format!("127.0.0.1:{port}");
    let mut serve_args = args(&[
        "--listen",
        &listen,
        "--data-dir",
        data.to_str().unwrap(),
        "--reducers-dir",
        reducers.to_str().unwrap(),
    ]);
    serve_args.extend(args(&["--kind", "basket=tally.wasm"]));
    let mut serve = Serve::spawn_args(work.path(), &serve_args);
    let http = reqwest::Client::new();
    serve.wait_ready_within(&http, std::time::Duration::from_secs(120)).await;

    // Version 0.2.0: rebuilt, deployed from the terminal.
    let manifest = project.join(language.manifest);
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains(language.version_0_1), "{text}");
    std::fs::write(&manifest, text.replacen(language.version_0_1, language.version_0_2, 1)).unwrap();
    let wasm = build(project.clone()).await;
    let url = serve.url.clone();
    let (code, stdout, stderr) = run(args(&["deploy", wasm.to_str().unwrap(), "--server", &url]), vec![]).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("tally: deployed: version ") && stdout.contains("(tally 0.2.0)"), "{stdout}");

    let created = http.post(format!("{url}/v1/models/basket")).body(r#"{"id":"b1"}"#).send().await.unwrap();
    assert_eq!(created.status(), 201);
    for diff in [r#"{"add": {"apples": 3}}"#, r#"{"add": {"apples": -1, "pears": 2}}"#] {
        let answer =
            http.post(format!("{url}/v1/models/basket/b1/diffs?wait=applied")).body(diff).send().await.unwrap();
        assert_eq!(answer.status(), 200);
    }
    let refused = http.post(format!("{url}/v1/models/basket/b1/diffs?wait=applied")).body(r#"{"add": 1}"#);
    let refused = refused.send().await.unwrap();
    assert_eq!(refused.status(), 409, "a diff the reducer refuses");
    let state: serde_json::Value =
        http.get(format!("{url}/v1/models/basket/b1")).send().await.unwrap().json().await.unwrap();
    assert_eq!(state["state"], serde_json::json!({"apples": 2, "pears": 2}), "{state}");
    let (_, versions, _) = run(args(&["versions", "tally", "--server", &url]), vec![]).await;
    assert!(versions.lines().nth(2).is_some_and(|l| l.contains("active") && l.contains("tally 0.2.0")), "{versions}");
    serve.signal("TERM");
    assert!(serve.wait().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_new_builds_tests_and_deploys_a_rust_reducer() {
    new_build_test_deploy(Language {
        lang: "rust",
        created: "Rust, SDK ",
        build: build_rust,
        manifest: "Cargo.toml",
        version_0_1: "version = \"0.1.0\"",
        version_0_2: "version = \"0.2.0\"",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_new_builds_tests_and_deploys_a_javascript_reducer() {
    new_build_test_deploy(Language {
        lang: "js",
        created: "JavaScript)",
        build: build_js,
        manifest: "src/reducer.js",
        version_0_1: "version: '0.1.0'",
        version_0_2: "version: '0.2.0'",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_new_builds_tests_and_deploys_a_python_reducer() {
    new_build_test_deploy(Language {
        lang: "python",
        created: "Python)",
        build: build_python,
        manifest: "reducer.py",
        version_0_1: "version = \"0.1.0\"",
        version_0_2: "version = \"0.2.0\"",
    })
    .await;
}
