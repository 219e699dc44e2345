//! The `statefold` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use statefold::config::{ClusterConfig, Config, KafkaConfig, KindConfig, LimitFlags};
use statefold::reducer::{Checkpoints, MemoryCheckpoints, Runtime, WIT_VERSION};

/// Statefold folds streams of diffs into live per-model state with reducers compiled to
/// WebAssembly.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fold the configured kinds' topics and serve the HTTP API. The log is Kafka when
    /// brokers are configured ([kafka] or --kafka-brokers), otherwise the embedded log kept
    /// in the data dir.
    Serve(ServeArgs),
    /// Work with reducer components (.wasm).
    #[command(subcommand)]
    Reducer(ReducerCommand),
    /// Rebuild a kind's states from its retained diffs with its reducer, through a running
    /// server (POST /v1/kinds/KIND/replay: a replay record in each partition, so every
    /// replica rebuilds alike), printing that server's progress until it finishes. Old
    /// states keep serving until each model's rebuilt one is swapped in; clients holding old
    /// hashes then get `reset` + `snapshot`.
    Replay {
        /// The kind to replay.
        kind: String,
        #[command(flatten)]
        server: ServerArgs,
        /// Seconds between progress reports.
        #[arg(long, default_value_t = 1.0)]
        interval_s: f64,
    },
    /// Create a reducer project that builds as it is: a sample reducer (totals by key, with
    /// merge and delta) in Rust (the guest SDK), JavaScript (componentize-js) or Python
    /// (componentize-py), its cases (cases.jsonl) and a README with its build, test and
    /// deploy commands.
    New {
        /// The reducer's name: a-z 0-9 _ (it names the .wasm file and the reducer).
        name: String,
        /// The project's language.
        #[arg(long, default_value = "rust", value_parser = statefold::scaffold::LANGUAGES)]
        lang: String,
        /// Where to create it (default: ./NAME); it must not exist or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Rust: the guest SDK (statefold-guest) to depend on (default: the one of the
        /// source tree this binary was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Fold JSON-lines cases through a reducer in the server's runtime, sandbox and limits,
    /// and check what each line expects (state, hash, refusal); with --laws, also merge and
    /// delta on the cases' runs and on runs generated from their diffs. Prints each failure
    /// (the line, expected and actual, the paths that differ); exits 1 on any. A line:
    /// {"model": "m1", "diff": {...}, "state": ..., "hash": "...", "refused": true | "text"}
    /// (model defaults to "case"; the diff is hashed as written).
    Test {
        /// The reducer component, e.g. target/wasm32-wasip2/release/counter.wasm
        file: PathBuf,
        /// The case file (JSON lines).
        cases: PathBuf,
        /// Also check the merge and delta laws.
        #[arg(long)]
        laws: bool,
        /// The seed of the runs --laws generates.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The kind the models belong to (their genesis hashes depend on it; default: the
        /// reducer's declared name).
        #[arg(long)]
        kind: Option<String>,
        /// Sandbox limits (only the reducer_* ones apply here).
        #[command(flatten)]
        limits: LimitFlags,
    },
    /// Deploy a reducer to a running server (PUT /v1/reducers/NAME, NAME the file's name
    /// without .wasm unless --name says otherwise), and print the version it answers: active
    /// once the server has folded its deploy records, or why it was refused.
    Deploy {
        /// The reducer component, e.g. target/wasm32-wasip2/release/counter.wasm
        file: PathBuf,
        /// The reducer's name (default: the file's name without .wasm).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// A running server's versions of a reducer, active first: version, status, origin, who
    /// deployed it, what it declares, when it last changed.
    Versions {
        /// The reducer's name.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Follow a model of a running server in the terminal: each event that moves it, once
    /// (a snapshot, then each diff; after a dropped connection, a patch from the last hash
    /// printed). Resumes by itself until Ctrl-C; progress goes to stderr.
    Tail {
        /// KIND/ID
        model: String,
        /// Start from this hash (what you hold): only what came after is printed.
        #[arg(long)]
        since: Option<String>,
        /// Print each event as the JSON the server sent (one line each, with `event`).
        #[arg(long)]
        json: bool,
        /// After each event, print the model's state at the new hash.
        #[arg(long)]
        state: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Refold the configured kinds from Kafka (the source of truth) into a scratch store,
    /// up to the positions the data dir's store has folded, and compare every model's head
    /// (seq, offset, hash) and its state at the head with it. Prints progress and each
    /// mismatch; exits non-zero on any. Takes the same configuration as `serve`, and runs
    /// beside a running server (the store is read as of the start).
    Verify {
        #[command(flatten)]
        serve: ServeArgs,
        /// Replace each diverged model's history and head with the refolded ones. Writes
        /// to the store: stop its server first.
        #[arg(long)]
        repair: bool,
    },
    /// Forget everything the data dir's store folded for KIND (its models, rejections,
    /// positions, versions), so that the next `serve` folds the kind's topic again from
    /// its first record with the configured reducer. For a kind whose folding stopped
    /// because its topic is no longer the log the store folded (deleted and recreated,
    /// partitions added, records deleted before they were folded: /readyz says which).
    /// Takes the same configuration as `serve`; stop the server first.
    Reset {
        /// The kind to refold.
        kind: String,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

#[derive(Subcommand)]
enum ReducerCommand {
    /// Load a reducer in the sandbox and print what it declares, or why it cannot be loaded
    /// (not wasm, a core module, wrong world, incompatible version, failing describe).
    /// Also checks that a new model's empty state survives a snapshot/restore round trip.
    Check {
        /// The reducer component, e.g. target/wasm32-wasip2/release/counter.wasm
        file: PathBuf,
        /// Sandbox limits (only the reducer_* ones apply here).
        #[command(flatten)]
        limits: LimitFlags,
    },
}

/// How the CLI reaches a running server.
#[derive(Args)]
struct ServerArgs {
    /// The server's base URL.
    #[arg(long, visible_alias = "url", env = "STATEFOLD_URL", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// A bearer token (a server with [auth]).
    #[arg(long, env = "STATEFOLD_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ServerArgs {
    fn remote(self) -> anyhow::Result<statefold::remote::Remote> {
        statefold::remote::Remote::new(&self.server, self.token)
    }
}

/// `statefold serve`: a TOML file, and flags that override it.
#[derive(Args)]
struct ServeArgs {
    /// The config file (TOML): listen, data_dir, reducers_dir, [[kind]] sections, [kafka],
    /// [auth] (bearer tokens), [cors], [tls] (HTTPS with HTTP/2), [cluster] (sharded mode),
    /// [reactions] (their relay), [requests] (request/reply over Kafka), [limits].
    #[arg(long, short, env = "STATEFOLD_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0: any free port).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Where the RocksDB store and the compiled-reducer cache live.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where kinds' reducer files are looked up, and watched: a new or replaced file is
    /// deployed (hot reload; also PUT /v1/reducers/NAME). After the first start the store
    /// decides which version is active.
    #[arg(long)]
    reducers_dir: Option<PathBuf>,
    /// A kind, as NAME=FILE.wasm[@TOPIC] (repeatable; adds to the config file's kinds).
    #[arg(long = "kind", value_name = "NAME=FILE.wasm[@TOPIC]")]
    kinds: Vec<String>,
    /// Fold from Kafka: bootstrap brokers, host:port[,host:port...] (sets [kafka] brokers).
    #[arg(long, env = "STATEFOLD_KAFKA_BROKERS", value_name = "HOST:PORT[,...]")]
    kafka_brokers: Option<String>,
    /// The consumer group the folded position is committed to, for lag monitoring only
    /// (positions are read from the store). Default: statefold.
    #[arg(long)]
    kafka_group_id: Option<String>,
    /// A librdkafka property for both clients, e.g. security.protocol=SASL_SSL (repeatable;
    /// overrides [kafka.properties]).
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    kafka_properties: Vec<String>,
    /// Serve reads and streams only: creates, appends, deploys and replays answer 403
    /// `read_only` (sets `read_only = true`).
    #[arg(long)]
    read_only: bool,
    /// Sharded mode: the base URL other servers forward (or redirect) this server's clients to, e.g.
    /// https://statefold-1.internal:8443 (sets [cluster] advertise_url; needs Kafka).
    #[arg(long, value_name = "URL")]
    cluster_url: Option<String>,
    /// Sharded mode: how many servers besides the owner fold each partition ([cluster]
    /// standbys; default 1).
    #[arg(long, value_name = "N")]
    cluster_standbys: Option<usize>,
    /// Sharded mode: forward a request for a model folded elsewhere to its owner (proxy), or
    /// answer it with a 307 there (redirect: only where all servers are one origin, since
    /// clients drop the Authorization header on a cross-origin redirect) ([cluster] route;
    /// default proxy).
    #[arg(long, value_name = "MODE", value_parser = route_mode())]
    cluster_route: Option<statefold::config::RouteMode>,
    /// Sharded mode: the topic servers publish what they fold to ([cluster] topic; default
    /// statefold-cluster).
    #[arg(long, value_name = "TOPIC")]
    cluster_topic: Option<String>,
    /// Do not relay reducers' reactions from this server's outbox (sets [reactions] relay =
    /// false): for all but one of several unsharded replicas.
    #[arg(long)]
    no_relay: bool,
    /// Relay reactions to Kafka in transactions (sets [reactions] transactional = true):
    /// for brokers that implement them (EndTxn). Without, the relay reads back what it
    /// wrote after a crash: exactly once either way.
    #[arg(long)]
    relay_transactional: bool,
    /// Serve request/reply over Kafka (turns [requests] on; needs Kafka).
    #[arg(long)]
    requests: bool,
    /// Request/reply: the request topic ([requests] topic; default statefold-requests).
    #[arg(long, value_name = "TOPIC")]
    requests_topic: Option<String>,
    /// Request/reply: the target this server answers for ([requests] target; default
    /// statefold); requests for other targets are dropped.
    #[arg(long, value_name = "NAME")]
    requests_target: Option<String>,
    /// Request/reply: the consumer group this target's servers share ([requests] group;
    /// default the Kafka group id + .requests. + the target).
    #[arg(long, value_name = "GROUP")]
    requests_group: Option<String>,
    #[command(flatten)]
    limits: LimitFlags,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Reducer(ReducerCommand::Check { file, limits }) => {
            let mut all = statefold::config::Limits::default();
            limits.apply(&mut all);
            check(&file, all.reducer())
        }
        Command::Replay { kind, server, interval_s } => server.remote().and_then(|r| replay(&kind, &r, interval_s)),
        Command::New { name, lang, dir, sdk } => new(&name, &lang, dir, sdk),
        Command::Test { file, cases, laws, seed, kind, limits } => {
            let mut all = statefold::config::Limits::default();
            limits.apply(&mut all);
            test(&file, &cases, laws.then_some(seed), kind, all.reducer())
        }
        Command::Deploy { file, name, server } => server.remote().and_then(|r| deploy(&file, name, &r)),
        Command::Versions { name, server } => server.remote().and_then(|r| versions(&name, &r)),
        Command::Tail { model, since, json, state, server } => {
            server.remote().and_then(|r| tail(&model, since, statefold::remote::TailOptions { json, state }, &r))
        }
        Command::Verify { serve, repair } => config_of(serve).and_then(|config| verify(&config, repair)),
        Command::Reset { kind, serve } => config_of(serve).and_then(|config| {
            let models = statefold::server::reset(&config, &kind)?;
            println!("reset {kind}: {models} models forgotten; the next start refolds its topic from its first record");
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = config_of(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let running = statefold::server::start(config).await?;
        println!("statefold listening on {}", running.url);
        let stop = running.app.stopping().clone();
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler can be installed");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received: stopping");
            stop.cancel();
        });
        running.wait().await.map_err(|e| anyhow::anyhow!("stopped: {e}"))
    })
}

fn verify(config: &Config, repair: bool) -> anyhow::Result<()> {
    let mut progress = |p: statefold::verify::Progress| {
        let rate = p.records as f64 / p.elapsed.as_secs_f64().max(1e-3);
        let percent = if p.total == 0 { 100.0 } else { p.records as f64 * 100.0 / p.total as f64 };
        eprintln!("verify: refolded {}/{} records ({percent:.1}%, {rate:.0} records/s)", p.records, p.total);
    };
    let report = statefold::verify::verify(config, repair, &mut progress)?;
    let head = |h: &Option<statefold::model::Head>| match h {
        Some(h) => format!("seq {} offset {} hash {}", h.seq, h.offset.map_or("-".into(), |o| o.to_string()), h.hash),
        None => "missing".into(),
    };
    for m in &report.mismatches {
        println!(
            "MISMATCH {}/{} ({}): store has {}; the log folds to {}",
            m.model.kind,
            m.model.id,
            m.what,
            head(&m.live),
            head(&m.log)
        );
    }
    println!(
        "verify: {} records refolded, {} models compared, {} mismatched{}",
        report.records,
        report.models,
        report.mismatches.len(),
        if repair { format!(", {} repaired", report.repaired) } else { String::new() }
    );
    if report.mismatches.is_empty() || report.repaired == report.mismatches.len() {
        Ok(())
    } else {
        anyhow::bail!(
            "{} models differ from what the log folds to (run with --repair on a stopped server to replace them)",
            report.mismatches.len()
        )
    }
}

fn config_of(args: ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(dir) = args.reducers_dir {
        config.reducers_dir = dir;
    }
    for flag in &args.kinds {
        config.kinds.push(KindConfig::parse_flag(flag)?);
    }
    if let Some(brokers) = args.kafka_brokers {
        config.kafka.get_or_insert_with(|| KafkaConfig::new("")).brokers = brokers;
    }
    if args.kafka_group_id.is_some() || !args.kafka_properties.is_empty() {
        let kafka = config.kafka.as_mut().ok_or_else(|| {
            anyhow::anyhow!("--kafka-group-id and --kafka-property need brokers ([kafka] or --kafka-brokers)")
        })?;
        if let Some(group) = args.kafka_group_id {
            kafka.group_id = group;
        }
        for flag in &args.kafka_properties {
            let (key, value) = KafkaConfig::parse_property(flag)?;
            kafka.properties.insert(key, value);
        }
    }
    if let Some(url) = args.cluster_url {
        config.cluster.get_or_insert_with(|| ClusterConfig::new("")).advertise_url =
            url.trim_end_matches('/').to_owned();
    }
    if args.cluster_standbys.is_some() || args.cluster_route.is_some() || args.cluster_topic.is_some() {
        let cluster = config.cluster.as_mut().ok_or_else(|| {
            anyhow::anyhow!(
                "--cluster-standbys, --cluster-route and --cluster-topic need sharded mode ([cluster] or --cluster-url)"
            )
        })?;
        if let Some(standbys) = args.cluster_standbys {
            cluster.standbys = standbys;
        }
        if let Some(route) = args.cluster_route {
            cluster.route = route;
        }
        if let Some(topic) = args.cluster_topic {
            cluster.topic = topic;
        }
    }
    config.read_only |= args.read_only;
    if args.requests || args.requests_topic.is_some() || args.requests_target.is_some() || args.requests_group.is_some()
    {
        let requests = config.requests.get_or_insert_with(Default::default);
        if let Some(topic) = args.requests_topic {
            requests.topic = topic;
        }
        if let Some(target) = args.requests_target {
            requests.target = target;
        }
        if let Some(group) = args.requests_group {
            requests.group = Some(group);
        }
    }
    config.reactions.relay &= !args.no_relay;
    config.reactions.transactional |= args.relay_transactional;
    args.limits.apply(&mut config.limits);
    config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(config)
}

/// Runs a client command's requests on a runtime of its own.
fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(future)
}

fn replay(kind: &str, remote: &statefold::remote::Remote, interval_s: f64) -> anyhow::Result<()> {
    let interval = std::time::Duration::try_from_secs_f64(interval_s.max(0.01))?;
    block_on(async move {
        let endpoint = format!("/v1/kinds/{}/replay", statefold::remote::segment(kind));
        let mut job = remote.post(&endpoint).await?;
        loop {
            println!(
                "replay {kind}: {}/{} models rebuilt, {} failed ({})",
                job["models_done"],
                job["models_total"],
                job["models_failed"],
                job["state"].as_str().unwrap_or("?")
            );
            if job["state"] == "finished" {
                if let Some(error) = job["first_error"].as_str() {
                    println!("first failure: {error}");
                }
                anyhow::ensure!(job["models_failed"] == 0, "some models were not rebuilt");
                return Ok(());
            }
            tokio::time::sleep(interval).await;
            job = remote.get(&endpoint).await?;
        }
    })
}

fn deploy(file: &std::path::Path, name: Option<String>, remote: &statefold::remote::Remote) -> anyhow::Result<()> {
    use anyhow::Context;
    let module = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = match name {
        Some(name) => name,
        None => file
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_owned)
            .with_context(|| format!("{}: no file name to name the reducer after; give --name", file.display()))?,
    };
    let body = block_on(remote.deploy(&name, module))?;
    let version = &body["version"];
    let declared = &version["declared"];
    let what = if body["unchanged"] == true { "already active" } else { "deployed" };
    println!(
        "{name}: {what}: version {} ({} {}), {} partition(s), {} ms, on {}",
        version["version"].as_str().unwrap_or("?"),
        declared["name"].as_str().unwrap_or("?"),
        declared["version"].as_str().unwrap_or("?"),
        body["partitions"],
        body["took_ms"].as_f64().unwrap_or(0.0).round(),
        remote.base
    );
    Ok(())
}

fn versions(name: &str, remote: &statefold::remote::Remote) -> anyhow::Result<()> {
    let body = block_on(remote.versions(name))?;
    let kinds: Vec<&str> =
        body["kinds"].as_array().map(|k| k.iter().filter_map(|k| k.as_str()).collect()).unwrap_or_default();
    println!("reducer {name} (kinds: {})", kinds.join(", "));
    println!("{:<16} {:<9} {:<10} {:<16} {:<24} changed", "version", "status", "origin", "subject", "declared");
    for v in body["versions"].as_array().into_iter().flatten() {
        let id = v["version"].as_str().unwrap_or("?");
        let declared = format!(
            "{} {}",
            v["declared"]["name"].as_str().unwrap_or("?"),
            v["declared"]["version"].as_str().unwrap_or("?")
        );
        let changed = v["changed_ms"].as_i64().map(format_ms).unwrap_or_default();
        println!(
            "{:<16} {:<9} {:<10} {:<16} {:<24} {}",
            id.get(..16).unwrap_or(id),
            v["status"].as_str().unwrap_or("?"),
            v["origin"].as_str().unwrap_or("?"),
            v["subject"].as_str().unwrap_or("-"),
            declared,
            changed
        );
        if let Some(error) = v["error"]["message"].as_str() {
            println!("  refused: {error}");
        }
    }
    Ok(())
}

/// Milliseconds since the epoch as a UTC time, to the second.
fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

fn tail(
    model: &str,
    since: Option<String>,
    options: statefold::remote::TailOptions,
    remote: &statefold::remote::Remote,
) -> anyhow::Result<()> {
    let (kind, id) = model.split_once('/').ok_or_else(|| anyhow::anyhow!("{model:?}: expected KIND/ID"))?;
    block_on(async move {
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("tail: stopped");
        };
        let mut stdout = std::io::stdout();
        statefold::remote::tail(remote, kind, id, since, options, &mut stdout, stop).await
    })
}

