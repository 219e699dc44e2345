//! Write [Statefold](https://example.invalid/statefold) reducers in plain Rust.
//!
//! A reducer folds diffs (edits) into the state of a model. You write a serde state type,
//! a serde diff type, [`Reducer::apply`], optionally [`Reducer::merge`] and
//! [`Reducer::delta`], and one [`export!`] line. Nothing about the WebAssembly ABI, memory
//! or WIT shows up in your code.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use statefold_guest::{Compose, Context, Reducer, Refusal};
//!
//! /// A counter that can go up and down.
//! pub struct Counter;
//!
//! #[derive(Serialize, Deserialize)]
//! #[serde(rename_all = "snake_case")]
//! pub enum Diff {
//!     Add(i64),
//!     Sub(i64),
//! }
//!
//! impl Reducer for Counter {
//!     const NAME: &'static str = "counter";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     const MERGE: bool = true;
//!
//!     type State = i64;
//!     type Diff = Diff;
//!
//!     fn apply(state: &mut i64, diff: Diff, _ctx: &Context) -> Result<(), Refusal> {
//!         let next = match diff {
//!             Diff::Add(n) => state.checked_add(n),
//!             Diff::Sub(n) => state.checked_sub(n),
//!         };
//!         // Validate first, mutate last: a refusal must leave the state untouched.
//!         *state = next.ok_or_else(|| Refusal::new("counter would overflow"))?;
//!         Ok(())
//!     }
//!
//!     fn merge(diffs: Vec<Diff>) -> Compose<Diff> {
//!         let total: i128 = diffs.iter().map(|d| match d {
//!             Diff::Add(n) => i128::from(*n),
//!             Diff::Sub(n) => -i128::from(*n),
//!         }).sum();
//!         match i64::try_from(total) {
//!             Ok(n) => Compose::Composed(Diff::Add(n)),
//!             Err(_) => Compose::NotComposable("sum does not fit in one diff".into()),
//!         }
//!     }
//! }
//!
//! statefold_guest::export!(Counter);
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release` (crate type `cdylib`) and
//! check it with `statefold reducer check target/wasm32-wasip2/release/<crate_name>.wasm`.
//!
//! # The contract
//!
//! - **Refusals leave the state untouched.** When `apply` returns `Err`, the state must be
//!   exactly what it was before the call: validate first, mutate last. The host does not
//!   copy the state before each diff; that is what keeps per-diff cost independent of state
//!   size.
//! - **Determinism.** `apply` must depend only on the state, the diff and the [`Context`].
//!   The sandbox has no clock, randomness, filesystem or network that could break this
//!   (clocks and randomness are fixed stubs).
//! - **Merge law.** If [`Reducer::merge`] returns `Composed(d)`, then applying `d` to any
//!   state from which all the merged diffs apply must give the same state as applying them
//!   one by one. Where that cannot be guaranteed, return `NotComposable` with a reason.
//! - **Delta law.** If [`Reducer::delta`] returns `Ok(d)`, applying `d` to `from` must
//!   give `to`.
//!
//! Diffs and states are JSON by default; pass a [`Codec`] to [`export!`] for another
//! encoding: `statefold_guest::export!(MyReducer, MyCodec);`.

use std::marker::PhantomData;

// The generated bindings name this crate by its path, from inside and outside it alike.
extern crate self as statefold_guest;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use serde;
pub use serde_json;

pub mod merge_patch;

/// A reducer: folds diffs into one model's state.
pub trait Reducer: 'static {
    /// Reducer name, as shown by `statefold reducer check`.
    const NAME: &'static str;
    /// The reducer's own version.
    const VERSION: &'static str;
    /// Set to `true` when [`Reducer::merge`] is implemented.
    const MERGE: bool = false;
    /// Set to `true` when [`Reducer::delta`] is implemented.
    const DELTA: bool = false;

    /// One model's state. `Default` is the state of a new model.
    type State: Serialize + DeserializeOwned + Default + 'static;
    /// One edit to a model.
    type Diff: Serialize + DeserializeOwned;

    /// Apply `diff` to `state`. On `Err`, `state` must be left exactly as it was.
    fn apply(state: &mut Self::State, diff: Self::Diff, ctx: &Context) -> Result<(), Refusal>;

    /// Compose consecutive diffs into one (see the merge law in the crate docs). Called with
    /// at least two diffs, only when [`Reducer::MERGE`] is `true`.
    fn merge(diffs: Vec<Self::Diff>) -> Compose<Self::Diff> {
        let _ = diffs;
        Compose::NotComposable(format!("{} does not compose diffs", Self::NAME))
    }

    /// The diff that takes `from` to `to`. Called only when [`Reducer::DELTA`] is `true`.
    fn delta(from: &Self::State, to: &Self::State) -> Result<Self::Diff, String> {
        let _ = (from, to);
        Err(format!("{} does not compute deltas", Self::NAME))
    }
}

/// What the log says about the diff being applied. All of it is deterministic: every
/// replica, and every replay, passes the same context.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The model's id (the Kafka record key).
    pub model: &'a str,
    /// Offset of the diff in its log.
    pub offset: u64,
    /// Record timestamp in milliseconds since the Unix epoch, if the log had one.
    pub timestamp_ms: Option<i64>,
    /// Record headers, in log order.
    pub headers: &'a [(String, Vec<u8>)],
    /// The model's hash before this diff (32 bytes).
    pub prev_hash: &'a [u8],
}

impl Context<'_> {
    /// Emits a record to `topic` with `key` and `value` encoded as JSON, as a consequence of
    /// this diff: a **reaction**. The host commits it with the diff and relays it to the
    /// topic after, exactly once, in the order emitted (see [`Reaction`]).
    ///
    /// ```
    /// # use statefold_guest::Context;
    /// fn finished(ctx: &Context, total: u64) {
    ///     ctx.emit("runs-finished", ctx.model, &serde_json::json!({ "run": ctx.model, "total": total }));
    /// }
    /// ```
    pub fn emit(&self, topic: &str, key: &str, value: &impl Serialize) {
        let value = serde_json::to_vec(value).expect("a reaction's value must serialize to JSON");
        self.emit_record(Reaction { topic: topic.to_owned(), key: key.to_owned(), value, headers: Vec::new() });
    }

    /// Emits a reaction given as bytes, with headers of its own.
    pub fn emit_record(&self, reaction: Reaction) {
        __private::emit(reaction);
    }
}

