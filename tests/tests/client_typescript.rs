//! The TypeScript client's conformance suite (`clients/typescript/test`, Node's test runner)
//! against the real `statefold serve` binary and the built reducers: document, counter and
//! workflow models folded to the server's state (the last two with the reducer's own
//! module, transpiled by jco), resume across a SIGKILL and a restart, a reset, a slow
//! consumer, a deploy mid-stream, and 100 clients hopping between two replicas of one
//! Kafka log (a real Tansu broker started here). `./dev.sh test` installs and builds the
//! package first.

use std::process::Command;

#[test]
fn the_typescript_client_conformance_suite_passes() {
    let package = statefold_tests::workspace_root().join("clients/typescript");
    assert!(
        package.join("dist/index.js").exists() && package.join("node_modules").exists(),
        "clients/typescript is not built: ./dev.sh test runs npm ci and npm run build there"
    );
    let reducers = statefold_tests::wasm("counter_v2").parent().expect("the reducers' directory").to_owned();
    let broker = statefold_tests::broker::Broker::with_example_topics();
    let output = Command::new("npm")
        .args(["test", "--silent"])
        .current_dir(&package)
        .env("STATEFOLD_BIN", statefold_tests::statefold_binary())
        .env("STATEFOLD_REDUCERS", reducers)
        .env("STATEFOLD_BROKERS", broker.brokers())
        .output()
        .expect("npm runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the client's conformance suite failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("# fail 0") && stdout.contains("# skipped 0") && !stdout.contains("# pass 0"), "{stdout}");
}

/// The inspector page the binary serves runs the client's current build: the copy built into
/// the host (`host/server/src/api/inspector/client.js`) is `npm run build`'s output.
#[test]
fn the_inspector_embeds_the_client_as_built() {
    let built = statefold_tests::workspace_root().join("clients/typescript/dist/index.js");
    let built = std::fs::read_to_string(&built).expect("clients/typescript is built (./dev.sh test builds it)");
    assert!(
        built == statefold::api::INSPECTOR_CLIENT_JS,
        "host/server/src/api/inspector/client.js is not the client's build: cp clients/typescript/dist/index.js host/server/src/api/inspector/client.js"
    );
}
