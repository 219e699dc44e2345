//! Shared setup for Statefold's integration tests and benchmarks: builds the real `.wasm`
//! reducers from `reducers/` (once per process; cargo makes concurrent builds wait for
//! each other).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Every reducer crate the tests use, by short name.
pub const REDUCERS: &[(&str, &str)] = &[
    ("counter", "statefold-reducer-counter"),
    ("document", "statefold-reducer-document"),
    ("workflow", "statefold-reducer-workflow"),
    ("trap", "statefold-faulty-trap"),
    ("spin", "statefold-faulty-spin"),
    ("bomb", "statefold-faulty-bomb"),
    ("garbage", "statefold-faulty-garbage"),
    ("probe", "statefold-faulty-probe"),
];

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

/// Path of the built `.wasm` of reducer `name` (see [`REDUCERS`]).
pub fn wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut args = vec!["build", "--quiet", "--release", "--target", "wasm32-wasip2"];
        for (_, package) in REDUCERS {
            args.extend(["-p", package]);
        }
        cargo(&args);
    });
    let package =
        REDUCERS.iter().find(|(short, _)| *short == name).unwrap_or_else(|| panic!("no reducer named {name}")).1;
    target_dir().join("wasm32-wasip2/release").join(format!("{}.wasm", package.replace('-', "_")))
}
