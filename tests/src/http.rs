//! A real Statefold server (in-process, port 0, its own data dir) and a small HTTP/SSE
//! client for it.

use std::time::Duration;

use futures_util::StreamExt;
use statefold::config::{Config, KindConfig, Limits};
use statefold::server::Running;

/// The example kinds (counter, document, workflow) plus `trap`, a faulty reducer.
pub fn example_config(data_dir: &std::path::Path, limits: Limits) -> Config {
    let kind =
        |name: &str, wasm_name: &str| KindConfig { name: name.into(), reducer: crate::wasm(wasm_name), topic: None };
    Config {
        listen: "127.0.0.1:0".parse().expect("an address"),
        data_dir: data_dir.to_owned(),
        reducers_dir: "/".into(),
        kinds: vec![
            kind("counter", "counter"),
            kind("document", "document"),
            kind("workflow", "workflow"),
            kind("trap", "trap"),
        ],
        kafka: None,
        read_only: false,
        auth: None,
        cors: None,
        tls: None,
        cluster: None,
        reactions: Default::default(),
        requests: None,
        limits,
    }
}

/// A server on a fresh data dir (kept until the server is dropped).
pub struct TestServer {
    pub running: Option<Running>,
    pub url: String,
    pub dir: Option<tempfile::TempDir>,
    pub client: reqwest::Client,
}

impl TestServer {
    pub async fn start(limits: Limits) -> TestServer {
        let dir = tempfile::tempdir().expect("a temp dir");
        Self::start_in(dir, limits).await
    }

    pub async fn start_in(dir: tempfile::TempDir, limits: Limits) -> TestServer {
        let config = example_config(dir.path(), limits);
        Self::start_config(dir, config).await
    }

    /// A server with this config (its data dir in `dir`), once ready.
    pub async fn start_config(dir: tempfile::TempDir, config: Config) -> TestServer {
        let mut client = reqwest::Client::builder().pool_max_idle_per_host(64);
        if let Some(tls) = &config.tls {
            client = client.add_root_certificate(certificate(&tls.cert_file));
        }
        let client = client.build().expect("a client");
        let running = statefold::server::start(config).await.expect("server starts");
        let url = running.url.clone();
        let server = TestServer { running: Some(running), url, dir: Some(dir), client };
        server.wait_ready().await;
        server
    }

    pub async fn wait_ready(&self) {
        for _ in 0..500 {
            if let Ok(r) = self.client.get(format!("{}/readyz", self.url)).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("server not ready after 10 s");
    }

    /// Stops the server and returns its data dir.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.running.take().expect("running").stop().await.expect("clean stop");
        self.dir.take().expect("a data dir")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// POST JSON text, returns (status, JSON body).
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, serde_json::Value) {
        let response = self.client.post(self.url(path)).body(body).send().await.expect("request");
        json_of(response).await
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.client.get(self.url(path)).send().await.expect("request");
        json_of(response).await
    }