/// A record a reducer emits while applying a diff, for another topic: a reaction.
///
/// - Committed with the diff, relayed after: a downstream consumer reading committed records
///   sees each once, in the order the model's diffs emitted them. The relay adds the headers
///   `statefold-reaction-id` (`KIND/SEQ/INDEX/ID`: the model, the diff's place in its chain,
///   the reaction's place among the diff's), `statefold-kind` and `statefold-model`.
/// - A diff that is refused (or fails) emits nothing, even what it emitted before refusing.
/// - Applying a diff again (rebuilding a model, a replay) emits nothing: a reaction follows
///   from the first fold of its diff.
/// - The host's limits: `reactions_per_diff_max` per diff, `reaction_bytes_max` each; past
///   them, and for an invalid topic name or a header named `statefold-*`, the diff fails.
/// - Where the topic is another kind's, that kind folds the reaction as a diff to model
///   `key`: reducers can drive each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaction {
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Why a reducer will not apply a diff. Reported to whoever sent the diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(String);

impl Refusal {
    pub fn new(reason: impl Into<String>) -> Self {
        Refusal(reason.into())
    }

    pub fn reason(&self) -> &str {
        &self.0
    }
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Refusal(reason)
    }
}

impl From<&str> for Refusal {
    fn from(reason: &str) -> Self {
        Refusal(reason.to_owned())
    }
}

/// Outcome of [`Reducer::merge`].
#[derive(Debug, Clone, PartialEq)]
pub enum Compose<D> {
    /// One diff equivalent to the run.
    Composed(D),
    /// The run cannot be composed exactly; the reason says why.
    NotComposable(String),
}

/// Encoding of diffs and states. [`Json`] unless [`export!`] is given another.
pub trait Codec: 'static {
    /// Format name reported to the host, e.g. `"json"`.
    const NAME: &'static str;
    fn encode<T: Serialize>(value: &T) -> Vec<u8>;
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String>;
}

/// JSON, the default encoding.
pub struct Json;

impl Codec for Json {
    const NAME: &'static str = "json";

    fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        // serde_json only fails on non-string map keys or a failing Serialize impl; both
        // are bugs in the reducer's types, which must surface loudly (a trap).
        serde_json::to_vec(value).expect("state or diff type must serialize to JSON")
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// The reducer logic run natively, through exactly the code paths the WebAssembly export
/// uses (decode, apply, encode). For benchmarks and tests of reducer crates.
pub mod native {
    use super::*;

    /// One model, natively.
    pub struct Model<R: Reducer, C: Codec = Json> {
        id: String,
        state: R::State,
        codec: PhantomData<C>,
    }