fn new(name: &str, lang: &str, dir: Option<PathBuf>, sdk: Option<PathBuf>) -> anyhow::Result<()> {
    use statefold::scaffold;
    let (files, language, next) = match lang {
        "js" => (scaffold::js(name), "JavaScript".to_owned(), "npm install && npm run build"),
        "python" => (
            scaffold::python(name),
            "Python".to_owned(),
            "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt, then build",
        ),
        _ => {
            let sdk = match sdk.or_else(scaffold::default_sdk) {
                Some(sdk) => std::path::absolute(&sdk)?,
                None => anyhow::bail!(
                    "where is the guest SDK (statefold-guest)? give --sdk PATH (guest-sdk/rust of a Statefold checkout)"
                ),
            };
            let language = format!("Rust, SDK {}", sdk.display());
            (scaffold::rust(name, &sdk), language, "cargo build --release --target wasm32-wasip2")
        }
    };
    let files = files?;
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    scaffold::create(&dir, &files)?;
    println!("created {} (reducer {name}, {language})", dir.display());
    println!("next: cd {} && {next} (see its README.md)", dir.display());
    Ok(())
}

fn test(
    file: &std::path::Path,
    cases: &std::path::Path,
    laws: Option<u64>,
    kind: Option<String>,
    limits: statefold::reducer::ReducerLimits,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let runtime = Runtime::new(limits, None)?;
    let reducer = runtime.load_file(file).with_context(|| format!("cannot load {}", file.display()))?;
    let text = std::fs::read_to_string(cases).with_context(|| format!("cannot read {}", cases.display()))?;
    let parsed = statefold::cases::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", cases.display()))?;
    let kind = kind.unwrap_or_else(|| reducer.info().name.clone());
    let report = statefold::cases::run(&reducer, &kind, &parsed, laws)?;
    let info = reducer.info();
    println!(
        "{} {} on {}: {} lines, {} diffs applied, {} refused as expected",
        info.name,
        info.version,
        cases.display(),
        report.lines,
        report.applied,
        report.refused
    );
    if let Some(laws) = &report.laws {
        let merge = if info.merge {
            format!("{} merges checked ({} runs not composable)", laws.merges, laws.not_composable)
        } else {
            "no merge declared".into()
        };
        let delta = if info.delta { format!("{} deltas checked", laws.deltas) } else { "no delta declared".into() };
        println!("laws: {merge}, {delta}, on the cases' runs and {} generated runs", laws.generated_runs);
    }
    for failure in &report.failures {
        println!("FAIL {failure}");
    }
    anyhow::ensure!(report.failures.is_empty(), "{} of the checks failed", report.failures.len());
    println!("ok");
    Ok(())
}

