//! The README's commands, run as a new user would run them against `./dev.sh run`: the
//! same binary, `statefold.toml` and the built reducers. Every `curl` line of the
//! Quickstart block, and the Hot reload section's deploy (`curl -X PUT ...`) and replay
//! (`statefold replay ...`), in order. Two things differ from a terminal: the server
//! listens on a free port (each `localhost:8080` is rewritten to it), and `HASH` is the
//! hash the previous commands answered. Streams (`curl -N`) are read for two seconds.

use std::path::{Path, PathBuf};
use std::process::Command;

use statefold_tests::process::Serve;

/// The text of README section `heading` (up to the next heading of its level or higher;
/// a `#` comment in a code block is no heading).
fn section(readme: &str, heading: &str) -> String {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let mut lines = readme.lines().skip_while(|l| *l != heading);
    assert!(lines.next().is_some(), "README has no {heading:?}");
    let mut fenced = false;
    let mut out = String::new();
    for line in lines {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !fenced && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Lines of the `sh` code blocks of `text`.
fn sh_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        match line.trim() {
            "```sh" => inside = true,
            "```" => inside = false,
            l if inside && !l.is_empty() && !l.starts_with('#') => out.push(l.to_owned()),
            _ => {}
        }
    }
    out
}

/// Inline code spans of `text` that start with `prefix`.
fn spans<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.split('`').skip(1).step_by(2).filter(|s| s.starts_with(prefix)).collect()
}

struct Shell {
    url: String,
    cwd: PathBuf,
    binary: PathBuf,
    hash: Option<String>,
}

impl Shell {
    /// Runs one README command; returns its stdout.
    fn run(&mut self, line: &str) -> String {
        let command = line.split(" # ").next().unwrap().trim();
        let port_free = command.replace("127.0.0.1:8080", &self.url).replace("localhost:8080", &self.url);
        let mut command = match &self.hash {
            Some(hash) => port_free.replace("HASH", hash),
            None => {
                assert!(!port_free.contains("HASH"), "no hash answered before {line:?}");
                port_free
            }
        };
        if let Some(rest) = command.strip_prefix("statefold ") {
            command = format!("{} {rest}", self.binary.display());
        }
        if command.starts_with("curl -N") {
            command = command.replacen("curl -N", "curl -N --max-time 2", 1);
        }
        let output = Command::new("bash").arg("-c").arg(&command).current_dir(&self.cwd).output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        // curl's 28: the stream was cut by --max-time, as a user's Ctrl-C would.
        let streamed = command.starts_with("curl -N") && output.status.code() == Some(28);
        assert!(
            output.status.success() || streamed,
            "README command failed: {line}\nran: {command}\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!stdout.contains("\"error\""), "README command answered an error: {line}\n{stdout}");
        if let Some(hash) = last_hash(&stdout) {
            self.hash = Some(hash);
        }
        stdout
    }
}

/// The last `"hash":"…"` of a JSON answer, or `id: …` of an SSE stream.
fn last_hash(stdout: &str) -> Option<String> {
    let json = stdout.rfind("\"hash\":\"").map(|i| stdout[i + 8..i + 8 + 64].to_owned());
    json.filter(|h| h.chars().all(|c| c.is_ascii_hexdigit()))
}

