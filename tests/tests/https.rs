//! HTTPS (issue 18): HTTP/2 and HTTP/1.1 on one TLS port as ALPN picks, many model streams
//! multiplexed on one HTTP/2 connection, the per-connection stream bound, a certificate
//! replaced on disk taken without a restart (and a broken one not taken), and a start that
//! names a bad `[tls]` file. Certificates are made here with rcgen, as a CA would.

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use statefold::config::Limits;
use statefold_tests::http::{Follower, SseStream, TestServer, certificate, example_config, self_signed, tls_in};

async fn https_server(limits: Limits) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let mut config = example_config(dir.path(), limits);
    config.tls = Some(tls_in(dir.path()));
    TestServer::start_config(dir, config).await
}

/// A client that trusts only the certificate now in `cert_file`, on a connection of its own.
fn client_trusting(cert_file: &Path, http1_only: bool) -> reqwest::Client {
    let mut client = reqwest::Client::builder().add_root_certificate(certificate(cert_file));
    if http1_only {
        client = client.http1_only();
    }
    client.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_multiplexes_many_model_streams_and_http11_is_still_served() {
    let server = https_server(Limits::default()).await;
    assert!(server.url.starts_with("https://"), "{}", server.url);

    // One HTTP/2 connection (reqwest keeps one per origin) carries ten streams at once.
    let ids: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let mut streams = Vec::new();
    for id in &ids {
        server.create("document", id).await;
        let response = server.client.get(server.url(&format!("/v1/models/document/{id}/events"))).send().await.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        streams.push(SseStream::new(response));
    }
    for round in 0..5 {
        for id in &ids {
            server.apply("document", id, &json!({"round": round, id: round}).to_string()).await;
        }
    }
    for (id, stream) in ids.iter().zip(&mut streams) {
        let (_, expected) = server.get(&format!("/v1/models/document/{id}")).await;
        let mut follower = Follower::default();
        while follower.hash.as_deref() != expected["hash"].as_str() {
            let event = stream.next_within(Duration::from_secs(10)).await.expect("the stream goes on");
            follower.see(id, &event);
        }
        assert_eq!(follower.seq, 5, "{id}");
    }

    // HTTP/1.1 over TLS, for clients that do not speak HTTP/2.
    let tls = server.running.as_ref().unwrap().url.clone();
    let cert = server.dir.as_ref().unwrap().path().join("cert.pem");
    let http1 = client_trusting(&cert, true).get(format!("{tls}/v1/models/document/m0")).send().await.unwrap();
    assert_eq!(http1.version(), reqwest::Version::HTTP_11);
    assert_eq!(http1.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_holds_at_most_http2_max_concurrent_streams() {
    let limits = Limits { http2_max_concurrent_streams: 3, ..Limits::default() };
    let server = https_server(limits).await;
    for i in 0..4 {
        server.create("counter", &format!("c{i}")).await;
    }
    let open = |i: usize| server.client.get(server.url(&format!("/v1/models/counter/c{i}/events"))).send();
    let mut held = Vec::new();
    for i in 0..3 {
        let response = open(i).await.unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        held.push(SseStream::new(response));
    }
    // The fourth waits for a free stream on the same connection (the server's SETTINGS)...
    let fourth = tokio::spawn(open(3));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!fourth.is_finished(), "a fourth stream was opened past http2_max_concurrent_streams = 3");
    // ... and gets one once a stream ends.
    drop(held.pop());
    let response = tokio::time::timeout(Duration::from_secs(10), fourth).await.expect("opened").unwrap().unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let server = https_server(Limits::default()).await;
    let dir = server.dir.as_ref().unwrap().path().to_owned();
    let url = server.url("/healthz");
    let first = dir.join("first.pem");
    std::fs::copy(dir.join("cert.pem"), &first).unwrap();
    let answers = |cert: &Path| {
        let client = client_trusting(cert, false);
        let url = url.clone();
        async move { client.get(url).send().await.is_ok_and(|r| r.status() == 200) }
    };
    assert!(answers(&first).await);

    // A new pair, written as a renewal would.
    let (cert, key) = self_signed();
    let second = dir.join("second.pem");
    std::fs::write(&second, &cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    let mut taken = false;
    for _ in 0..100 {
        if answers(&second).await {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(taken, "the new certificate was not served within 5 s");
    assert!(!answers(&first).await, "new connections still got the first certificate");

    // A key file that does not parse: the server goes on with the pair it has.
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(answers(&second).await, "a broken key file replaced the working pair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_with_a_bad_tls_file_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let mut tls = tls_in(dir.path());
    std::fs::write(&tls.key_file, "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n").unwrap();
    let mut config = example_config(dir.path(), Limits::default());
    config.tls = Some(tls.clone());
    let error = format!("{:#}", statefold::server::start(config.clone()).await.err().expect("refused"));
    assert!(error.contains("[tls] key_file"), "{error}");

    tls.cert_file = dir.path().join("missing.pem");
    config.tls = Some(tls);
    let error = format!("{:#}", statefold::server::start(config).await.err().expect("refused"));
    assert!(error.contains("[tls] cert_file") && error.contains("missing.pem"), "{error}");
}
