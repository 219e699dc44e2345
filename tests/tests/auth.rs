//! Access control (issue 18): every route × {no token, expired, wrong audience, wrong kind,
//! wrong model pattern, enough}, with the status and code each gets and nothing written by
//! a refusal; the cookie a browser's `EventSource` sends; a stream whose token expires;
//! CORS for a page of another origin; CSRF: a cookie-authenticated write only from an
//! allowed or the server's own origin.
//! Tokens are HS256 JWTs minted here with `jsonwebtoken`, as an issuer would.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use statefold::config::{AuthConfig, CorsConfig, Limits};
use statefold_tests::http::{SseStream, TestServer, example_config, hs256_token, json_of};

const SECRET: &str = "a development secret of 32+ bytes!";

fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn token(audience: &str, expires_in_s: i64, grants: Value) -> String {
    hs256_token(SECRET, &json!({"sub": "tester", "aud": audience, "exp": now_s() + expires_in_s, "grants": grants}))
}

const ALL: [&str; 6] = ["read", "subscribe", "create", "append", "deploy", "replay"];

/// `[auth]` for the audience `statefold`, no clock skew allowed, keys from `key_file`.
fn auth_config(key_file: Option<std::path::PathBuf>) -> AuthConfig {
    AuthConfig {
        public_key_file: key_file,
        hs256_secret: None,
        audience: "statefold".into(),
        issuer: None,
        cookie: "statefold_token".into(),
        leeway_s: 0,
    }
}

async fn server() -> TestServer {
    server_with(None).await
}

async fn server_with(cors: Option<CorsConfig>) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = example_config(dir.path(), Limits::default());
    config.cors = cors;
    config.auth = Some(AuthConfig { hs256_secret: Some(SECRET.into()), ..auth_config(None) });
    TestServer::start_config(dir, config).await
}

