//! The `statefold` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use statefold::reducer::{Checkpoints, Limits, MemoryCheckpoints, Runtime, WIT_VERSION};

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
    /// Work with reducer components (.wasm).
    #[command(subcommand)]
    Reducer(ReducerCommand),
}

#[derive(Subcommand)]
enum ReducerCommand {
    /// Load a reducer in the sandbox and print what it declares, or why it cannot be loaded
    /// (not wasm, a core module, wrong world, incompatible version, failing describe).
    /// Also checks that a new model's empty state survives a snapshot/restore round trip.
    Check {
        /// The reducer component, e.g. target/wasm32-wasip2/release/statefold_reducer_counter.wasm
        file: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

/// Sandbox limits of every reducer instance.
#[derive(Args)]
struct LimitArgs {
    /// Linear memory cap of one reducer instance, in bytes.
    #[arg(long, env = "STATEFOLD_REDUCER_MEMORY_BYTES_MAX", default_value_t = Limits::default().memory_bytes_max)]
    reducer_memory_bytes_max: usize,
    /// CPU budget of one diff, in wasmtime fuel (about one unit per wasm instruction).
    #[arg(long, env = "STATEFOLD_REDUCER_DIFF_FUEL_MAX", default_value_t = Limits::default().diff_fuel_max)]
    reducer_diff_fuel_max: u64,
    /// CPU budget of any other reducer call (snapshot, restore, merge, delta), in fuel.
    #[arg(long, env = "STATEFOLD_REDUCER_CALL_FUEL_MAX", default_value_t = Limits::default().call_fuel_max)]
    reducer_call_fuel_max: u64,
    /// Guest heap one instance may hold before cold models are evicted, in bytes.
    #[arg(long, env = "STATEFOLD_REDUCER_RESIDENT_BYTES_MAX", default_value_t = Limits::default().resident_bytes_max)]
    reducer_resident_bytes_max: u64,
    /// Models resident in one instance before cold ones are evicted.
    #[arg(long, env = "STATEFOLD_REDUCER_RESIDENT_MODELS_MAX", default_value_t = Limits::default().resident_models_max)]
    reducer_resident_models_max: usize,
    /// Bytes of a reducer's stderr kept for error messages.
    #[arg(long, env = "STATEFOLD_REDUCER_STDERR_BYTES_MAX", default_value_t = Limits::default().stderr_bytes_max)]
    reducer_stderr_bytes_max: usize,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            memory_bytes_max: self.reducer_memory_bytes_max,
            diff_fuel_max: self.reducer_diff_fuel_max,
            call_fuel_max: self.reducer_call_fuel_max,
            resident_bytes_max: self.reducer_resident_bytes_max,
            resident_models_max: self.reducer_resident_models_max,
            stderr_bytes_max: self.reducer_stderr_bytes_max,
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Reducer(ReducerCommand::Check { file, limits }) => check(&file, limits.limits()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(file: &std::path::Path, limits: Limits) -> anyhow::Result<()> {
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
