//! The `statefold` binary, as a user runs it, on a real reducer built from `reducers/`.

#[test]
fn cli_check_prints_what_a_reducer_declares() {
    let bin = env!("CARGO_BIN_EXE_statefold");
    let out = std::process::Command::new(bin)
        .args(["reducer", "check"])
        .arg(statefold_tests::wasm("document"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for line in [
        "reducer:       document 0.1.0",
        "contract:      statefold:reducer@0.1.0",
        "capabilities:  merge, delta",
        "empty state:   {} (round-trips)",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }

    let core = std::env::temp_dir().join(format!("statefold-core-{}.wasm", std::process::id()));
    std::fs::write(&core, wat::parse_str("(module)").unwrap()).unwrap();
    let out = std::process::Command::new(bin).args(["reducer", "check"]).arg(&core).output().unwrap();
    std::fs::remove_file(&core).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("a core WebAssembly module, not a component"), "{stderr}");
}
