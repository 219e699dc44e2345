//! FAULTY ON PURPOSE, for host tests. Loops forever on the diff `"spin"`: only the host's CPU budget stops it.
//! Sleeps for an hour on `"sleep"`: the host must not wait for it.
//! Burns a bounded amount of CPU on `"burn"` (about 0.5 million units of fuel), then adds one.
//! Otherwise a counter: `"inc"` adds one; anything else is refused.

use statefold_guest::{Context, Reducer, Refusal};

pub struct Faulty;

impl Reducer for Faulty {
    const NAME: &'static str = "faulty-spin";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    type State = i64;
    type Diff = String;

    fn apply(state: &mut i64, diff: String, _ctx: &Context) -> Result<(), Refusal> {
        match diff.as_str() {
            "inc" => {
                *state += 1;
                Ok(())
            }
            "spin" => {
                let mut n = 0u64;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "burn" => {
                let mut n = 0u64;
                for _ in 0..100_000 {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
                *state += 1;
                Ok(())
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(())
            }
            other => Err(Refusal::new(format!("unknown diff {other:?}"))),
        }
    }
}

statefold_guest::export!(Faulty);
