//! Sharded mode: three `statefold serve` processes in one consumer group on a real Tansu,
//! 12 partitions, 200 models, 100 SSE clients that follow redirects and hop to a random
//! server on every reconnect, in each route mode (proxy, redirect). Mid-run a new reducer
//! version is deployed, one server is SIGKILLed (its partitions move), and a fourth is
//! started (a rebalance). At the end every client holds its model's head, reached with no
//! gap or repeat; no two servers ever sent different hashes for one (model, seq); every
//! model is equal on its partition's owner and standbys (read from their stores) and to a
//! reference fold of the log; and no request took more than one hop (every client counts
//! the redirects of each request it makes).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::prelude::*;
use serde_json::{Value, json};
use statefold::model::{CREATE_HEADER, DEPLOY_HEADER, ModelKey, partition_of};
use statefold::store::{Store, StoreOptions};
use statefold_tests::broker::Broker;
use statefold_tests::http::{Follower, HopCounter, SseEvent, SseStream, json_of};
use statefold_tests::process::Serve;
use tokio::sync::RwLock;

const PARTITIONS: u32 = 12;
const MODELS: usize = 200;
const CLIENTS: usize = 100;
const DIFFS: usize = 3000;

/// `statefold serve` in sharded mode on `dir`, one standby per partition, routing by `route`.
fn start(dir: &Path, broker: &Broker, route: &str) -> Serve {
    Serve::sharded(dir, &broker.brokers(), 1, &["--checkpoint-interval-diffs", "50", "--cluster-route", route])
}

/// The base URL of each server, `None` while it is down.
type Urls = Arc<RwLock<Vec<Option<String>>>>;

async fn pick(urls: &Urls, rng: &mut StdRng) -> String {
    let urls = urls.read().await;
    let up: Vec<&String> = urls.iter().flatten().collect();
    up[rng.random_range(0..up.len())].clone()
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, Value) {
    json_of(client.get(url).send().await.expect("server answers")).await
}