/// The embedded log's end, summed over its topics (what a write would move).
async fn log_end(server: &TestServer) -> u64 {
    let (_, ready) = server.get("/readyz").await;
    ready["partitions"].as_array().unwrap().iter().filter_map(|p| p["end"].as_u64()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_checks_the_token_and_a_refusal_writes_nothing() {
    let server = server().await;
    let admin = token("statefold", 3600, json!([{"actions": ["admin"], "models": "*"}]));
    let bearer = |t: &str| format!("Bearer {t}");
    // A model and a version to ask about.
    let post = |path: &str, body: &str, t: &str| {
        server.client.post(server.url(path)).header("authorization", bearer(t)).body(body.to_owned()).send()
    };
    let (status, m1) = json_of(post("/v1/models/counter", r#"{"id":"m1"}"#, &admin).await.unwrap()).await;
    assert_eq!(status, 201, "{m1}");
    let hash = m1["hash"].as_str().unwrap().to_owned();
    let counter = std::fs::read(statefold_tests::wasm("counter")).unwrap();
    let counter_version = blake3::hash(&counter).to_hex();

    let cases: [(&str, Option<String>); 6] = [
        ("no token", None),
        ("expired", Some(token("statefold", -3600, json!([{"actions": ["admin"], "models": "*"}])))),
        ("wrong audience", Some(token("someone-else", 3600, json!([{"actions": ["admin"], "models": "*"}])))),
        ("wrong kind", Some(token("statefold", 3600, json!([{"actions": ALL, "models": "document/*"}])))),
        ("wrong model", Some(token("statefold", 3600, json!([{"actions": ALL, "models": "counter/other-*"}])))),
        ("enough", Some(admin.clone())),
    ];
    // (method, path, body, status for: wrong kind, wrong model, enough)
    let routes: Vec<(&str, String, Vec<u8>, [u16; 3])> = vec![
        ("POST", "/v1/models/counter".into(), br#"{"id":"m2"}"#.to_vec(), [403, 403, 201]),
        ("POST", "/v1/models/counter/m1/diffs".into(), br#"{"add":1}"#.to_vec(), [403, 403, 202]),
        ("GET", "/v1/models/counter/m1".into(), vec![], [403, 403, 200]),
        ("GET", format!("/v1/models/counter/m1/diffs?since={hash}"), vec![], [403, 403, 200]),
        ("GET", "/v1/models/counter/m1/events".into(), vec![], [403, 403, 200]),
        ("GET", "/v1/models/counter".into(), vec![], [403, 200, 200]),
        ("GET", "/v1/kinds/counter/rejections".into(), vec![], [403, 200, 200]),
        ("POST", "/v1/kinds/counter/replay".into(), vec![], [403, 403, 202]),
        ("GET", "/v1/kinds/counter/replay".into(), vec![], [403, 200, 200]),
        ("GET", "/v1/reducers".into(), vec![], [200, 200, 200]),
        ("GET", "/v1/reducers/counter".into(), vec![], [403, 200, 200]),
        ("GET", format!("/v1/reducers/counter/versions/{counter_version}/module"), vec![], [403, 200, 200]),
        ("PUT", "/v1/reducers/counter".into(), counter, [403, 403, 200]),
        ("GET", "/metrics".into(), vec![], [403, 403, 200]),
    ];
    for (method, path, body, expected) in &routes {
        for (i, (case, token)) in cases.iter().enumerate() {
            let before = log_end(&server).await;
            let mut request = server
                .client
                .request(method.parse().unwrap(), server.url(path))
                .body(body.clone())
                .timeout(Duration::from_secs(30));
            if let Some(token) = token {
                request = request.header("authorization", bearer(token));
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
            let want = if i < 3 { 401 } else { expected[i - 3] };
            if path.ends_with("/events") && status == 200 {
                drop(response); // a stream: its first bytes are enough
            } else {
                let text = response.text().await.unwrap();
                assert_eq!(status, want, "{method} {path} with {case}: {text}");
                let code = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|b| b["error"]["code"].as_str().map(String::from));
                match want {
                    401 => {
                        assert_eq!(code.as_deref(), Some("unauthenticated"), "{method} {path} with {case}");
                        let challenge = challenge.expect("a 401 says how to authenticate");
                        assert!(challenge.starts_with("Bearer"), "{challenge}");
                    }
                    403 => {
                        assert_eq!(code.as_deref(), Some("forbidden"), "{method} {path} with {case}: {text}");
                        assert!(text.contains('`'), "it names the missing grant: {text}");
                    }
                    _ => {}
                }
                if status >= 400 {
                    assert_eq!(log_end(&server).await, before, "{method} {path} with {case}: a refusal writes nothing");
                }
                // A token that may read other models only sees none of these.
                if *case == "wrong model" && *method == "GET" && path == "/v1/models/counter" {
                    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["models"], json!([]), "{text}");
                }
                if *case == "wrong kind" && path == "/v1/reducers" {
                    let listed: Value = serde_json::from_str(&text).unwrap();
                    let names: Vec<&str> =
                        listed["reducers"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
                    assert_eq!(names, ["document"], "only the kinds it may read: {text}");
                }
            }
            assert_eq!(status, want, "{method} {path} with {case}");
        }
    }
    // Deploys and replays record who asked for them.
    let get = |path: &str| server.client.get(server.url(path)).header("authorization", bearer(&admin)).send();
    let (_, replay) = json_of(get("/v1/kinds/counter/replay").await.unwrap()).await;
    assert_eq!(replay["subject"], "tester", "{replay}");
    let v2 = std::fs::read(statefold_tests::wasm("counter_v2")).unwrap();
    let put = server.client.put(server.url("/v1/reducers/counter")).header("authorization", bearer(&admin)).body(v2);
    let (status, deployed) = json_of(put.send().await.unwrap()).await;
    assert_eq!(status, 200, "{deployed}");
    let (_, versions) = json_of(get("/v1/reducers/counter").await.unwrap()).await;
    assert_eq!(versions["versions"][0]["subject"], "tester", "{versions}");
    // The routes a load balancer and a client generator need stay open.
    for path in ["/healthz", "/readyz", "/v1/openapi.json"] {
        let response = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_authenticates_and_a_stream_ends_when_its_token_expires() {
    let server = server().await;
    let admin = token("statefold", 3600, json!([{"actions": ["admin"], "models": "*"}]));
    let response = server
        .client
        .post(server.url("/v1/models/workflow"))
        .header("cookie", format!("theme=dark; statefold_token={admin}"))
        .header("origin", server.url("").trim_end_matches('/'))
        .body(r#"{"id":"run-1"}"#)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 201, "{body}");
    // A reader of run-* models, whose token runs out in two seconds.
    let short = token("statefold", 2, json!([{"actions": ["subscribe"], "models": "workflow/run-*"}]));
    let response = server
        .client
        .get(server.url("/v1/models/workflow/run-1/events"))
        .header("cookie", format!("statefold_token={short}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = SseStream::new(response);
    let mut names = Vec::new();
    while let Some(event) = events.next_within(Duration::from_secs(10)).await {
        names.push(event.event.clone());
        if event.event == "expired" {
            assert!(event.data.contains("expired"), "{}", event.data);
        }
    }
    assert_eq!(names.last().map(String::as_str), Some("expired"), "the stream ends with `expired`: {names:?}");
    assert!(names.contains(&"snapshot".to_owned()), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_an_allowed_origin_may_call_the_api_and_read_etag_others_may_not() {
    let page = "https://app.example.com";
    let cors = CorsConfig { allowed_origins: vec![page.into()], allow_credentials: true, max_age_s: 600 };
    let server = server_with(Some(cors)).await;
    let admin = token("statefold", 3600, json!([{"actions": ["admin"], "models": "*"}]));
    let preflight = |origin: &str| {
        server
            .client
            .request(reqwest::Method::OPTIONS, server.url("/v1/models/counter/m/diffs"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type")
            .send()
    };
    // A preflight carries no token: it is answered before access control.
    let answer = preflight(page).await.unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    let header = |name: &str| answer.headers().get(name).map(|v| v.to_str().unwrap().to_ascii_lowercase());
    assert_eq!(header("access-control-allow-origin").as_deref(), Some(page));
    assert_eq!(header("access-control-allow-credentials").as_deref(), Some("true"));
    assert_eq!(header("access-control-max-age").as_deref(), Some("600"));
    assert!(header("access-control-allow-headers").unwrap().contains("authorization"));
    assert!(header("access-control-allow-methods").unwrap().contains("post"));
    let other = preflight("https://evil.example.com").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none(), "another origin is not allowed");

    // The actual request: the page may read the ETag (the hash) of what it gets.
    let created = server
        .client
        .post(server.url("/v1/models/counter"))
        .header("origin", page)
        .header("authorization", format!("Bearer {admin}"))
        .body(r#"{"id":"m"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let read = server
        .client
        .get(server.url("/v1/models/counter/m"))
        .header("origin", page)
        .header("authorization", format!("Bearer {admin}"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    let header = |name: &str| read.headers().get(name).map(|v| v.to_str().unwrap().to_ascii_lowercase());
    assert_eq!(header("access-control-allow-origin").as_deref(), Some(page));
    assert!(header("access-control-expose-headers").unwrap().contains("etag"));
    assert!(read.headers().get("etag").is_some());
}

/// CSRF: a POST authenticated by the cookie alone is taken from the server's own origin
/// and from an allowed one; from another origin, an opaque (`null`) one, or naming none (a
/// cross-site form post names its origin; a page can set neither header), it is refused
/// with 403 `cross_site` and stores nothing. A token in the `Authorization` header (never
/// attached by a browser on its own) and a GET are not checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_authenticated_post_from_another_origin_is_refused_and_stores_nothing() {
    let page = "https://app.example.com";
    let cors = CorsConfig { allowed_origins: vec![page.into()], allow_credentials: true, max_age_s: 600 };
    let server = server_with(Some(cors)).await;
    let admin = token("statefold", 3600, json!([{"actions": ["admin"], "models": "*"}]));
    let cookie = format!("statefold_token={admin}");
    let own = server.url("").trim_end_matches('/').to_owned();
    let evil = "https://evil.example.com";
    // (Origin, Referer, Authorization instead of the cookie, expected status)
    let cases: Vec<(Option<&str>, Option<String>, bool, u16)> = vec![
        (Some(evil), None, false, 403),
        (Some("null"), None, false, 403),
        (None, None, false, 403),
        (None, Some(format!("{evil}/form.html")), false, 403),
        (Some(&own), None, false, 201),
        (Some(page), None, false, 201),
        (None, Some(format!("{own}/inspector")), false, 201),
        (Some(evil), None, true, 201),
    ];
    for (i, (origin, referer, header, expected)) in cases.iter().enumerate() {
        let before = log_end(&server).await;
        let mut request = server.client.post(server.url("/v1/models/workflow")).body(format!(r#"{{"id":"c{i}"}}"#));
        request = match header {
            true => request.header("authorization", format!("Bearer {admin}")),
            false => request.header("cookie", &cookie),
        };
        if let Some(origin) = origin {
            request = request.header("origin", *origin);
        }
        if let Some(referer) = referer {
            request = request.header("referer", referer);
        }
        let (status, body) = json_of(request.send().await.unwrap()).await;
        assert_eq!(status, *expected, "case {i} ({origin:?}, {referer:?}): {body}");
        let read = server.client.get(server.url(&format!("/v1/models/workflow/c{i}"))).header("cookie", &cookie);
        let (read_status, _) = json_of(read.header("origin", evil).send().await.unwrap()).await;
        if *expected == 403 {
            assert_eq!(body["error"]["code"], "cross_site", "case {i}: {body}");
            assert_eq!(log_end(&server).await, before, "case {i}: a refused request appends nothing");
            assert_eq!(read_status, 404, "case {i}: the model was not created");
        } else {
            // A GET with the cookie from any origin is read (CORS, not CSRF, keeps a page
            // of another origin from seeing the answer).
            assert_eq!(read_status, 200, "case {i}");
        }
    }
    // An append too.
    let before = log_end(&server).await;
    let append = server.client.post(server.url("/v1/models/workflow/c4/diffs")).header("cookie", &cookie);
    let (status, body) = json_of(append.header("origin", evil).body("{}").send().await.unwrap()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("cross_site")), "{body}");
    assert_eq!(log_end(&server).await, before);
}

/// Test-only key pairs (generated with openssl for this test; they sign nothing else).
const ED25519_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIGpWAUHfAJ9l//4mvHc/oa+9ud2JqIgx5IvaWO61y/fk
-----END PRIVATE KEY-----
";
const ED25519_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA5Ay9SQp95uT4X5Z0Xv+V9afIILnr5eUoqKaNcAWd5Nc=
-----END PUBLIC KEY-----
";
const P256_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgPXb3d2DsE9CqKtVO
UiD7Um5LutshC6Nbr6B+8z0DSOuhRANCAAS9goyr3izhQg3XBrRiMUrojXN7YaSf
aPEg8AdkbYLzTxM/fCUZzHlqgBncVg3ApJy7uk4M0FpKRfuJGiuALH1I
-----END PRIVATE KEY-----
";
const P256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEvYKMq94s4UIN1wa0YjFK6I1ze2Gk
n2jxIPAHZG2C808TP3wlGcx5aoAZ3FYNwKScu7pODNBaSkX7iRorgCx9SA==
-----END PUBLIC KEY-----
";

/// An issuer's public key from a PEM file (EdDSA, ES256): its tokens are taken, HS256
/// tokens and tokens of another key are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_signed_by_the_configured_public_key_are_taken() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let claims = json!({"sub": "svc", "aud": "statefold", "iss": "issuer", "exp": now_s() + 600,
        "grants": [{"actions": ["admin"], "models": "*"}]});
    for (public, private, algorithm) in
        [(ED25519_PUBLIC, ED25519_PRIVATE, Algorithm::EdDSA), (P256_PUBLIC, P256_PRIVATE, Algorithm::ES256)]
    {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("issuer.pem");
        std::fs::write(&key_file, public).unwrap();
        let mut config = example_config(dir.path(), Limits::default());
        config.auth = Some(AuthConfig { issuer: Some("issuer".into()), ..auth_config(Some(key_file)) });
        let server = TestServer::start_config(dir, config).await;
        let key = match algorithm {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(private.as_bytes()).unwrap(),
            _ => EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
        };
        let signed = jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).unwrap();
        let hs256 = token("statefold", 600, json!([{"actions": ["admin"], "models": "*"}]));
        let wrong_issuer = {
            let mut claims = claims.clone();
            claims["iss"] = json!("someone");
            jsonwebtoken::encode(&Header::new(algorithm), &claims, &key).unwrap()
        };
        for (what, token, status) in
            [("signed", &signed, 200), ("hs256", &hs256, 401), ("wrong issuer", &wrong_issuer, 401)]
        {
            let response = server
                .client
                .get(server.url("/v1/reducers"))
                .header("authorization", format!("Bearer {token}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), status, "{algorithm:?} {what}: {:?}", response.text().await);
        }
    }
}

const P256_JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"p256-test","alg":"ES256","use":"sig","x":"vYKMq94s4UIN1wa0YjFK6I1ze2Gkn2jxIPAHZG2C808","y":"Ez98JRnMeWqAGdxWDcCknLu6TgzQWkpF-4kaK4AsfUg"}]}"#;

/// The key file is read again when it changes: an issuer rotates from an Ed25519 PEM key to
/// a JWKS with a P-256 key, and the server follows without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_file_is_read_again() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("issuer-keys");
    std::fs::write(&key_file, ED25519_PUBLIC).unwrap();
    let mut config = example_config(dir.path(), Limits::default());
    config.auth = Some(auth_config(Some(key_file.clone())));
    let server = TestServer::start_config(dir, config).await;
    let claims = json!({"sub": "svc", "aud": "statefold", "exp": now_s() + 600, "grants": [{"actions": ["admin"], "models": "*"}]});
    let ed = jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &claims,
        &EncodingKey::from_ed_pem(ED25519_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    let mut es_header = Header::new(Algorithm::ES256);
    es_header.kid = Some("p256-test".into());
    let es =
        jsonwebtoken::encode(&es_header, &claims, &EncodingKey::from_ec_pem(P256_PRIVATE.as_bytes()).unwrap()).unwrap();
    let status = |token: String| {
        let request = server.client.get(server.url("/v1/reducers")).header("authorization", format!("Bearer {token}"));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!((status(ed.clone()).await, status(es.clone()).await), (200, 401));
    std::fs::write(&key_file, P256_JWKS).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status(es.clone()).await != 200 {
        assert!(std::time::Instant::now() < deadline, "the rotated key file was never read again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(ed).await, 401, "the old key is gone");
}
