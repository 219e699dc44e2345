//! Host-side bindings of the `statefold:reducer` WIT package: the current version (the one
//! copy in `wit/`) and every earlier one the host still loads (frozen under `wit/<version>/`).
//!
//! One line of [`versions!`] per version: it generates the version's `bindgen!` module, its
//! variant of [`Guest`] and [`GuestPre`], its arm of [`on_guest!`] and of
//! [`GuestPre::new`], and links its imports through the generated traits (`add_to_linker`),
//! implemented once for every version in `sandbox` (`meter`, `reactions`). The versions'
//! exports have the same shape; [`on_guest!`] runs the same code against whichever it is,
//! with `$m` naming that version's `types`. Results are converted into the current
//! version's types.

use wasmtime::component::{HasSelf, Linker};

use super::sandbox::GuestData;

/// `versions!($ Variant module (minor, "version", "wit path") [imports]; ...)`: see the
/// module's documentation. `$` is passed in so that the generated `on_guest!` can have
/// metavariables of its own.
macro_rules! versions {
    ($d:tt $( $variant:ident $module:ident ($minor:literal, $version:literal, $path:literal) [$($import:ident),*]; )*) => {
        $(
            #[doc = concat!("statefold:reducer@", $version)]
            pub mod $module {
                wasmtime::component::bindgen!({
                    world: "guest",
                    path: $path,
                    // Every import may trap (a limit broken fails the diff).
                    imports: { default: trappable },
                });
            }
            impl $module::statefold::reducer::types::Host for GuestData {}
            $( $crate::sandbox::$import!($module); )*
        )*

        /// Every version the host loads reducers of: the current one and those before it.
        pub const WIT_VERSIONS: &[&str] = &[$($version),*];

        /// One version's bindings of an instance.
        pub enum Guest {
            $( $variant($module::Guest), )*
        }

        /// One version's pre-instantiated component.
        pub enum GuestPre<T: 'static> {
            $( $variant($module::GuestPre<T>), )*
        }

        /// `on_guest!(guest, g, m => body)`: `body` with `g` the version's bindings and `m`
        /// its `types` module.
        macro_rules! on_guest {
            ($d guest:expr, $d g:ident, $d m:ident => $d body:expr) => {
                match $d guest {
                    $(
                        $crate::bindings::Guest::$variant($d g) => {
                            #[allow(unused_imports)]
                            use $crate::bindings::$module::statefold::reducer::types as $d m;
                            $d body
                        }
                    )*
                }
            };
        }

        impl<T: 'static> GuestPre<T> {
            /// The bindings of the version `minor` (of 0.x) over `pre`.
            pub fn new(minor: u64, pre: wasmtime::component::InstancePre<T>) -> wasmtime::Result<GuestPre<T>> {
                match minor {
                    $( $minor => Ok(GuestPre::$variant($module::GuestPre::new(pre)?)), )*
                    other => wasmtime::bail!("no bindings for statefold:reducer@0.{other}"),
                }
            }

            pub fn engine(&self) -> &wasmtime::Engine {
                match self {
                    $( GuestPre::$variant(pre) => pre.engine(), )*
                }
            }

            pub fn instantiate(&self, store: impl wasmtime::AsContextMut<Data = T>) -> wasmtime::Result<Guest> {
                match self {
                    $( GuestPre::$variant(pre) => Ok(Guest::$variant(pre.instantiate(store)?)), )*
                }
            }
        }

        /// Links every version's imports into `linker`, each under its version's name.
        pub(crate) fn add_to_linker(linker: &mut Linker<GuestData>) -> wasmtime::Result<()> {
            $( $module::Guest::add_to_linker::<GuestData, HasSelf<GuestData>>(linker, |data| data)?; )*
            Ok(())
        }
    };
}

versions! {$
    V0_1 v0_1 (1, "0.1.0", "../../wit/0.1.0") [impl_meter];
    V0_2 v0_2 (2, "0.2.0", "../../wit") [impl_meter, impl_reactions];
}
// Not redundant: `wasm` imports the macro by path.
#[allow(clippy::single_component_path_imports)]
pub(crate) use on_guest;

pub use self::v0_2::statefold::reducer::types::{Capabilities, Info};

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