/// Waits until `url`'s map has `members` live members; every partition an owner that
/// serves it and one standby that has caught up on it; and no server folding more (no
/// partition held for an owner still catching up): each folds its share only.
async fn settled(http: &reqwest::Client, url: &str, members: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, view) = get(http, &format!("{url}/v1/cluster")).await;
        let partitions = view["partitions"].as_array().cloned().unwrap_or_default();
        let warm = |p: &Value, member: &Value| {
            p["folders"].as_array().is_some_and(|f| f.iter().any(|f| f["member"] == *member && f["ready"] == true))
        };
        let served = partitions.len() == PARTITIONS as usize
            && partitions.iter().all(|p| {
                !p["owner"].is_null()
                    && p["serves"] == p["owner"]
                    && p["standbys"].as_array().is_some_and(|s| s.iter().all(|s| warm(p, s)))
            });
        let folding: u64 =
            view["members"].as_array().map_or(0, |m| m.iter().map(|m| m["folding"].as_u64().unwrap()).sum());
        let shared = folding == 2 * PARTITIONS as u64;
        if status == 200 && view["members"].as_array().map(Vec::len) == Some(members) && served && shared {
            return view;
        }
        assert!(Instant::now() < deadline, "{url}: the cluster never settled on {members} members: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (model, seq) → the hash some server sent for it: a second, different one fails the test.
type Published = Arc<Mutex<HashMap<(String, u64), String>>>;

fn publish(published: &Published, model: &str, event: &SseEvent) {
    let data = match event.event.as_str() {
        "snapshot" | "diff" | "synced" => event.json(),
        "patch" => {
            let data = event.json();
            json!({"hash": data["to"], "seq": data["seq"]})
        }
        _ => return,
    };
    let (Some(hash), Some(seq)) = (data["hash"].as_str(), data["seq"].as_u64()) else { return };
    let mut published = published.lock().unwrap();
    let known = published.entry((model.to_owned(), seq)).or_insert_with(|| hash.to_owned());
    assert_eq!(known, hash, "{model} seq {seq}: two hashes were published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sharded_servers_a_sigkill_a_fourth_and_a_deploy_keep_every_client_exact() {
    three_servers_a_sigkill_a_fourth_and_a_deploy("proxy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_by_redirects_and_no_request_takes_two_hops() {
    three_servers_a_sigkill_a_fourth_and_a_deploy("redirect").await;
}

/// A client's redirects, past which a request fails: far more than the one hop a request
/// may take, so that a loop is counted (and fails the test) rather than cut short.
const REDIRECTS_FOLLOWED: usize = 8;

async fn three_servers_a_sigkill_a_fourth_and_a_deploy(route: &str) {
    let broker = Broker::start();
    broker.create_topic("counter", PARTITIONS);
    broker.create_topic("statefold-cluster", 1);
    broker.create_topic("statefold-attestations", 1);
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut servers: Vec<Option<Serve>> = (0..3).map(|i| Some(start(dirs[i].path(), &broker, route))).collect();
    servers.push(None);
    let counter = HopCounter::default();
    let http = counter.client(REDIRECTS_FOLLOWED);
    for server in servers.iter().flatten() {
        server.wait_ready(&http).await;
    }
    let urls: Urls = Arc::new(RwLock::new(servers.iter().map(|s| s.as_ref().map(|s| s.url.clone())).collect()));
    let view = settled(&http, &urls.read().await[0].clone().unwrap(), 3).await;
    eprintln!("settled: {}", view["members"]);
    let mut rng = StdRng::seed_from_u64(19);

    // Creates through any server: forwarded (or redirected) to the model's owner, which
    // creates and waits.
    let mut elsewhere = 0;
    for i in 0..MODELS {
        let url = pick(&urls, &mut rng).await;
        let response = loop {
            let response = http.post(format!("{url}/v1/models/counter")).body(format!(r#"{{"id":"m{i}"}}"#));
            let response = response.send().await.unwrap();
            // A client honours 503's Retry-After (the servers' maps settling).
            if response.status() != 503 {
                break response;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let served_by = response.headers().get("statefold-served-by").map(|v| v.to_str().unwrap().to_owned());
        let landed = response.url().as_str().split('/').take(3).collect::<Vec<_>>().join("/");
        match route {
            "proxy" => assert_eq!(landed, url, "a proxying server answers itself"),
            _ => assert!(served_by.is_none(), "a redirecting server forwards nothing"),
        }
        if served_by.is_some_and(|s| s != url) || landed != url {
            elsewhere += 1;
        }
        let (status, body) = json_of(response).await;
        assert_eq!(status, 201, "m{i}: {body}");
    }
    assert!(elsewhere > MODELS / 3, "most creates land on another server's partition: {elsewhere}");

    // 100 clients, one per model of the first half, each hopping to a random server after
    // a few events (or when its stream ends: a `moved`, a killed server).
    let done = Arc::new(AtomicBool::new(false));
    let published: Published = Arc::new(Mutex::new(HashMap::new()));
    let final_heads: Arc<RwLock<BTreeMap<String, String>>> = Arc::new(RwLock::new(BTreeMap::new()));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (urls, done, final_heads, published) = (urls.clone(), done.clone(), final_heads.clone(), published.clone());
        let model = format!("m{c}");
        let mut rng = StdRng::seed_from_u64(c as u64);
        let http = counter.client(REDIRECTS_FOLLOWED);
        clients.push(tokio::spawn(async move {
            let who = format!("client {c} ({model})");
            let (mut chain, mut hops, mut moved) = (Follower::default(), 0, 0);
            loop {
                let url = pick(&urls, &mut rng).await;
                let mut request = http.get(format!("{url}/v1/models/counter/{model}/events"));
                if let Some(hash) = &chain.hash {
                    request = request.header("Last-Event-ID", hash);
                }
                let stream = match request.send().await {
                    Ok(response) if response.status() == 200 => SseStream::new(response),
                    _ => {
                        // Down, or no server has caught up on the partition yet (503).
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let mut stream = stream;
                hops += 1;
                let budget = rng.random_range(3..12);
                let mut seen = 0;
                while seen < budget {
                    let event = match tokio::time::timeout(Duration::from_millis(400), stream.next()).await {
                        Ok(Some(event)) => event,
                        Ok(None) | Err(_) => break,
                    };
                    chain.see(&who, &event);
                    publish(&published, &model, &event);
                    if event.event == "moved" {
                        moved += 1;
                        break;
                    }
                    seen += 1;
                }
                if done.load(Ordering::Relaxed) {
                    let head = final_heads.read().await.get(&model).cloned();
                    if head.is_some() && head == chain.hash {
                        return (chain, hops, moved);
                    }
                }
            }
        }));
    }

    // Diffs through random servers (any server writes). At 1/4 a new version is deployed;
    // at 1/2 server 2 is SIGKILLed; at 3/4 a fourth server starts.
    let mut v2 = String::new();
    let started = Instant::now();
    for n in 0..DIFFS {
        if n == DIFFS / 4 {
            let url = pick(&urls, &mut rng).await;
            let module = std::fs::read(statefold_tests::wasm("counter_v2")).unwrap();
            let response = http.put(format!("{url}/v1/reducers/counter")).body(module).send().await.unwrap();
            let (status, body) = json_of(response).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["partitions"], PARTITIONS, "a deploy record in every partition: {body}");
            v2 = body["version"]["version"].as_str().unwrap().to_owned();
        }
        if n == DIFFS / 2 {
            urls.write().await[2] = None;
            let mut killed = servers[2].take().unwrap();
            killed.signal("KILL");
            killed.wait();
        }
        if n == 3 * DIFFS / 4 {
            let fourth = start(dirs[3].path(), &broker, route);
            fourth.wait_ready(&http).await;
            urls.write().await[3] = Some(fourth.url.clone());
            servers[3] = Some(fourth);
        }
        let url = pick(&urls, &mut rng).await;
        let model = format!("m{}", rng.random_range(0..MODELS));
        let add = rng.random_range(1..10);
        let response =
            http.post(format!("{url}/v1/models/counter/{model}/diffs")).body(json!({"add": add}).to_string());
        let (status, body) = json_of(response.send().await.unwrap()).await;
        assert_eq!(status, 202, "{body}");
        if n % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("{DIFFS} diffs written in {:?}", started.elapsed());

    // The reference: the log folded by hand (a counter sums its diffs' `add`).
    let mut reference: BTreeMap<String, (i64, u64)> = BTreeMap::new();
    let records = broker.read_records("counter", PARTITIONS);
    let mut ends = vec![0u64; PARTITIONS as usize];
    for record in &records {
        ends[record.partition as usize] = ends[record.partition as usize].max(record.offset + 1);
        if record.header(DEPLOY_HEADER).is_some() || record.header(CREATE_HEADER).is_some() {
            continue;
        }
        let id = String::from_utf8(record.key.clone().unwrap()).unwrap();
        let diff: Value = serde_json::from_slice(&record.value).unwrap();
        let slot = reference.entry(id).or_default();
        slot.0 += diff["add"].as_i64().unwrap();
        slot.1 += 1;
    }

    // Every model, read through any server (redirects followed), reaches the reference.
    let mut heads = BTreeMap::new();
    for i in 0..MODELS {
        let model = format!("m{i}");
        let (value, seq) = reference.get(&model).copied().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        let body = loop {
            let url = pick(&urls, &mut rng).await;
            let (status, body) = get(&http, &format!("{url}/v1/models/counter/{model}")).await;
            if status == 200 && body["seq"] == seq {
                break body;
            }
            assert!(Instant::now() < deadline, "{model}: {status} {body}, expected seq {seq}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let state = &body["state"];
        assert_eq!(state["value"].as_i64().or(state.as_i64()), Some(value), "{model}: {body}");
        if seq > 0 && reference.contains_key(&model) {
            heads.insert(model, (body["hash"].as_str().unwrap().to_owned(), seq));
        }
    }
    // Models untouched since the deploy still show v1's integer state; the rest are v2's.
    assert!(heads.len() > MODELS / 2, "most models got diffs: {}", heads.len());
    *final_heads.write().await = heads.iter().map(|(m, (h, _))| (m.clone(), h.clone())).collect();
    for i in 0..CLIENTS {
        let model = format!("m{i}");
        if !heads.contains_key(&model) {
            // No diff: its head is its genesis; read it once more.
            let (_, body) = get(&http, &format!("{}/v1/models/counter/{model}", pick(&urls, &mut rng).await)).await;
            final_heads.write().await.insert(model, body["hash"].as_str().unwrap().to_owned());
        }
    }
    done.store(true, Ordering::Relaxed);

    let (mut hops, mut moved, mut resets) = (0, 0, 0);
    for (c, task) in clients.into_iter().enumerate() {
        let (chain, client_hops, client_moved) =
            tokio::time::timeout(Duration::from_secs(90), task).await.expect("client finished").unwrap();
        assert_eq!(chain.hash, final_heads.read().await.get(&format!("m{c}")).cloned(), "client {c}");
        hops += client_hops;
        moved += client_moved;
        resets += chain.resets.len();
    }
    eprintln!("{CLIENTS} clients: {hops} connections, {moved} ended by a rebalance, {resets} resets");
    assert!(hops >= 3 * CLIENTS, "clients hopped: {hops}");
    let (most, redirected) = (counter.max(), counter.redirected());
    eprintln!("route {route}: {redirected} requests redirected, at most {most} redirects for one request");
    match route {
        "proxy" => assert_eq!(most, 0, "a proxying cluster redirects nothing"),
        _ => {
            assert!(redirected > MODELS / 3, "requests were redirected: {redirected}");
            assert!(most <= 1, "a request took {most} hops");
        }
    }
    assert_eq!(resets, 0, "a hash from one server always resumes on another");

    // Each live server records v2 as active, whether or not it took the deploy.
    for url in urls.read().await.iter().flatten() {
        let (_, body) = get(&http, &format!("{url}/v1/reducers/counter")).await;
        assert_eq!(body["versions"][0]["version"].as_str(), Some(&*v2), "{url}: {body}");
    }

    // The stores: stop the servers, then read each one's partitions. Every partition's
    // owner and standbys folded it to the log's end, and hold the reference there.
    let view = settled(&http, &pick(&urls, &mut rng).await, 3).await;
    eprintln!("at the end: {}", view["members"]);
    // Listing through any server: every model of the kind once, in id order, pages of 37
    // (the servers merge each other's partitions under one cursor).
    let mut expected: Vec<String> = (0..MODELS).map(|i| format!("m{i}")).collect();
    expected.sort();
    for url in urls.read().await.iter().flatten() {
        let (mut listed, mut after) = (Vec::new(), None::<String>);
        loop {
            let mut page = format!("{url}/v1/models/counter?limit=37");
            if let Some(after) = &after {
                page.push_str(&format!("&after={after}"));
            }
            let (status, body) = get(&http, &page).await;
            assert_eq!(status, 200, "{page}: {body}");
            listed.extend(body["models"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()));
            match body["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(listed, expected, "{url}: the listing");
    }
    let live = urls.read().await.clone();
    let members: HashMap<String, usize> = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let url = m["url"].as_str().unwrap();
            let index =
                live.iter().position(|u| u.as_deref() == Some(url)).unwrap_or_else(|| panic!("{url} is not live"));
            (m["member"].as_str().unwrap().to_owned(), index)
        })
        .collect();
    let mut holders: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for partition in view["partitions"].as_array().unwrap() {
        let p = partition["partition"].as_u64().unwrap() as u32;
        let owner = partition["owner"].as_str().expect("every partition has an owner");
        let mut on = vec![members[owner]];
        for standby in partition["standbys"].as_array().unwrap() {
            on.push(members[standby.as_str().unwrap()]);
        }
        holders.insert(p, on);
    }
    for server in servers.iter_mut().flatten() {
        server.signal("TERM");
        assert!(server.wait().success());
    }
    let mut compared = 0;
    for (partition, on) in &holders {
        assert_eq!(on.len(), 2, "partition {partition}: an owner and one standby: {on:?}");
        for &i in on {
            let store =
                Store::open(&dirs[i].path().join("data/db"), &StoreOptions { fsync: true, ..StoreOptions::default() })
                    .unwrap();
            let position = store.progress("kafka", "counter", *partition).unwrap().map(|p| p.next_offset);
            assert_eq!(
                position,
                Some(ends[*partition as usize]),
                "server {i}, partition {partition}: folded to the end"
            );
            for (model, (hash, seq)) in &heads {
                if partition_of(model.as_bytes(), PARTITIONS) != *partition {
                    continue;
                }
                let head = store.read().head(&ModelKey::new("counter", model)).unwrap().expect("the model is there");
                assert_eq!((head.hash.to_string(), head.seq), (hash.clone(), *seq), "server {i}: {model}");
                compared += 1;
            }
        }
    }
    eprintln!("{compared} model heads compared in the owners' and standbys' stores");
    assert!(compared >= heads.len() * 2);
}

/// `route = "proxy"` and no standbys: a read, a waiting append, a create and a stream for a
/// model owned by the other server are forwarded there and answered as it answers. When
/// that owner is SIGKILLed, requests first fail to reach it (502 `forward_failed`), then,
/// once it is known gone, answer 503 `partition_unavailable` with `Retry-After` (no warm
/// copy), until the group gives its partitions to the survivor, which folds them from the
/// log and serves them, the stream resuming from the hash it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_requests_and_a_failover_without_standbys() {
    let broker = Broker::start();
    broker.create_topic("counter", 4);
    broker.create_topic("statefold-cluster", 1);
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let proxy = ["--cluster-route", "proxy"];
    let mut servers: Vec<Serve> = dirs.iter().map(|d| Serve::sharded(d.path(), &broker.brokers(), 0, &proxy)).collect();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for server in &servers {
        server.wait_ready(&http).await;
    }
    // Both servers own partitions, and fold only those.
    let view = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, view) = get(&http, &format!("{}/v1/cluster", servers[0].url)).await;
            let members = view["members"].as_array().cloned().unwrap_or_default();
            let split = members.len() == 2
                && members.iter().all(|m| m["owned"].as_u64() > Some(0) && m["folding"] == m["owned"]);
            let partitions = view["partitions"].as_array().cloned().unwrap_or_default();
            let served =
                partitions.len() == 4 && partitions.iter().all(|p| !p["owner"].is_null() && p["serves"] == p["owner"]);
            if split && served {
                break view;
            }
            assert!(Instant::now() < deadline, "the partitions were never split: {view}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // /metrics: the cluster's gauges, and lag only for the partitions this server folds.
    let metrics = http.get(format!("{}/metrics", servers[0].url)).send().await.unwrap().text().await.unwrap();
    let gauge =
        |line: &str| metrics.lines().find_map(|l| l.strip_prefix(line)).and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(gauge("statefold_cluster_members "), Some(2), "{metrics}");
    let owned = gauge("statefold_cluster_partitions{role=\"owned\"} ").expect("owned partitions");
    assert!(owned > 0 && owned < 4, "{metrics}");
    assert_eq!(gauge("statefold_cluster_partitions{role=\"folded\"} "), Some(owned), "{metrics}");
    assert_eq!(gauge("statefold_cluster_partitions{role=\"served\"} "), Some(owned), "{metrics}");
    let lags = metrics.lines().filter(|l| l.starts_with("statefold_source_lag{")).count();
    assert_eq!(lags as u64, owned, "lag of the folded partitions only: {metrics}");
    let url_of = |member: &Value| {
        view["members"].as_array().unwrap().iter().find(|m| m["member"] == *member).unwrap()["url"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // A model owned by server 1, asked of server 0.
    let owner_of = |id: &str| url_of(&view["partitions"][partition_of(id.as_bytes(), 4) as usize]["owner"]);
    let id = (0..).map(|i| format!("p{i}")).find(|id| owner_of(id) == servers[1].url).unwrap();
    let (front, back) = (servers[0].url.clone(), servers[1].url.clone());
    let created =
        http.post(format!("{front}/v1/models/counter")).body(format!(r#"{{"id":"{id}"}}"#)).send().await.unwrap();
    assert_eq!(created.headers()["statefold-served-by"], back.as_str(), "forwarded to the owner");
    let (status, body) = json_of(created).await;
    assert_eq!(status, 201, "{body}");
    let applied = http.post(format!("{front}/v1/models/counter/{id}/diffs?wait=applied")).body(r#"{"add":5}"#);
    let (status, body) = json_of(applied.send().await.unwrap()).await;
    assert_eq!((status, body["seq"].clone()), (200, json!(1)), "{body}");
    let (status, body) = get(&http, &format!("{front}/v1/models/counter/{id}")).await;
    assert_eq!((status, body["state"].clone()), (200, json!(5)), "{body}");
    let (status, body) =
        get(&http, &format!("{front}/v1/models/counter/{id}/diffs?since={}", body["hash"].as_str().unwrap())).await;
    assert_eq!((status, body["kind"].clone()), (200, json!("up_to_date")), "{body}");

    // A replay: a record in every partition; each server rebuilds the partitions it folds.
    let (status, body) = json_of(http.post(format!("{front}/v1/kinds/counter/replay")).send().await.unwrap()).await;
    assert_eq!(status, 202, "{body}");
    for url in [&front, &back] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = get(&http, &format!("{url}/v1/kinds/counter/replay")).await;
            if status == 200 && body["state"] == "finished" {
                assert_eq!(body["models_failed"], 0, "{url}: {body}");
                break;
            }
            assert!(Instant::now() < deadline, "{url}: the replay never finished: {status} {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (status, body) = get(&http, &format!("{front}/v1/models/counter/{id}")).await;
    assert_eq!((status, body["seq"].clone(), body["state"].clone()), (200, json!(1), json!(5)), "{body}");

    // A stream through server 0: live diffs come through the proxy.
    let response = http.get(format!("{front}/v1/models/counter/{id}/events")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = SseStream::new(response);
    let mut chain = Follower::default();
    loop {
        let event = stream.next_within(Duration::from_secs(10)).await.unwrap();
        chain.see("proxied", &event);
        if event.event == "synced" {
            break;
        }
    }
    for add in 1..=3 {
        let append = http.post(format!("{front}/v1/models/counter/{id}/diffs")).body(format!(r#"{{"add":{add}}}"#));
        assert_eq!(append.send().await.unwrap().status(), 202);
        let event = stream.next_within(Duration::from_secs(10)).await.unwrap();
        assert_eq!(event.event, "diff", "{event:?}");
        chain.see("proxied", &event);
    }
    assert_eq!(chain.seq, 4);

    // The owner dies. Its partitions have no warm copy.
    servers[1].signal("KILL");
    servers[1].wait();
    let (status, body) = get(&http, &format!("{front}/v1/models/counter/{id}")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (502, Some("forward_failed")), "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let unavailable = loop {
        let response = http.get(format!("{front}/v1/models/counter/{id}")).send().await.unwrap();
        let retry_after = response.headers().get("retry-after").cloned();
        let (status, body) = json_of(response).await;
        if status == 503 {
            assert_eq!(body["error"]["code"], "partition_unavailable", "{body}");
            break retry_after;
        }
        assert!(Instant::now() < deadline, "never known gone: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(unavailable.unwrap(), "1");
    // The group gives the partitions to server 0 after the session timeout; it folds them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (status, body) = get(&http, &format!("{front}/v1/models/counter/{id}")).await;
        if status == 200 {
            break body;
        }
        assert!(Instant::now() < deadline, "never taken over: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((body["seq"].clone(), body["state"].clone()), (json!(4), json!(11)), "{body}");
    // The stream resumes there from the hash it held.
    let response =
        http.get(format!("{front}/v1/models/counter/{id}/events")).header("Last-Event-ID", chain.hash.clone().unwrap());
    let mut stream = SseStream::new(response.send().await.unwrap());
    let event = stream.next_within(Duration::from_secs(10)).await.unwrap();
    let event =
        if event.event == "message" { stream.next_within(Duration::from_secs(10)).await.unwrap() } else { event };
    chain.see("resumed", &event);
    assert_eq!(event.event, "synced", "nothing was missed: {event:?}");
    assert_eq!(body["hash"].as_str(), chain.hash.as_deref());
}

const SECRET: &str = "a development secret of 32+ bytes!";

/// Sharded servers with `[auth]` (HS256), one per route mode in `routes`, no standbys, each
/// owning some of 4 partitions and folding only those, the owners unchanged for 3 s (a
/// cooperative rebalance may take a second round); the servers and the cluster's view.
async fn with_auth(broker: &Broker, dirs: &[tempfile::TempDir], routes: &[&str]) -> (Vec<Serve>, Value) {
    let mut servers = Vec::new();
    for (dir, route) in dirs.iter().zip(routes) {
        let config = dir.path().join("auth.toml");
        std::fs::write(&config, format!("[auth]\nhs256_secret = {SECRET:?}\naudience = \"statefold\"\n")).unwrap();
        let config = config.display().to_string();
        servers.push(Serve::sharded(
            dir.path(),
            &broker.brokers(),
            0,
            &["--cluster-route", route, "--config", &config],
        ));
    }
    let http = reqwest::Client::new();
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stable: Option<(Vec<Value>, Instant)> = None;
    loop {
        let admin = admin_token();
        let view = http.get(format!("{}/v1/cluster", servers[0].url)).bearer_auth(&admin);
        let (_, view) = json_of(view.send().await.unwrap()).await;
        let members = view["members"].as_array().cloned().unwrap_or_default();
        // Each folds its own partitions only (no warm copy held for an owner catching up).
        let split = members.len() == routes.len()
            && members.iter().all(|m| m["owned"].as_u64() > Some(0) && m["folding"] == m["owned"]);
        let partitions = view["partitions"].as_array().cloned().unwrap_or_default();
        let served =
            partitions.len() == 4 && partitions.iter().all(|p| !p["owner"].is_null() && p["serves"] == p["owner"]);
        let owners: Vec<Value> = partitions.iter().map(|p| p["owner"].clone()).collect();
        match &stable {
            Some((seen, since)) if split && served && *seen == owners => {
                if since.elapsed() >= Duration::from_secs(3) {
                    eprintln!("split after {:?}", started.elapsed());
                    return (servers, view);
                }
            }
            _ => stable = (split && served).then(|| (owners, Instant::now())),
        }
        assert!(Instant::now() < deadline, "the partitions were never split: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn admin_token() -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    statefold_tests::http::hs256_token(
        SECRET,
        &json!({"sub": "tester", "aud": "statefold", "exp": exp, "grants": [{"actions": ["admin"], "models": "*"}]}),
    )
}

/// `[auth]` with `[cluster]`: three servers, a model owned by the third (the back), asked
/// of a front in each route mode:
/// - redirect: a browser's cookie (sent to the owner too: one host) is answered there; a
///   header token is not, as docs/operators.md says: the client drops `Authorization` on a
///   redirect to another origin and the owner answers 401;
/// - proxy (the default): the token in the header and in the cookie both reach the owner
///   (a read, a stream, and a cookie-authenticated append from the front's own origin,
///   which the owner checks against the client's authority, `X-Forwarded-Host`);
/// - both: a request that comes by a hop (the header a proxy adds, or the parameter a
///   redirect adds) to a server that does not fold the model's partition is refused with
///   503 `partition_unavailable`, never sent on (the loop guard); the owner serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_routes_keep_the_callers_credentials_and_no_hop_is_sent_on() {
    let broker = Broker::start();
    broker.create_topic("counter", 4);
    broker.create_topic("statefold-cluster", 1);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (servers, view) = with_auth(&broker, &dirs, &["redirect", "proxy", "proxy"]).await;
    let url_of = |member: &Value| {
        view["members"].as_array().unwrap().iter().find(|m| m["member"] == *member).unwrap()["url"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let owner_of = |id: &str| url_of(&view["partitions"][partition_of(id.as_bytes(), 4) as usize]["owner"]);
    let back = servers[2].url.clone();
    let id = (0..).map(|i| format!("a{i}")).find(|id| owner_of(id) == back).unwrap();
    let admin = admin_token();
    let cookie = format!("statefold_token={admin}");
    let follow = reqwest::Client::new();
    let manual = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let created = follow.post(format!("{back}/v1/models/counter")).bearer_auth(&admin);
    let (status, body) = json_of(created.body(format!(r#"{{"id":"{id}"}}"#)).send().await.unwrap()).await;
    assert_eq!(status, 201, "{body}");

    // The loop guard, at each front and at the owner.
    for front in [&servers[0].url, &servers[1].url] {
        let model = format!("{front}/v1/models/counter/{id}");
        let hopped = manual.get(format!("{model}?statefold_hop=elsewhere")).bearer_auth(&admin);
        let response = hopped.send().await.unwrap();
        let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
        let (status, body) = json_of(response).await;
        assert_eq!((status, body["error"]["code"].as_str()), (503, Some("partition_unavailable")), "{body}");
        assert_eq!(retry_after.as_deref(), Some("1"));
        let hopped = manual.get(&model).bearer_auth(&admin).header("statefold-forwarded-by", "elsewhere");
        let (status, body) = json_of(hopped.send().await.unwrap()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (503, Some("partition_unavailable")), "{body}");
    }
    let at_owner = manual.get(format!("{back}/v1/models/counter/{id}?statefold_hop=elsewhere"));
    let (status, body) = json_of(at_owner.bearer_auth(&admin).send().await.unwrap()).await;
    assert_eq!((status, body["seq"].as_u64()), (200, Some(0)), "{body}");

    // Redirect (server 0): a browser follows the 307 with the same cookie (cookies are per
    // host, not per port).
    let model = format!("{}/v1/models/counter/{id}", servers[0].url);
    let first = manual.get(&model).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(first.status(), 307);
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let to_other = servers[1..].iter().any(|s| location.starts_with(&format!("{}/", s.url)));
    assert!(to_other && location.contains("statefold_hop="), "{location}");
    let (status, body) = json_of(manual.get(&location).header("cookie", &cookie).send().await.unwrap()).await;
    assert_eq!((status, body["seq"].as_u64()), (200, Some(0)), "{body}");
    // reqwest, as browsers' fetch, drops Authorization on the redirect: 401.
    let (status, body) = json_of(follow.get(&model).bearer_auth(&admin).send().await.unwrap()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthenticated")), "{body}");

    // Proxy (server 1): the header and the cookie reach the owner.
    let front = servers[1].url.clone();
    let model = format!("{front}/v1/models/counter/{id}");
    for (how, request) in
        [("header", follow.get(&model).bearer_auth(&admin)), ("cookie", follow.get(&model).header("cookie", &cookie))]
    {
        let response = request.send().await.unwrap();
        // Forwarded to the owner (whoever owns the model now, never the front itself).
        let served_by = response.headers()["statefold-served-by"].to_str().unwrap().to_owned();
        assert!(served_by != front && servers.iter().any(|s| s.url == served_by), "{how}: {served_by}");
        let (status, body) = json_of(response).await;
        assert_eq!((status, body["seq"].as_u64()), (200, Some(0)), "{how}: {body}");
    }
    let stream = follow.get(format!("{model}/events")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let mut stream = SseStream::new(stream);
    let mut event = stream.next_within(Duration::from_secs(10)).await.unwrap();
    if event.event == "message" {
        // The stream's opening `retry:`.
        event = stream.next_within(Duration::from_secs(10)).await.unwrap();
    }
    assert_eq!(event.event, "snapshot", "{event:?}");
    // A page of the front's own origin appends with its cookie: the owner takes it (the
    // client addressed the front); another origin's is refused there.
    for (origin, expected) in [(front.as_str(), 200), ("https://evil.example.com", 403)] {
        let append = follow.post(format!("{model}/diffs?wait=applied")).header("cookie", &cookie);
        let append = append.header("origin", origin).body(r#"{"add":2}"#);
        let (status, body) = json_of(append.send().await.unwrap()).await;
        assert_eq!(status, expected, "{origin}: {body}");
    }
    let (status, body) = json_of(follow.get(&model).bearer_auth(&admin).send().await.unwrap()).await;
    assert_eq!((status, body["seq"].as_u64(), body["state"].as_i64()), (200, Some(1), Some(2)), "{body}");
    for mut server in servers {
        server.signal("KILL");
        server.wait();
    }
}

/// Without `[cluster]` there is no map: 404 `not_sharded`.
#[tokio::test]
async fn a_server_without_cluster_has_no_map() {
    let server = statefold_tests::http::TestServer::start(statefold::config::Limits::default()).await;
    let (status, body) = server.get("/v1/cluster").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_sharded")), "{body}");
}

/// A sharded server whose cluster topic does not exist is not ready, and says which topic
/// to create; once it exists, the server is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_cluster_topic_a_sharded_server_is_unready_and_says_why() {
    let broker = Broker::start();
    broker.create_topic("counter", 2);
    let dir = tempfile::tempdir().unwrap();
    let server = Serve::sharded(dir.path(), &broker.brokers(), 0, &[]);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(&http, &format!("{}/readyz", server.url)).await;
        let message = body["error"]["message"].as_str().unwrap_or("").to_owned();
        if status == 503 && message.contains("\"statefold-cluster\"") && message.contains("create it") {
            break;
        }
        assert!(status == 503, "ready without the cluster topic: {body}");
        assert!(Instant::now() < deadline, "never said which topic is missing: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.create_topic("statefold-cluster", 1);
    server.wait_ready(&http).await;
}
