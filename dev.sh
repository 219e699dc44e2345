#!/usr/bin/env bash
# Statefold's one entry point for humans and CI. Installs what the build needs (idempotent),
# builds the example reducers to .wasm, then (all three in the release profile: RocksDB,
# librdkafka and wasmtime compile once for the server, the tests and the benchmarks):
#   ./dev.sh test           the whole test suite
#   ./dev.sh run [ARGS...]  the statefold binary (no ARGS: serve the example kinds on the
#                           embedded log, config statefold.toml, http://127.0.0.1:8080)
#   ./dev.sh bench          the benchmarks (print tables; the TypeScript client's too)
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  command -v cargo >/dev/null || { echo "dev.sh: cargo not found; install Rust with rustup" >&2; exit 1; }
  for component in rustfmt clippy; do
    rustup component list --installed | grep -q "^$component" || rustup component add "$component"
  done
  if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
  fi
  # RocksDB and librdkafka are built from source: a C/C++ compiler, make, libclang for
  # the bindings, OpenSSL for Kafka's TLS/SASL; python3-venv for the test tools; curl for the
  # README's commands.
  apt_install libclang-dev g++ make pkg-config libssl-dev python3-venv curl
}

# Installs the Debian packages named that are not installed yet.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
  fi
}

# The TypeScript client (clients/typescript): its dev dependencies (pinned by its lock
# file: TypeScript, jco's transpiler, the WASI shim) and its build, for its conformance
# suite (tests/tests/client_typescript.rs).
build_typescript_client() {
  command -v node >/dev/null || apt_install nodejs npm
  npm_ci clients/typescript
  (cd clients/typescript && npm run --silent build)
}