#[test]
fn readme_quickstart_and_hot_reload_commands_run_as_written() {
    let root = statefold_tests::workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let quickstart = sh_lines(&section(&readme, "## Quickstart"));
    assert!(quickstart.iter().filter(|l| l.starts_with("curl")).count() >= 8, "{quickstart:?}");
    let hot_reload = section(&readme, "### Hot reload");
    let deploys = spans(&hot_reload, "curl -X PUT");
    assert_eq!(deploys.len(), 1, "the Hot reload section's deploy command");
    let replays: Vec<String> =
        sh_lines(&hot_reload).into_iter().filter(|l| l.starts_with("statefold replay")).collect();
    assert_eq!(replays.len(), 1, "the Hot reload section's replay command");

    // As `./dev.sh run` starts it: statefold.toml, the built reducers (here, on a free port
    // and a fresh data dir).
    let dir = tempfile::tempdir().unwrap();
    let reducers = statefold_tests::wasm("counter").parent().unwrap().to_owned();
    let config = root.join("statefold.toml");
    let serve = Serve::spawn_args(dir.path(), &args(&config, &reducers, dir.path()));
    let mut shell = Shell {
        url: serve.url.trim_start_matches("http://").to_owned(),
        cwd: reducers.clone(),
        binary: statefold_tests::statefold_binary(),
        hash: None,
    };
    wait_ready(&shell.url);

    let mut outputs = Vec::new();
    for line in quickstart.iter().filter(|l| l.starts_with("curl")) {
        outputs.push(shell.run(line));
    }
    // The stream shows a snapshot and `synced`; the resumed one, what was missed.
    assert!(outputs.iter().any(|o| o.contains("event: snapshot") && o.contains("event: synced")), "{outputs:#?}");
    // A counter to deploy to: `PUT` the file in the reducers directory, then replay.
    shell.run(&format!("curl -s -X POST localhost:8080/v1/models/counter -d '{}'", r#"{"id":"c"}"#));
    let deployed = shell.run(deploys[0]);
    assert!(deployed.contains("\"version\""), "{deployed}");
    let replayed = shell.run(&replays[0]);
    assert!(replayed.contains("(finished)"), "{replayed}");
    drop(serve);
}

fn args(config: &Path, reducers: &Path, dir: &Path) -> Vec<String> {
    vec![
        "--config".into(),
        config.display().to_string(),
        "--reducers-dir".into(),
        reducers.display().to_string(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ]
}

fn wait_ready(address: &str) {
    for _ in 0..500 {
        let ready = Command::new("curl").args(["-sf", &format!("{address}/readyz")]).output().unwrap();
        if ready.status.success() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("not ready in 10 s");
}

/// A README default as written: `1 MiB`, `100,000`, `false`.
fn readme_value(text: &str) -> serde_json::Value {
    let text = text.replace(',', "");
    if let Some(mib) = text.strip_suffix(" MiB") {
        return serde_json::json!(mib.parse::<u64>().expect("a number of MiB") << 20);
    }
    if let Some(kib) = text.strip_suffix(" KiB") {
        return serde_json::json!(kib.parse::<u64>().expect("a number of KiB") << 10);
    }
    match text.as_str() {
        "true" => serde_json::json!(true),
        "false" => serde_json::json!(false),
        number => serde_json::json!(number.parse::<u64>().unwrap_or_else(|_| panic!("README default {text:?}"))),
    }
}

#[test]
fn readme_limits_tables_list_every_limit_with_its_default() {
    let readme = std::fs::read_to_string(statefold_tests::workspace_root().join("README.md")).unwrap();
    let limits = section(&readme, "## Limits");
    let limits = limits.as_str();
    let documented: std::collections::BTreeMap<String, serde_json::Value> = limits
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_owned(), readme_value(cells.get(2)?)))
        })
        .collect();
    let defaults = serde_json::to_value(statefold::config::Limits::default()).unwrap();
    let defaults = defaults.as_object().unwrap();
    for (name, value) in defaults {
        assert_eq!(documented.get(name), Some(value), "README's Limits table on {name}");
    }
    for name in documented.keys() {
        assert!(defaults.contains_key(name), "README documents {name}, which is not a limit");
    }
}

/// The codes of the README's error table: its first column, and the deploy refusals row's
/// list.
fn readme_error_codes(readme: &str) -> Vec<String> {
    let table = readme
        .lines()
        .skip_while(|line| !line.starts_with("| code | status | when |"))
        .skip(2)
        .take_while(|line| line.starts_with('|'));
    let mut codes = Vec::new();
    for row in table {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let named = if cells[1] == "deploy refusals" { cells[3] } else { cells[1] };
        codes.extend(named.split('`').skip(1).step_by(2).map(str::to_owned));
    }
    codes
}

