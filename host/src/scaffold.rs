//! `statefold new`: a reducer project that builds as it is: a sample reducer with merge and
//! delta (totals by key), its cases and its own build and test commands, in Rust (the guest
//! SDK), JavaScript (componentize-js) or Python (componentize-py).
//!
//! The sample is the repository's own `reducers/totals*` (built and tested with the rest),
//! renamed: one source for the example and the template.

use std::path::{Path, PathBuf};

/// The contract, for the JavaScript and Python builds (Rust's comes with the SDK).
const WIT: &str = include_str!("../../wit/reducer.wit");
const CASES: &str = include_str!("../../reducers/totals/cases.jsonl");

mod rust {
    pub const CARGO_TOML: &str = include_str!("scaffold/rust/Cargo.toml.txt");
    pub const LIB_RS: &str = include_str!("../../reducers/totals/src/lib.rs");
    pub const README: &str = include_str!("scaffold/rust/README.md.txt");
    pub const GITIGNORE: &str = "target/\n";
}

mod js {
    pub const PACKAGE: &str = include_str!("../../reducers/totals-js/package.json");
    pub const REDUCER: &str = include_str!("../../reducers/totals-js/src/reducer.js");
    pub const SDK: &str = include_str!("../../guest-sdk/js/statefold.js");
    pub const README: &str = include_str!("scaffold/js/README.md.txt");
    pub const GITIGNORE: &str = include_str!("../../reducers/totals-js/.gitignore");
}

mod python {
    pub const REDUCER: &str = include_str!("../../reducers/totals-py/reducer.py");
    pub const SDK: &str = include_str!("../../guest-sdk/python/statefold.py");
    pub const REQUIREMENTS: &str = include_str!("../../reducers/totals-py/requirements.txt");
    pub const README: &str = include_str!("scaffold/python/README.md.txt");
    pub const GITIGNORE: &str = include_str!("../../reducers/totals-py/.gitignore");
}

/// Why a project cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error("{0:?}: a reducer's name is 1 to 64 of a-z 0-9 _, starting with a letter (it names its .wasm file)")]
    InvalidName(String),
    #[error("{0} exists and is not empty")]
    NotEmpty(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// The languages `statefold new` writes.
pub const LANGUAGES: [&str; 3] = ["rust", "js", "python"];

/// The guest SDK of the source tree this binary was built from, if it is still there.
pub fn default_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk/rust");
    sdk.join("Cargo.toml").is_file().then(|| sdk.canonicalize().unwrap_or(sdk))
}

/// Checks a reducer name: it names the library, the `.wasm` file and the reducer.
pub fn validate_name(name: &str) -> Result<(), ScaffoldError> {
    let mut chars = name.chars();
    let first = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !first || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') || name.len() > 64 {
        return Err(ScaffoldError::InvalidName(name.to_owned()));
    }
    Ok(())
}

/// `text` with `from` replaced by `to`, which must occur: a template that lost the text it
/// is renamed by is a bug here, not a project that builds under the wrong name.
fn renamed(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the template has no {from:?}");
    text.replace(from, to)
}

/// The files of a new Rust reducer project `name`, depending on the SDK at `sdk`.
pub fn rust(name: &str, sdk: &Path) -> Result<Vec<(PathBuf, String)>, ScaffoldError> {
    validate_name(name)?;
    let sdk = sdk.display().to_string().replace('\\', "/");
    let fill = |template: &str| template.replace("{{name}}", name).replace("{{sdk}}", &sdk);
    let lib = renamed(rust::LIB_RS, "\"totals\"", &format!("\"{name}\""));
    let lib = renamed(&lib, "//! `totals`:", &format!("//! `{name}`:"));
    Ok(vec![
        ("Cargo.toml".into(), fill(rust::CARGO_TOML)),
        ("src/lib.rs".into(), lib),
        ("cases.jsonl".into(), CASES.to_owned()),
        ("README.md".into(), fill(rust::README)),
        (".gitignore".into(), rust::GITIGNORE.to_owned()),
    ])
}