    impl<R: Reducer, C: Codec> Model<R, C> {
        pub fn new(id: impl Into<String>) -> Self {
            Model { id: id.into(), state: R::State::default(), codec: PhantomData }
        }

        pub fn restore(id: impl Into<String>, snapshot: &[u8]) -> Result<Self, String> {
            Ok(Model { id: id.into(), state: C::decode(snapshot)?, codec: PhantomData })
        }

        /// Apply one encoded diff; `Err` is the refusal reason.
        pub fn apply(&mut self, payload: &[u8], offset: u64, prev_hash: &[u8]) -> Result<(), String> {
            self.apply_emitting(payload, offset, prev_hash).map(drop)
        }

        /// [`Model::apply`], returning the reactions the diff emitted (none when refused).
        pub fn apply_emitting(
            &mut self,
            payload: &[u8],
            offset: u64,
            prev_hash: &[u8],
        ) -> Result<Vec<Reaction>, String> {
            let ctx = Context { model: &self.id, offset, timestamp_ms: None, headers: &[], prev_hash };
            crate::__private::EMITTED.with(|emitted| emitted.borrow_mut().clear());
            let result = crate::__private::apply_one::<R, C>(&mut self.state, payload, &ctx);
            let emitted = crate::__private::EMITTED.with(|emitted| std::mem::take(&mut *emitted.borrow_mut()));
            result.map(|()| emitted)
        }

        pub fn snapshot(&self) -> Vec<u8> {
            C::encode(&self.state)
        }

        pub fn state(&self) -> &R::State {
            &self.state
        }
    }

    /// The export `merge`, natively: encoded diffs composed into one, if `R` can.
    pub fn merge<R: Reducer, C: Codec>(diffs: &[Vec<u8>]) -> Result<Compose<Vec<u8>>, String> {
        crate::__private::merge_encoded::<R, C>(diffs)
    }

    /// The export `delta`, natively.
    pub fn delta<R: Reducer, C: Codec>(from: &[u8], to: &[u8]) -> Result<Vec<u8>, String> {
        crate::__private::delta_encoded::<R, C>(from, to)
    }
}

#[doc(hidden)]
pub mod __private {
    //! Glue between the generated bindings and [`Reducer`]. Not part of the API.
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    wit_bindgen::generate!({
        world: "guest",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_reducer",
        default_bindings_module: "statefold_guest::__private",
        runtime_path: "statefold_guest::__private::wit_bindgen_rt",
    });

    pub use wit_bindgen::rt as wit_bindgen_rt;

    use exports::statefold::reducer::reducer::{ApplyResult, Composed, Diff, Guest, GuestModel, Info, Model};
    use statefold::reducer::types::{Capabilities, Refusal as WitRefusal};

    thread_local! {
        /// Natively (tests, benchmarks), what `Context::emit` emitted during one apply.
        pub(crate) static EMITTED: RefCell<Vec<Reaction>> = const { RefCell::new(Vec::new()) };
    }

    /// `Context::emit`: the host's `reactions.emit` in WebAssembly, a buffer natively.
    pub(crate) fn emit(reaction: Reaction) {
        #[cfg(target_family = "wasm")]
        {
            let Reaction { topic, key, value, headers } = reaction;
            statefold::reducer::reactions::emit(&statefold::reducer::reactions::Reaction {
                topic,
                key,
                value,
                headers,
            });
        }
        #[cfg(not(target_family = "wasm"))]
        EMITTED.with(|emitted| emitted.borrow_mut().push(reaction));
    }

    /// Decode and apply one diff; `Err` is the refusal reason.
    pub fn apply_one<R: Reducer, C: Codec>(state: &mut R::State, payload: &[u8], ctx: &Context) -> Result<(), String> {
        let diff: R::Diff = C::decode(payload).map_err(|e| format!("malformed diff: {e}"))?;
        R::apply(state, diff, ctx).map_err(|r| r.0)
    }