fn check(file: &std::path::Path, limits: statefold::reducer::ReducerLimits) -> anyhow::Result<()> {
    use anyhow::Context;
    let runtime = Runtime::new(limits, None)?;
    let reducer = runtime.load_file(file).with_context(|| format!("cannot load {}", file.display()))?;
    let info = reducer.info();
    let capabilities: Vec<&str> = [("merge", info.merge), ("delta", info.delta)]
        .into_iter()
        .filter_map(|(name, has)| has.then_some(name))
        .collect();

    // A new model's empty state must snapshot, restore and snapshot to the same bytes.
    let mut checkpoints = MemoryCheckpoints::default();
    let empty = reducer.models().snapshot("check", &mut checkpoints)?;
    checkpoints.save("check", empty.clone()).map_err(|e| anyhow::anyhow!(e))?;
    let again = reducer.models().snapshot("check", &mut checkpoints)?;
    anyhow::ensure!(
        again == empty,
        "the empty state does not survive snapshot/restore: {:?} became {:?}",
        String::from_utf8_lossy(&empty),
        String::from_utf8_lossy(&again)
    );

    println!("reducer:       {} {}", info.name, info.version);
    println!("module:        {}", reducer.id());
    println!("contract:      statefold:reducer@{} (this host speaks {WIT_VERSION})", info.wit_version);
    println!("diff format:   {}", info.diff_format);
    println!("state format:  {}", info.state_format);
    println!("capabilities:  {}", if capabilities.is_empty() { "none".into() } else { capabilities.join(", ") });
    println!("empty state:   {} (round-trips)", String::from_utf8_lossy(&empty));
    println!("imports:       {}", info.imports.join(", "));
    Ok(())
}

/// `--cluster-route`: `proxy` or `redirect`, listed in `--help` (`RouteMode` parses them).
fn route_mode() -> impl clap::builder::TypedValueParser<Value = statefold::config::RouteMode> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["proxy", "redirect"])
        .map(|mode| mode.parse().expect("a possible value is a route mode"))
}