# `npm ci` in $1 unless its node_modules already holds what its lock file pins.
npm_ci() {
  local lock
  lock="$(sha256sum "$1/package-lock.json")"
  if [ "$(cat "$1/node_modules/.installed" 2>/dev/null)" != "$lock" ]; then
    (cd "$1" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$lock" >"$1/node_modules/.installed"
  fi
}

# The browser tests' tools: Debian's headless Chromium, Node, and playwright-core (pinned in
# tests/browser/package-lock.json; it drives the system Chromium, no browser download).
install_browser_tools() {
  command -v node >/dev/null || apt_install nodejs npm
  apt_install chromium
  npm_ci tests/browser
}

# Test tools, pinned, kept outside the clone (reused between runs).
TOOLS="${STATEFOLD_TOOLS:-$HOME/.cache/statefold/tools}"
TANSU_VERSION=0.6.0
CONFLUENT_KAFKA_VERSION=2.16.1
PROMETHEUS_CLIENT_VERSION=0.26.0
SCHEMATHESIS_VERSION=4.32.5

# The Kafka-compatible broker the tests start (sqlite storage only: the smallest build).
install_tansu() {
  if [ ! -x "$TOOLS/bin/tansu" ]; then
    echo "dev.sh: installing the Tansu broker $TANSU_VERSION for the tests (about 10 minutes on 2 cores)"
    CARGO_TARGET_DIR="$TOOLS/tansu-build" CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
      cargo install tansu --version "$TANSU_VERSION" --locked --no-default-features --features libsql \
      --root "$TOOLS" --quiet
    rm -rf "$TOOLS/tansu-build"
  fi
}

# Python test tools, in one virtualenv: another team's Kafka client (confluent-kafka,
# librdkafka 2.16), the reference Prometheus text parser (prometheus-client) and the
# schema-driven API fuzzer (Schemathesis).
install_python_tools() {
  # (and componentize-py, which builds the Python reducer: pinned by its requirements.txt)
  local stamp
  stamp="confluent-kafka==$CONFLUENT_KAFKA_VERSION prometheus-client==$PROMETHEUS_CLIENT_VERSION schemathesis==$SCHEMATHESIS_VERSION $(cat reducers/totals-py/requirements.txt)"
  if [ "$(cat "$TOOLS/venv/installed" 2>/dev/null)" != "$stamp" ]; then
    [ -x "$TOOLS/venv/bin/python" ] || python3 -m venv "$TOOLS/venv"
    # shellcheck disable=SC2086
    "$TOOLS/venv/bin/pip" install --quiet $stamp
    echo "$stamp" >"$TOOLS/venv/installed"
  fi
}

# Every workspace member but the host's crates and the test crate is a reducer (or the SDK they
# use): the workspace members are the one list of them. `run` builds the examples only;
# `test` adds the faulty and legacy ones.
build_reducers() {
  cargo build --release --target wasm32-wasip2 --workspace --exclude statefold --exclude statefold-core --exclude statefold-runtime \
    --exclude statefold-store --exclude statefold-source --exclude statefold-server --exclude statefold-tests "$@"
}

wasm_dir() {
  echo "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release"
}

# The reducers in JavaScript and Python (the same `totals` as reducers/totals), built by
# their pinned toolchains into the same directory: componentize-js (npm, the reducer's lock
# file) and componentize-py (PyPI, in the tools virtualenv).
build_language_reducers() {
  command -v node >/dev/null || apt_install nodejs npm
  npm_ci reducers/totals-js
  (cd reducers/totals-js && npm run --silent build)
  mv reducers/totals-js/totals_js.wasm "$(wasm_dir)/"
  "$TOOLS/venv/bin/componentize-py" -d wit/reducer.wit -w guest componentize reducer \
    -p reducers/totals-py -p guest-sdk/python -o "$(wasm_dir)/totals_py.wasm" >/dev/null
}

cmd="${1:-}"
shift || true
case "$cmd" in
  test)
    setup
    mkdir -p "$TOOLS"
    # Tansu builds in its own target dir while the workspace builds (both fit the cores'
    # idle moments); the tests wait for it.
    install_tansu >"$TOOLS/install-tansu.log" 2>&1 &
    tansu_pid=$!
    install_python_tools
    install_browser_tools
    build_typescript_client
    build_reducers
    build_language_reducers
    cargo fmt --all --check
    cargo clippy --release --workspace --all-targets -- -D warnings
    # Build the tests while Tansu may still be building, then wait for it.
    cargo test --release --workspace --all-targets --no-run "$@"
    if ! wait "$tansu_pid"; then
      cat "$TOOLS/install-tansu.log" >&2
      echo "dev.sh: installing Tansu failed" >&2
      exit 1
    fi
    export STATEFOLD_TANSU="$TOOLS/bin/tansu" STATEFOLD_PYTHON="$TOOLS/venv/bin/python"
    log="$(mktemp)"
    status=0
    {
      cargo test --release --workspace --all-targets "$@" &&
        cargo test --release --workspace --doc --exclude 'statefold-faulty-*' --exclude 'statefold-legacy-*'
    } 2>&1 | tee "$log" || status=$?
    # One closing line over every test binary (the last one cargo prints is often a
    # crate with no doc tests).
    passed=$(grep -oE '^test result: .* ([0-9]+) passed' "$log" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
    failed=$(grep -oE '^test result: .* ([0-9]+) failed' "$log" | grep -oE '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
    rm -f "$log"
    echo
    echo "dev.sh test took ${SECONDS}s"
    echo "tests: $passed passed, $failed failed"
    exit "$status"
    ;;
  run)
    setup
    build_reducers --exclude 'statefold-faulty-*' --exclude 'statefold-legacy-*'
    cargo build --release -p statefold
    bin="${CARGO_TARGET_DIR:-target}/release/statefold"
    if [ $# -eq 0 ]; then
      exec "$bin" serve --config statefold.toml --reducers-dir "$(wasm_dir)"
    else
      exec "$bin" "$@"
    fi
    ;;
  bench)
    setup
    mkdir -p "$TOOLS"
    install_python_tools
    build_reducers
    build_language_reducers
    cargo bench -p statefold-tests --bench reducer --bench deploy --bench suite "$@"
    # The TypeScript client's folding cost in Node (its own table).
    build_typescript_client
    (cd clients/typescript && STATEFOLD_REDUCERS="$(cd "$(wasm_dir)" && pwd)" npm run --silent bench)
    ;;
  *)
    echo "usage: ./dev.sh test|run [ARGS...]|bench" >&2
    exit 2
    ;;
esac
