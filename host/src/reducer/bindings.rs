//! Host-side bindings of the `statefold:reducer` WIT package (the one copy in `wit/`).
//! The `meter` import is linked by hand in `sandbox` (it needs the store, to reset fuel).

wasmtime::component::bindgen!({
    world: "guest",
    path: "../wit",
});

pub use self::statefold::reducer::types::{ApplyResult, Capabilities, Composed, Diff, DiffContext, Refusal};