/// The files of a new JavaScript reducer project `name` (built by componentize-js).
pub fn js(name: &str) -> Result<Vec<(PathBuf, String)>, ScaffoldError> {
    validate_name(name)?;
    let package = renamed(js::PACKAGE, "\"totals-js\"", &format!("\"{}\"", name.replace('_', "-")));
    // The sample copies the SDK in from guest-sdk/js when it builds (componentize-js reads no
    // file outside the project); a new project holds its own copy.
    let package = renamed(&package, "\n    \"prebuild\": \"cp ../../guest-sdk/js/statefold.js src/statefold.js\",", "");
    let package = renamed(&package, "../../wit/reducer.wit", "wit/reducer.wit");
    let package = renamed(&package, "totals_js.wasm", &format!("{name}.wasm"));
    let reducer = renamed(js::REDUCER, "'totals_js'", &format!("'{name}'"));
    let reducer = renamed(&reducer, "// totals_js:", &format!("// {name}:"));
    Ok(vec![
        ("package.json".into(), package),
        ("src/reducer.js".into(), reducer),
        ("src/statefold.js".into(), js::SDK.to_owned()),
        ("wit/reducer.wit".into(), WIT.to_owned()),
        ("cases.jsonl".into(), CASES.to_owned()),
        ("README.md".into(), js::README.replace("{{name}}", name)),
        (".gitignore".into(), renamed(js::GITIGNORE, "src/statefold.js\n", "")),
    ])
}

/// The files of a new Python reducer project `name` (built by componentize-py).
pub fn python(name: &str) -> Result<Vec<(PathBuf, String)>, ScaffoldError> {
    validate_name(name)?;
    let reducer = renamed(python::REDUCER, "\"totals_py\"", &format!("\"{name}\""));
    let reducer = renamed(&reducer, "\"\"\"totals_py:", &format!("\"\"\"{name}:"));
    Ok(vec![
        ("reducer.py".into(), reducer),
        ("statefold.py".into(), python::SDK.to_owned()),
        ("requirements.txt".into(), python::REQUIREMENTS.to_owned()),
        ("wit/reducer.wit".into(), WIT.to_owned()),
        ("cases.jsonl".into(), CASES.to_owned()),
        ("README.md".into(), python::README.replace("{{name}}", name)),
        (".gitignore".into(), python::GITIGNORE.to_owned()),
    ])
}

/// Writes the project into `dir`, which must not exist or be empty.
pub fn create(dir: &Path, files: &[(PathBuf, String)]) -> Result<(), ScaffoldError> {
    if dir.read_dir().is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(ScaffoldError::NotEmpty(dir.to_owned()));
    }
    for (path, text) in files {
        let path = dir.join(path);
        let write = |path: &Path, source| ScaffoldError::Write { path: path.to_owned(), source };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| write(parent, e))?;
        }
        std::fs::write(&path, text).map_err(|e| write(&path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn every_language_names_the_reducer_after_the_project() {
        let rust = super::rust("tally", Path::new("/sdk")).unwrap();
        let js = super::js("tally").unwrap();
        let python = super::python("tally").unwrap();
        let file = |files: &[(std::path::PathBuf, String)], path: &str| {
            files.iter().find(|(p, _)| p == Path::new(path)).unwrap().1.clone()
        };
        assert!(file(&rust, "src/lib.rs").contains("const NAME: &'static str = \"tally\";"));
        assert!(file(&rust, "Cargo.toml").contains("name = \"tally\""));
        assert!(file(&js, "src/reducer.js").contains("name: 'tally',"));
        assert!(file(&js, "package.json").contains("--out tally.wasm"));
        assert!(file(&python, "reducer.py").contains("name = \"tally\""));
        for files in [&js, &python] {
            assert!(file(files, "wit/reducer.wit").contains("world guest"));
        }
        assert!(super::js("Tally").is_err());
    }
}