/// The README's error table and the OpenAPI document's error codes are the server's one
/// code enum (`statefold::code::Code`): a code added to the enum without a README row, or
/// a row for a code the server cannot send, fails here.
#[test]
fn the_error_table_and_the_openapi_document_are_the_code_enum() {
    let root = statefold_tests::workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let enum_codes: std::collections::BTreeSet<String> =
        statefold::code::Code::ALL.iter().map(|c| c.as_str().to_owned()).collect();
    let table: std::collections::BTreeSet<String> = readme_error_codes(&readme).into_iter().collect();
    let missing: Vec<&String> = enum_codes.difference(&table).collect();
    let extra: Vec<&String> = table.difference(&enum_codes).collect();
    assert!(missing.is_empty(), "codes the server sends with no row in the README's error table: {missing:?}");
    assert!(extra.is_empty(), "README error rows for codes the server never sends: {extra:?}");
    let openapi: serde_json::Value = serde_json::from_str(statefold::api::OPENAPI).unwrap();
    let listed = &openapi["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"];
    let listed: std::collections::BTreeSet<String> =
        listed.as_array().expect("Error.code has an enum").iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    assert_eq!(listed, enum_codes, "openapi.json's Error.code enum is not the server's codes");
}

/// Every error code the README documents is named (as a string literal) by at least one
/// test: a code no test reaches is a documented promise nobody checks.
#[test]
fn every_error_code_in_the_readme_is_named_by_a_test() {
    let root = statefold_tests::workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let codes = readme_error_codes(&readme);
    assert!(codes.len() >= 40, "the README's error table: {codes:?}");
    let mut tests = String::new();
    for dir in ["tests/tests", "host/core/src/fold"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            if file.ends_with(".rs") && file != "readme.rs" && (dir == "tests/tests" || file == "tests.rs") {
                tests.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    // Codes no test can bring about on purpose, each with why. Every one must still be a
    // code (a stale entry fails) and must not be named by a test (then it is tested: drop it).
    const UNREACHED: [(&str, &str); 2] = [
        ("internal", "a blocking task that panicked, or a response that cannot be built"),
        ("shutting_down", "a deploy or a wait cut short by the stop, a race a test cannot win each time"),
    ];
    for (code, why) in UNREACHED {
        assert!(codes.contains(&code.to_owned()), "UNREACHED lists {code}, which is no longer a code ({why})");
        assert!(!tests.contains(&format!("\"{code}\"")), "{code} is named by a test now: drop it from UNREACHED");
    }
    let unnamed: Vec<&String> = codes
        .iter()
        .filter(|code| !tests.contains(&format!("\"{code}\"")) && !UNREACHED.iter().any(|(c, _)| c == code))
        .collect();
    assert!(unnamed.is_empty(), "README error codes that no test names: {unnamed:?}");
}

/// Every `toml` block of the README but a Cargo manifest's is a part of a configuration the
/// server takes: each one, written to a file, is read by `Config::from_file` (unknown keys
/// refused), so a renamed or removed setting cannot stay documented.
#[test]
fn readme_toml_blocks_are_settings_the_server_takes() {
    let readme = std::fs::read_to_string(statefold_tests::workspace_root().join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut block: Option<String> = None;
    for line in readme.lines() {
        match (line.trim(), block.as_mut()) {
            ("```toml", None) => block = Some(String::new()),
            ("```", Some(_)) => blocks.extend(block.take().filter(|b| !b.starts_with("[lib]"))),
            (_, Some(text)) => {
                text.push_str(line);
                text.push('\n');
            }
            _ => {}
        }
    }
    assert!(blocks.len() >= 3, "the README's toml blocks were not found");
    let dir = tempfile::tempdir().unwrap();
    for text in blocks {
        let file = dir.path().join("block.toml");
        std::fs::write(&file, &text).unwrap();
        if let Err(error) = statefold::config::Config::from_file(&file) {
            panic!("a README toml block is not a configuration the server takes: {error}\n{text}");
        }
    }
}