    /// Compose encoded diffs (`Err`: one is malformed). One diff is its own composition.
    pub fn merge_encoded<R: Reducer, C: Codec>(diffs: &[Vec<u8>]) -> Result<Compose<Vec<u8>>, String> {
        if let [only] = diffs {
            return Ok(Compose::Composed(only.clone()));
        }
        let decoded = diffs
            .iter()
            .enumerate()
            .map(|(i, d)| C::decode::<R::Diff>(d).map_err(|e| format!("malformed diff at index {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(match R::merge(decoded) {
            Compose::Composed(d) => Compose::Composed(C::encode(&d)),
            Compose::NotComposable(reason) => Compose::NotComposable(reason),
        })
    }

    /// The encoded diff between two encoded states.
    pub fn delta_encoded<R: Reducer, C: Codec>(from: &[u8], to: &[u8]) -> Result<Vec<u8>, String> {
        let from: R::State = C::decode(from).map_err(|e| format!("malformed `from` state: {e}"))?;
        let to: R::State = C::decode(to).map_err(|e| format!("malformed `to` state: {e}"))?;
        R::delta(&from, &to).map(|d| C::encode(&d))
    }

    /// The exported component, for reducer `R` with codec `C`.
    pub struct Adapter<R, C>(PhantomData<(R, C)>);

    /// A model resident in the guest.
    pub struct ModelRep<R: Reducer, C> {
        id: String,
        state: RefCell<R::State>,
        codec: PhantomData<C>,
    }

    impl<R: Reducer, C: Codec> Guest for Adapter<R, C> {
        type Model = ModelRep<R, C>;

        fn describe() -> Info {
            let mut capabilities = Capabilities::empty();
            if R::MERGE {
                capabilities |= Capabilities::MERGE;
            }
            if R::DELTA {
                capabilities |= Capabilities::DELTA;
            }
            Info {
                name: R::NAME.to_owned(),
                version: R::VERSION.to_owned(),
                diff_format: C::NAME.to_owned(),
                state_format: C::NAME.to_owned(),
                capabilities,
            }
        }

        fn merge(diffs: Vec<Vec<u8>>) -> Result<Composed, String> {
            Ok(match merge_encoded::<R, C>(&diffs)? {
                Compose::Composed(d) => Composed::Diff(d),
                Compose::NotComposable(reason) => Composed::NotComposable(reason),
            })
        }

        fn delta(from: Vec<u8>, to: Vec<u8>) -> Result<Vec<u8>, String> {
            delta_encoded::<R, C>(&from, &to)
        }

        fn heap_bytes() -> u64 {
            LIVE_BYTES.load(Ordering::Relaxed) as u64
        }
    }

    impl<R: Reducer, C: Codec> GuestModel for ModelRep<R, C> {
        fn new(id: String) -> Self {
            ModelRep { id, state: RefCell::new(R::State::default()), codec: PhantomData }
        }

        fn restore(id: String, snapshot: Vec<u8>) -> Result<Model, String> {
            let state = C::decode(&snapshot).map_err(|e| format!("malformed snapshot: {e}"))?;
            Ok(Model::new(ModelRep::<R, C> { id, state: RefCell::new(state), codec: PhantomData }))
        }

        fn apply(&self, diffs: Vec<Diff>) -> ApplyResult {
            let mut state = self.state.borrow_mut();
            for (index, diff) in diffs.iter().enumerate() {
                statefold::reducer::meter::start_diff();
                let ctx = Context {
                    model: &self.id,
                    offset: diff.context.offset,
                    timestamp_ms: diff.context.timestamp_ms,
                    headers: &diff.context.headers,
                    prev_hash: &diff.context.prev_hash,
                };
                if let Err(reason) = apply_one::<R, C>(&mut state, &diff.payload, &ctx) {
                    return ApplyResult {
                        applied: index as u32,
                        refusal: Some(WitRefusal { index: index as u32, reason }),
                    };
                }
            }
            ApplyResult { applied: diffs.len() as u32, refusal: None }
        }

        fn snapshot(&self) -> Vec<u8> {
            C::encode(&*self.state.borrow())
        }
    }

    static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

    /// The system allocator, counting live bytes for `heap-bytes`.
    pub struct CountingAlloc;

    // SAFETY: forwards to `System` unchanged; only adds bookkeeping.
    unsafe impl GlobalAlloc for CountingAlloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            }
            p
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) };
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
                LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            }
            p
        }
    }
}

/// Export a [`Reducer`] as the component's `statefold:reducer` implementation.
///
/// `export!(MyReducer)` uses JSON; `export!(MyReducer, MyCodec)` another [`Codec`].
/// Expands to nothing outside WebAssembly, so the same crate also builds natively.
#[macro_export]
macro_rules! export {
    ($reducer:ty) => {
        $crate::export!($reducer, $crate::Json);
    };
    ($reducer:ty, $codec:ty) => {
        #[cfg(target_family = "wasm")]
        const _: () = {
            type __StatefoldAdapter = $crate::__private::Adapter<$reducer, $codec>;
    $crate::__private::__export_reducer!(__StatefoldAdapter with_types_in $crate::__private);

            #[global_allocator]
            static __STATEFOLD_ALLOC: $crate::__private::CountingAlloc = $crate::__private::CountingAlloc;
        };
    };
}
