//! `statefold new`: a reducer project that builds as it is: the SDK, a sample reducer with
//! merge and delta, its cases and its own test commands. Rust only so far.

use std::path::{Path, PathBuf};

const CARGO_TOML: &str = include_str!("scaffold/rust/Cargo.toml.txt");
const LIB_RS: &str = include_str!("scaffold/rust/lib.rs.txt");
const CASES: &str = include_str!("scaffold/rust/cases.jsonl");
const README: &str = include_str!("scaffold/rust/README.md.txt");
const GITIGNORE: &str = include_str!("scaffold/rust/gitignore.txt");

/// The guest SDK of the source tree this binary was built from, if it is still there.
pub fn default_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk");
    sdk.join("Cargo.toml").is_file().then(|| sdk.canonicalize().unwrap_or(sdk))
}

/// Checks a reducer name: it names the library, the `.wasm` file and the reducer.
pub fn validate_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !first || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') || name.len() > 64 {
        return Err(format!(
            "{name:?}: a reducer's name is 1 to 64 of a-z 0-9 _, starting with a letter (it names its .wasm file)"
        ));
    }
    Ok(())
}

/// The files of a new Rust reducer project `name`, depending on the SDK at `sdk`.
pub fn rust(name: &str, sdk: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    validate_name(name)?;
    let sdk = sdk.display().to_string().replace('\\', "/");
    let fill = |template: &str| template.replace("{{name}}", name).replace("{{sdk}}", &sdk);
    Ok(vec![
        ("Cargo.toml".into(), fill(CARGO_TOML)),
        ("src/lib.rs".into(), fill(LIB_RS)),
        ("cases.jsonl".into(), CASES.to_owned()),
        ("README.md".into(), fill(README)),
        (".gitignore".into(), GITIGNORE.to_owned()),
    ])
}

/// Writes the project into `dir`, which must not exist or be empty.
pub fn create(dir: &Path, files: &[(PathBuf, String)]) -> Result<(), String> {
    if dir.read_dir().is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(format!("{} exists and is not empty", dir.display()));
    }
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}
