//! A real browser (issue 18): Debian's headless Chromium, driven by `tests/browser/follow.mjs`
//! (playwright-core, no browser download), on a page of another origin, follows ten
//! `document` models of a server with `[auth]` and `[cors]` while their diffs arrive:
//! - over HTTPS and HTTP/2, half with `fetch` and the token in a header, half with a plain
//!   `EventSource` and the token in an HttpOnly cookie (five streams on each of two
//!   connections: Chromium keeps requests with cookies and without apart); each model's
//!   page state ends equal to the server's;
//! - over plain HTTP/1.1, the stall docs/web-apps.md explains: six streams, the browser's
//!   connections per origin, and the other four never reach the server.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use statefold::config::{AuthConfig, CorsConfig, Limits};
use statefold_tests::http::{TestServer, certificate, example_config, hs256_token, tls_in};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const SECRET: &str = "a development secret of 32+ bytes!";

fn token(grants: Value) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    hs256_token(SECRET, &json!({"sub": "browser-test", "aud": "statefold", "exp": now + 3600, "grants": grants}))
}

/// The system Chromium (`apt-get install chromium`, which `./dev.sh test` does).
fn chromium() -> PathBuf {
    let path = std::env::var_os("STATEFOLD_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(path.exists(), "no Chromium at {} (./dev.sh test installs Debian's chromium)", path.display());
    path
}

/// A script of `tests/browser` driving Chromium, by JSON lines on its stdin and stdout.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Driver {
    /// Starts `script` with `args` (and `--chromium PATH`); returns it and its first line.
    async fn start(script: &str, args: &[&std::ffi::OsStr]) -> (Driver, Value) {
        let dir = statefold_tests::workspace_root().join("tests/browser");
        assert!(
            dir.join("node_modules/playwright-core").exists(),
            "tests/browser has no node_modules: ./dev.sh test runs npm ci there"
        );
        let mut child = Command::new("node")
            .arg(dir.join(script))
            .arg("--chromium")
            .arg(chromium())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs the driver");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut driver = Driver { child, stdin, stdout };
        let first = driver.read().await;
        (driver, first)
    }

    /// `follow.mjs`, and the page origin it serves (HTTPS with `tls`'s pair, else HTTP).
    async fn follow(tls: Option<&statefold::config::TlsConfig>) -> (Driver, String) {
        let mut args: Vec<&std::ffi::OsStr> = Vec::new();
        if let Some(tls) = tls {
            args.extend(["--cert".as_ref(), tls.cert_file.as_os_str(), "--key".as_ref(), tls.key_file.as_os_str()]);
        }
        let (driver, first) = Driver::start("follow.mjs", &args).await;
        (driver, first["page"].as_str().expect("the page origin").to_owned())
    }

    /// The value of a JavaScript expression on the page (`page.mjs`).
    async fn eval(&mut self, expression: &str) -> Value {
        let answer = self.send(json!({"eval": expression})).await;
        assert!(answer.get("error").is_none(), "{expression}: {answer}");
        answer["value"].clone()
    }

    async fn read(&mut self) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(60), self.stdout.next_line())
            .await
            .expect("follow.mjs answers within 60 s")
            .unwrap()
            .unwrap_or_else(|| panic!("follow.mjs ended: {:?}", self.child.try_wait()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("follow.mjs printed {line:?}: {e}"))
    }

    async fn send(&mut self, value: Value) -> Value {
        self.stdin.write_all(format!("{value}\n").as_bytes()).await.unwrap();
        self.read().await
    }
}

/// A server with `[auth]`, `[cors]` for `page`, and `[tls]` if given; its client is an admin.
async fn server(page: &str, tls: Option<statefold::config::TlsConfig>, dir: tempfile::TempDir) -> TestServer {
    let mut config = example_config(dir.path(), Limits::default());
    config.auth = Some(AuthConfig {
        public_key_file: None,
        hs256_secret: Some(SECRET.into()),
        audience: "statefold".into(),
        issuer: None,
        cookie: "statefold_token".into(),
        leeway_s: 0,
    });
    config.cors = Some(CorsConfig { allowed_origins: vec![page.to_owned()], allow_credentials: true, max_age_s: 600 });
    config.tls = tls.clone();
    let mut server = TestServer::start_config(dir, config).await;
    let admin = format!("Bearer {}", token(json!([{"actions": ["admin"], "models": "*"}])));
    let headers = [(reqwest::header::AUTHORIZATION, admin.parse().unwrap())].into_iter().collect();
    let mut client = reqwest::Client::builder().default_headers(headers);
    if let Some(tls) = &tls {
        client = client.add_root_certificate(certificate(&tls.cert_file));
    }
    server.client = client.build().unwrap();
    server
}

