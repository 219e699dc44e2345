//! FOR HOST TESTS: on the diff `"probe"`, records in its state what the sandbox lets a
//! reducer see: environment, arguments, files, network, clocks, randomness. The host test
//! asserts that all of it is empty, refused, or fixed.

use std::collections::BTreeMap;
use std::hash::BuildHasher;

use statefold_guest::{Context, Reducer, Refusal};

pub struct Probe;

fn outcome<T: std::fmt::Debug, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(v) => format!("ok: {v:?}"),
        Err(e) => format!("error: {e}"),
    }
}

impl Reducer for Probe {
    const NAME: &'static str = "faulty-probe";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    type State = BTreeMap<String, String>;
    type Diff = String;

    fn apply(state: &mut Self::State, diff: String, _ctx: &Context) -> Result<(), Refusal> {
        if diff != "probe" {
            return Err(Refusal::new("only \"probe\""));
        }
        let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        let started = std::time::Instant::now();
        let facts = [
            ("env", format!("{:?}", std::env::vars().collect::<Vec<_>>())),
            ("args", format!("{:?}", std::env::args().collect::<Vec<_>>())),
            ("read_dir /", outcome(std::fs::read_dir("/").map(|d| d.count()))),
            ("read /etc/passwd", outcome(std::fs::read("/etc/passwd").map(|b| b.len()))),
            ("write /tmp/x", outcome(std::fs::write("/tmp/x", b"x"))),
            ("tcp connect", outcome(std::net::TcpStream::connect("127.0.0.1:22").map(|_| ()))),
            ("wall clock", format!("{:?}", since_epoch.map(|d| d.as_nanos()))),
            ("monotonic elapsed", format!("{:?}", started.elapsed())),
            ("hash seed", format!("{}", std::collections::hash_map::RandomState::new().hash_one(42u64))),
        ];
        for (k, v) in facts {
            state.insert(k.to_owned(), v);
        }
        Ok(())
    }
}

statefold_guest::export!(Probe);
