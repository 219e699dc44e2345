//! Shared setup for Statefold's integration tests and benchmarks: builds the real `.wasm`
//! reducers from `reducers/` (once per process; cargo makes concurrent builds wait for
//! each other).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

fn cargo(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", target_dir())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(status.success(), "`cargo {}` failed ({status})", args.join(" "));
}

/// Path of the built `.wasm` of reducer `name`: crate `statefold-reducer-NAME` (an
/// example) or `statefold-faulty-NAME` (test-only). Every reducer in the workspace is built
/// the first time; the workspace members are the one list of them.
pub fn wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        cargo(&[
            "build",
            "--quiet",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--workspace",
            "--exclude",
            "statefold",
            "--exclude",
            "statefold-tests",
        ])
    });
    let dir = target_dir().join("wasm32-wasip2/release");
    ["statefold_reducer_", "statefold_faulty_"]
        .iter()
        .map(|prefix| dir.join(format!("{prefix}{name}.wasm")))
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("no reducer named {name} in {}", dir.display()))
}

pub mod broker;
pub mod http;

/// What the benchmarks share.
pub mod bench {
    use std::time::Duration;

    /// `full` rounds under `cargo bench` (which passes `--bench`); one smoke round under
    /// `cargo test`.
    pub fn rounds(full: usize) -> usize {
        if std::env::args().any(|a| a == "--bench") { full } else { 1 }
    }

    pub fn median(mut samples: Vec<Duration>) -> Duration {
        samples.sort();
        samples[samples.len() / 2]
    }
}