    pub async fn create(&self, kind: &str, id: &str) -> serde_json::Value {
        let (status, body) = self.post(&format!("/v1/models/{kind}"), format!(r#"{{"id":"{id}"}}"#)).await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// Appends a diff and waits for it to be applied; returns the version.
    pub async fn apply(&self, kind: &str, id: &str, diff: &str) -> serde_json::Value {
        let (status, body) = self.post(&format!("/v1/models/{kind}/{id}/diffs?wait=applied"), diff.to_owned()).await;
        assert_eq!(status, 200, "{diff}: {body}");
        body
    }

    pub async fn events(&self, kind: &str, id: &str, since: Option<&str>) -> SseStream {
        let mut request = self.client.get(self.url(&format!("/v1/models/{kind}/{id}/events")));
        if let Some(since) = since {
            request = request.header("Last-Event-ID", since);
        }
        let response = request.send().await.expect("events request");
        assert_eq!(response.status(), 200);
        SseStream::new(response)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Its threads are done before the test goes on: a test binary that exits while
        // a fold thread still holds a RocksDB handle aborts ("pthread lock: Invalid
        // argument"). A watcher blocked on this runtime is waited for 10 s at most.
        if let Some(running) = self.running.take()
            && !running.stop_threads(Duration::from_secs(10))
        {
            eprintln!("a test server's threads did not stop within 10 s");
        }
    }
}

/// A fresh self-signed certificate for `localhost` and 127.0.0.1 (rcgen, as a CA would make
/// one) written to `cert.pem` and `key.pem` in `dir`, and the `[tls]` that names them
/// (reloaded every 100 ms).
pub fn tls_in(dir: &std::path::Path) -> statefold::config::TlsConfig {
    let (cert, key) = self_signed();
    std::fs::write(dir.join("cert.pem"), cert).expect("cert.pem");
    std::fs::write(dir.join("key.pem"), key).expect("key.pem");
    statefold::config::TlsConfig {
        cert_file: dir.join("cert.pem"),
        key_file: dir.join("key.pem"),
        reload_interval_ms: 100,
        handshake_timeout_ms: 10_000,
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1: (certificate PEM, key PEM).
pub fn self_signed() -> (String, String) {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(names).expect("a certificate");
    (cert.pem(), signing_key.serialize_pem())
}

/// An HS256 JWT over `claims`, signed with `secret`, as an issuer would mint it for a
/// server whose `[auth]` has that `hs256_secret`.
pub fn hs256_token(secret: &str, claims: &serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).expect("an HS256 key");
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), claims, &key).expect("a token")
}

/// The certificate in a PEM file, for a client to trust.
pub fn certificate(pem: &std::path::Path) -> reqwest::Certificate {
    let pem = std::fs::read(pem).expect("the certificate file");
    reqwest::Certificate::from_pem(&pem).expect("a PEM certificate")
}

pub async fn json_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, body)
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

/// What an SSE client holds of one model, checked event by event: it panics on a gap, a
/// repeat, a patch or diff that does not start at its hash, or a snapshot that replaces a
/// hash without a `reset` first.
#[derive(Debug, Default, Clone)]
pub struct Follower {
    pub hash: Option<String>,
    pub seq: u64,
    /// The reasons of the `reset`s seen.
    pub resets: Vec<String>,
    pub events: usize,
}

impl Follower {
    /// Takes one event (`who` names the client in failures).
    pub fn see(&mut self, who: &str, event: &SseEvent) {
        if event.event == "message" {
            return; // `retry:`
        }
        let data = event.json();
        self.events += 1;
        match event.event.as_str() {
            "reset" => {
                self.resets.push(data["reason"].as_str().expect("a reason").to_owned());
                self.hash = None;
            }
            "snapshot" => {
                assert!(self.hash.is_none(), "{who}: a snapshot replaced a hash without a reset");
                self.hash = Some(data["hash"].as_str().expect("a hash").to_owned());
                self.seq = data["seq"].as_u64().expect("a seq");
            }
            "patch" => {
                assert_eq!(data["from"].as_str(), self.hash.as_deref(), "{who}: a patch from a hash it does not hold");
                assert!(data["seq"].as_u64().expect("a seq") > self.seq, "{who}: a patch that does not move forward");
                self.hash = Some(data["to"].as_str().expect("a hash").to_owned());
                self.seq = data["seq"].as_u64().expect("a seq");
            }
            "diff" => {
                assert_eq!(data["prev"].as_str(), self.hash.as_deref(), "{who}: gap before seq {}", data["seq"]);
                assert_eq!(data["seq"].as_u64().expect("a seq"), self.seq + 1, "{who}: seq repeated or skipped");
                self.hash = Some(data["hash"].as_str().expect("a hash").to_owned());
                self.seq += 1;
            }
            "synced" => assert_eq!(data["hash"].as_str(), self.hash.as_deref(), "{who}: synced at another hash"),
            // Sharded mode: the model is served elsewhere now; the stream ends here.
            "moved" => {}
            other => panic!("{who}: unexpected event {other}: {}", event.data),
        }
    }
}

/// A text/event-stream parser over a response body (comments, i.e. heartbeats, counted).
pub struct SseStream {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
    pub comments: usize,
}

impl SseStream {
    pub fn new(response: reqwest::Response) -> SseStream {
        SseStream { body: response.bytes_stream().boxed(), buf: Vec::new(), comments: 0 }
    }

    /// The next event; `None` when the stream ends (or breaks).
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = find_blank_line(&self.buf) {
                let block: Vec<u8> = self.buf.drain(..end).collect();
                let text = String::from_utf8(block).expect("SSE is UTF-8");
                let mut event = SseEvent { event: "message".into(), ..SseEvent::default() };
                let mut data = Vec::new();
                let mut any = false;
                for line in text.lines() {
                    if line.is_empty() {
                        continue;
                    }
                    if line.starts_with(':') {
                        self.comments += 1;
                        continue;
                    }
                    any = true;
                    let (field, value) =
                        line.split_once(':').map_or((line, ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
                    match field {
                        "event" => event.event = value.to_owned(),
                        "id" => event.id = Some(value.to_owned()),
                        "data" => data.push(value.to_owned()),
                        "retry" => event.retry = value.parse().ok(),
                        _ => {}
                    }
                }
                if !any {
                    continue;
                }
                event.data = data.join("\n");
                return Some(event);
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }

    /// The next event within `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<SseEvent> {
        tokio::time::timeout(timeout, self.next()).await.unwrap_or_else(|_| panic!("no SSE event within {timeout:?}"))
    }
}

/// Index just past the first blank line ("\n\n"), if any.
fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

/// An HTTP client that follows redirects and counts its hops, as an outside client of a
/// sharded cluster would: `max` is the most redirects any one request took, `redirected`
/// how many requests were redirected at all. A request is not followed past `limit`
/// redirects (it then fails with reqwest's redirect error).
#[derive(Clone, Default)]
pub struct HopCounter {
    max: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    redirected: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HopCounter {
    pub fn client(&self, limit: usize) -> reqwest::Client {
        use std::sync::atomic::Ordering;
        let (max, redirected) = (self.max.clone(), self.redirected.clone());
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            // `previous` holds the URLs requested so far: the original request, then each
            // redirect's target; this attempt is hop number `previous().len()`.
            let hops = attempt.previous().len();
            max.fetch_max(hops, Ordering::Relaxed);
            if hops == 1 {
                redirected.fetch_add(1, Ordering::Relaxed);
            }
            if hops > limit { attempt.error(format!("{hops} redirects")) } else { attempt.follow() }
        });
        reqwest::Client::builder().redirect(policy).build().expect("a client")
    }

    /// The most redirects one request took.
    pub fn max(&self) -> usize {
        self.max.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests redirected at least once.
    pub fn redirected(&self) -> usize {
        self.redirected.load(std::sync::atomic::Ordering::Relaxed)
    }
}
