//! Shared setup for Statefold's integration tests and benchmarks: builds the real `.wasm`
//! reducers from `reducers/` (once per process; cargo makes concurrent builds wait for
//! each other).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace")
}

/// Every `.rs` file under `dir`, at any depth, in path order (the architecture and size
/// tests read the host's source with it).
pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Where cargo builds (`CARGO_TARGET_DIR`, else the workspace's `target/`).
pub fn target_dir() -> PathBuf {
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

/// Path of the built `.wasm` of reducer `name`: `NAME.wasm` from crate
/// `statefold-reducer-NAME` (an example, whose library is named after the reducer) or
/// `statefold_faulty_NAME.wasm` or `statefold_legacy_NAME.wasm` (test-only). Every reducer in the workspace is built the
/// first time; the workspace members are the one list of them.
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
            // Every member but the host's crates and this one (as dev.sh's build_reducers).
            "--exclude",
            "statefold",
            "--exclude",
            "statefold-core",
            "--exclude",
            "statefold-runtime",
            "--exclude",
            "statefold-store",
            "--exclude",
            "statefold-source",
            "--exclude",
            "statefold-server",
            "--exclude",
            "statefold-tests",
        ])
    });
    let dir = target_dir().join("wasm32-wasip2/release");
    ["", "statefold_faulty_", "statefold_legacy_"]
        .iter()
        .map(|prefix| dir.join(format!("{prefix}{name}.wasm")))
        .find(|path| path.exists())
        .unwrap_or_else(|| {
            panic!(
                "no reducer named {name} in {} (the JavaScript and Python ones, totals_js and totals_py, are built by ./dev.sh test)",
                dir.display()
            )
        })
}

/// Path of the `statefold` binary, built first in the profile this test or benchmark
/// was built in (release under `./dev.sh test` and `cargo bench`: one build of the
/// dependencies serves the server, the tests and the benchmarks).
pub fn statefold_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // A test or bench executable lives in `<target>/<profile>/deps/`.
            let exe = std::env::current_exe().expect("the test executable's path");
            let profile_dir = exe.parent().and_then(Path::parent).expect("<target>/<profile>/deps/<exe>");
            let release = profile_dir.file_name().is_some_and(|name| name == "release");
            let mut args = vec!["build", "--quiet", "-p", "statefold", "--bin", "statefold"];
            if release {
                args.push("--release");
            }
            cargo(&args);
            profile_dir.join("statefold")
        })
        .clone()
}

pub mod broker;
pub mod http;
pub mod process;

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

    /// Reducer crate `R` compiled into the host, standing in for its `.wasm` (`module`):
    /// the baseline that measures what the sandbox costs in the whole pipeline.
    pub fn native<R: statefold_guest::Reducer>(module: &std::path::Path) -> statefold::reducer::Natives
    where
        R::State: Send,
    {
        let bytes = std::fs::read(module).expect("the reducer's .wasm");
        let native: Arc<dyn Native> = Arc::new(NativeReducer::<R>(PhantomData));
        [(ModuleHash::of(&bytes), native)].into_iter().collect()
    }

    use std::marker::PhantomData;
    use std::sync::Arc;

    use statefold::model::{ModuleHash, Reaction};
    use statefold::reducer::{Composed, Native, NativeModel};
    use statefold_guest::native::{self, Model};
    use statefold_guest::{Compose, Json};

    struct NativeReducer<R>(PhantomData<fn() -> R>);

    impl<R: statefold_guest::Reducer> Native for NativeReducer<R>
    where
        R::State: Send,
    {
        fn create(&self, model: &str, snapshot: Option<&[u8]>) -> Result<Box<dyn NativeModel>, String> {
            let model = match snapshot {
                Some(snapshot) => Model::<R>::restore(model, snapshot)?,
                None => Model::<R>::new(model),
            };
            Ok(Box::new(NativeOne(model)))
        }

        fn merge(&self, diffs: &[Vec<u8>]) -> Result<Composed, String> {
            Ok(match native::merge::<R, Json>(diffs)? {
                Compose::Composed(d) => Composed::Diff(d),
                Compose::NotComposable(reason) => Composed::NotComposable(reason),
            })
        }

        fn delta(&self, from: &[u8], to: &[u8]) -> Result<Vec<u8>, String> {
            native::delta::<R, Json>(from, to)
        }
    }

    struct NativeOne<R: statefold_guest::Reducer>(Model<R>);

    impl<R: statefold_guest::Reducer> NativeModel for NativeOne<R>
    where
        R::State: Send,
    {
        fn apply(&mut self, payload: &[u8], offset: u64, prev_hash: &[u8]) -> Result<Vec<Reaction>, String> {
            let emitted = self.0.apply_emitting(payload, offset, prev_hash)?;
            Ok(emitted
                .into_iter()
                .map(|r| Reaction { topic: r.topic, key: r.key, value: r.value, headers: r.headers })
                .collect())
        }

        fn snapshot(&self) -> Vec<u8> {
            self.0.snapshot()
        }
    }
}