fn ids() -> Vec<String> {
    (0..10).map(|i| format!("page-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_follows_ten_models_over_http2_from_another_origin() {
    let dir = tempfile::tempdir().unwrap();
    let tls = tls_in(dir.path());
    let (mut driver, page) = Driver::follow(Some(&tls)).await;
    let server = server(&page, Some(tls), dir).await;
    let ids = ids();
    for id in &ids {
        server.create("document", id).await;
        server.apply("document", id, &json!({"title": id}).to_string()).await;
    }
    let reader = token(json!([{"actions": ["read", "subscribe"], "models": "document/page-*"}]));
    let follow = json!({"api": server.url, "token": reader, "ids": ids, "cookieEvery": 2, "settleMs": 30_000});
    let opened = driver.send(follow).await;
    assert_eq!(opened["synced"].as_array().unwrap().len(), 10, "{opened:#}");
    for id in &ids {
        assert_eq!(opened["protocols"][id], "h2", "{id} did not come over HTTP/2: {opened:#}");
    }
    // Chromium keeps requests with cookies and without apart: one connection each, each
    // carrying its five streams.
    let mut connections = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        *connections.entry(opened["connections"][id].to_string()).or_default() += 1;
    }
    assert_eq!(connections.values().copied().collect::<Vec<_>>(), [5, 5], "{opened:#}");

    // Diffs arrive while the page follows: merge patches that add, change and remove keys.
    for round in 0..20 {
        for (i, id) in ids.iter().enumerate() {
            let diff = json!({"round": round, "items": {format!("k{}", (round + i) % 5): round, format!("k{}", (round + i + 2) % 5): null}});
            server.apply("document", id, &diff.to_string()).await;
        }
    }
    let mut expect = serde_json::Map::new();
    let mut states = serde_json::Map::new();
    for id in &ids {
        let (status, model) = server.get(&format!("/v1/models/document/{id}")).await;
        assert_eq!(status, 200, "{model}");
        expect.insert(id.clone(), model["hash"].clone());
        states.insert(id.clone(), model["state"].clone());
    }
    let ended = driver.send(json!({"expect": expect, "timeoutMs": 30_000})).await;
    for id in &ids {
        let page = &ended["models"][id];
        assert_eq!(page["hash"], expect[id], "{id}: the page's hash is not the server's: {page:#}");
        assert_eq!(page["state"], states[id], "{id}: the page's state is not the server's");
        assert_eq!(page["seq"], 21, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http11_a_browser_holds_six_streams_and_the_rest_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (mut driver, page) = Driver::follow(None).await;
    let server = server(&page, None, dir).await;
    let ids = ids();
    for id in &ids {
        server.create("document", id).await;
    }
    let reader = token(json!([{"actions": ["read", "subscribe"], "models": "document/*"}]));
    // Waits the whole settleMs for streams that do not come.
    let follow = json!({"api": server.url, "token": reader, "ids": ids, "cookieEvery": 0, "settleMs": 5_000});
    let opened = driver.send(follow).await;
    let synced = opened["synced"].as_array().unwrap();
    assert_eq!(synced.len(), 6, "Chromium opens six HTTP/1.1 connections per origin: {opened:#}");
    for id in synced {
        assert_eq!(opened["protocols"][id.as_str().unwrap()], "http/1.1");
    }
    // The other four never reached the server: it holds six streams.
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let subscribers = metrics.lines().find(|l| l.starts_with("statefold_sse_subscribers ")).expect("the gauge");
    assert_eq!(subscribers, "statefold_sse_subscribers 6", "{metrics}");
    drop(driver.send(json!({"expect": {}, "timeoutMs": 0})).await);
}

/// The inspector page the host serves, in Chromium: it follows a workflow run (through the
/// client library's EventSource transport) while diffs arrive and the server is SIGKILLed
/// and started again on the same port; the state it shows ends equal to the server's. Its screenshot is kept in the target directory
/// (`statefold-artifacts/inspector.png`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inspector_follows_a_model_across_a_server_restart() {
    use statefold_tests::process::Serve;

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let reducers = statefold_tests::wasm("workflow").parent().unwrap().display().to_string();
    let data = dir.path().join("data").display().to_string();
    let args: Vec<String> =
        ["--listen", &format!("127.0.0.1:{port}"), "--data-dir", &data, "--reducers-dir", &reducers]
            .into_iter()
            .chain(["--kind", "workflow=workflow.wasm", "--kind", "document=document.wasm"])
            .map(String::from)
            .collect();
    let mut serve = Serve::spawn_args(dir.path(), &args);
    let http = reqwest::Client::new();
    serve.wait_ready(&http).await;
    let url = serve.url.clone();
    let apply = |diff: Value| {
        let request = http.post(format!("{url}/v1/models/workflow/run-7/diffs?wait=applied")).body(diff.to_string());
        async move {
            let response = request.send().await.expect("appended");
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        }
    };
    let created = http.post(format!("{url}/v1/models/workflow")).body(r#"{"id":"run-7"}"#).send().await.unwrap();
    assert_eq!(created.status(), 201);
    apply(json!({"op": "plan", "steps": ["fetch", "build", "test"]})).await;

    let page_url = format!("{url}/inspector#kind=workflow&id=run-7");
    let (mut page, _) = Driver::start("page.mjs", &["--url".as_ref(), page_url.as_ref()]).await;
    /// Waits until the page holds the server's hash; the page's state and the server's model.
    async fn caught_up(page: &mut Driver, http: &reqwest::Client, url: &str) -> (Value, Value) {
        let server: Value =
            http.get(format!("{url}/v1/models/workflow/run-7")).send().await.unwrap().json().await.unwrap();
        for _ in 0..300 {
            if page.eval("window.inspected?.hash ?? null").await == server["hash"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (page.eval("window.inspected.state").await, server)
    }
    apply(json!({"op": "start", "step": "fetch", "at": 1000})).await;
    let (shown, server) = caught_up(&mut page, &http, &url).await;
    assert_eq!(shown, server["state"]);

    // A crash and a restart on the same port: the page's stream resumes from its hash.
    serve.signal("KILL");
    serve.wait();
    let mut serve = Serve::spawn_args(dir.path(), &args);
    serve.wait_ready(&http).await;
    apply(json!({"op": "output", "step": "fetch", "patch": {"progress": 0.5}})).await;
    apply(json!({"op": "complete", "step": "fetch", "at": 1500, "output": {"bytes": 42}})).await;
    apply(json!({"op": "start", "step": "build", "at": 1600})).await;
    let (shown, server) = caught_up(&mut page, &http, &url).await;
    assert_eq!(shown, server["state"], "the inspector's state is not the server's");
    assert_eq!(page.eval("document.getElementById('hash').textContent").await, server["hash"]);
    assert_eq!(page.eval("document.getElementById('seq').textContent").await, server["seq"].to_string());
    assert_eq!(page.eval("document.getElementById('status').textContent").await, "live");
    // Without a token the page follows through the browser's EventSource, and it
    // reconnected (from its hash) when the server came back.
    assert_eq!(page.eval("window.inspected.options.transport").await, "eventsource");
    assert!(page.eval("window.inspected.connections").await.as_u64().unwrap() >= 2);
    let shown_text = page.eval("document.getElementById('state').textContent").await;
    assert!(shown_text.as_str().unwrap().contains("\"succeeded\""), "the tree shows the state: {shown_text}");

    let artifacts = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| statefold_tests::workspace_root().join("target"), PathBuf::from)
        .join("statefold-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("inspector.png");
    page.send(json!({"screenshot": shot})).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "a screenshot of the inspector");
    eprintln!("the inspector's screenshot: {}", shot.display());
    page.stdin.write_all(b"{\"close\":true}\n").await.unwrap();
    serve.signal("TERM");
}
