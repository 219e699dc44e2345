//! Host-side bindings of the `statefold:reducer` WIT package: the current version (the one
//! copy in `wit/`) and every earlier one the host still loads (frozen under `wit/<version>/`).
//! The imports (`meter`, `reactions`) are linked by hand in `sandbox`, under each version's
//! name (they need the store: fuel, the reactions buffer).
//!
//! The versions' exports have the same shape; [`Guest`] holds one version's bindings and
//! [`on_guest!`] runs the same code against whichever it is, with `$m` naming that
//! version's `types`. Results are converted into the current version's types.

/// statefold:reducer@0.2.0, the current version.
pub mod v0_2 {
    wasmtime::component::bindgen!({
        world: "guest",
        path: "../../wit",
    });
}

/// statefold:reducer@0.1.0 (no `reactions` import).
pub mod v0_1 {
    wasmtime::component::bindgen!({
        world: "guest",
        path: "../../wit/0.1.0",
    });
}

pub use self::v0_2::statefold::reducer::reactions::Reaction as WitReaction;
pub use self::v0_2::statefold::reducer::types::{Capabilities, Info};

/// One version's bindings of an instance.
pub enum Guest {
    V0_1(v0_1::Guest),
    V0_2(v0_2::Guest),
}

/// One version's pre-instantiated component.
pub enum GuestPre<T: 'static> {
    V0_1(v0_1::GuestPre<T>),
    V0_2(v0_2::GuestPre<T>),
}

/// `on_guest!(guest, g, m => body)`: `body` with `g` the version's bindings and `m` its
/// `types` module.
macro_rules! on_guest {
    ($guest:expr, $g:ident, $m:ident => $body:expr) => {
        match $guest {
            $crate::bindings::Guest::V0_1($g) => {
                #[allow(unused_imports)]
                use $crate::bindings::v0_1::statefold::reducer::types as $m;
                $body
            }
            $crate::bindings::Guest::V0_2($g) => {
                #[allow(unused_imports)]
                use $crate::bindings::v0_2::statefold::reducer::types as $m;
                $body
            }
        }
    };
}
pub(crate) use on_guest;

impl<T: 'static> GuestPre<T> {
    /// The bindings of the version `minor` (of 0.x) over `pre`.
    pub fn new(minor: u64, pre: wasmtime::component::InstancePre<T>) -> wasmtime::Result<GuestPre<T>> {
        Ok(match minor {
            1 => GuestPre::V0_1(v0_1::GuestPre::new(pre)?),
            _ => GuestPre::V0_2(v0_2::GuestPre::new(pre)?),
        })
    }

    pub fn engine(&self) -> &wasmtime::Engine {
        match self {
            GuestPre::V0_1(pre) => pre.engine(),
            GuestPre::V0_2(pre) => pre.engine(),
        }
    }

    pub fn instantiate(&self, store: impl wasmtime::AsContextMut<Data = T>) -> wasmtime::Result<Guest> {
        Ok(match self {
            GuestPre::V0_1(pre) => Guest::V0_1(pre.instantiate(store)?),
            GuestPre::V0_2(pre) => Guest::V0_2(pre.instantiate(store)?),
        })
    }
}

impl Guest {
    pub fn describe(&self, store: impl wasmtime::AsContextMut) -> wasmtime::Result<Info> {
        Ok(on_guest!(self, g, m => {
            let info = g.statefold_reducer_reducer().call_describe(store)?;
            let mut capabilities = Capabilities::empty();
            if info.capabilities.contains(m::Capabilities::MERGE) {
                capabilities |= Capabilities::MERGE;
            }
            if info.capabilities.contains(m::Capabilities::DELTA) {
                capabilities |= Capabilities::DELTA;
            }
            Info {
                name: info.name,
                version: info.version,
                diff_format: info.diff_format,
                state_format: info.state_format,
                capabilities,
            }
        }))
    }
}
