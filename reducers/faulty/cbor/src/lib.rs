//! FAULTY ON PURPOSE, for host tests: a counter that declares `cbor` diffs and states,
//! which the HTTP API does not serve (`unsupported_format`). (It encodes JSON all the same:
//! only the declaration matters here.)

use serde::Serialize;
use serde::de::DeserializeOwned;
use statefold_guest::{Codec, Context, Json, Reducer, Refusal};

pub struct Cbor;

/// JSON, declared as `cbor`.
pub struct Declared;

impl Codec for Declared {
    const NAME: &'static str = "cbor";

    fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        Json::encode(value)
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        Json::decode(bytes)
    }
}

impl Reducer for Cbor {
    const NAME: &'static str = "faulty-cbor";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    type State = i64;
    type Diff = i64;

    fn apply(state: &mut i64, diff: i64, _ctx: &Context) -> Result<(), Refusal> {
        *state = state.checked_add(diff).ok_or_else(|| Refusal::new("would overflow"))?;
        Ok(())
    }
}

statefold_guest::export!(Cbor, Declared);
