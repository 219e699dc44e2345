//! The sandbox every reducer instance runs in: a locked-down WASI context (no files,
//! network, environment or arguments; a clock fixed at the Unix epoch; seeded randomness),
//! a memory cap, a per-diff CPU budget in fuel, and the tail of the guest's stderr for
//! error messages.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::{CallHook, ResourceLimiter, StoreContextMut};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::clocks::{HostMonotonicClock, HostWallClock};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::ReducerLimits;
use statefold_core::model::Reaction;

/// What a reducer instance's `Store` holds.
pub(crate) struct GuestData {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    pub(crate) meter: Meter,
    pub(crate) stderr: TailPipe,
    /// What the guest emitted during the current `apply` call: (diff index, reaction).
    pub(crate) emitted: Emitted,
}

impl GuestData {
    pub(crate) fn new(limits: &ReducerLimits) -> GuestData {
        let stderr = TailPipe::new(limits.stderr_bytes_max);
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .wall_clock(EpochClock)
            .monotonic_clock(EpochClock)
            .secure_random(StdRng::seed_from_u64(0x5ea7_e401d))
            .insecure_random(StdRng::seed_from_u64(0x5ea7_e401d))
            .insecure_random_seed(0x5ea7_e401d)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        GuestData {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter { memory_bytes_max: limits.memory_bytes_max, memory_bytes: 0 },
            meter: Meter { diff_fuel: limits.diff_fuel_max, starts_left: 0, started: 0, refuel: None },
            stderr,
            emitted: Emitted {
                per_diff_max: limits.reactions_per_diff_max,
                bytes_max: limits.reaction_bytes_max,
                this_diff: 0,
                list: Vec::new(),
            },
        }
    }
}

impl WasiView for GuestData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The monotonic clock as wasmtime-wasi links it (see its `wit/deps/clocks.wit`).
const MONOTONIC_CLOCK_INTERFACE: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Adds WASI (locked down by [`GuestData::new`]) and every version's imports to `linker`.
pub(crate) fn link(linker: &mut Linker<GuestData>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_sync(linker)?;
    // Fuel meters wasm instructions, not time spent blocked in the host: a reducer that
    // sleeps (`subscribe-*` then `poll`) would hold its thread for real time. Waiting on a
    // clock is therefore a trap. (The clock itself is stopped at zero; see EpochClock.)
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK_INTERFACE)?;
    for name in ["subscribe-duration", "subscribe-instant"] {
        clock.func_wrap(
            name,
            |_: StoreContextMut<'_, GuestData>, (_,): (u64,)| -> wasmtime::Result<(Resource<DynPollable>,)> {
                wasmtime::bail!("reducers may not sleep or wait on a clock")
            },
        )?;
    }
    linker.allow_shadowing(false);
    super::bindings::add_to_linker(linker)
}

/// `meter` of a version's bindings (`impl_meter!(v0_2)`), the same in every version.
macro_rules! impl_meter {
    ($module:ident) => {
        impl $crate::bindings::$module::statefold::reducer::meter::Host for $crate::sandbox::GuestData {
            fn start_diff(&mut self) -> wasmtime::Result<()> {
                self.start_diff()
            }
        }
    };
}
pub(crate) use impl_meter;

/// `reactions` of a version's bindings (since 0.2), the same in every version.
macro_rules! impl_reactions {
    ($module:ident) => {
        impl $crate::bindings::$module::statefold::reducer::reactions::Host for $crate::sandbox::GuestData {
            fn emit(
                &mut self,
                reaction: $crate::bindings::$module::statefold::reducer::reactions::Reaction,
            ) -> wasmtime::Result<()> {
                let Some(index) = self.meter.started.checked_sub(1) else {
                    wasmtime::bail!("reactions.emit called outside of model.apply (a reaction belongs to a diff)");
                };
                let $crate::bindings::$module::statefold::reducer::reactions::Reaction { topic, key, value, headers } =
                    reaction;
                self.emitted.push(index, statefold_core::model::Reaction { topic, key, value, headers })
            }
        }
    };
}
pub(crate) use impl_reactions;

impl GuestData {
    /// `meter.start-diff`, once per diff passed in: the next diff's fuel, set by
    /// [`refuel`] as the call returns to the guest.
    pub(crate) fn start_diff(&mut self) -> wasmtime::Result<()> {
        let meter = &mut self.meter;
        if meter.starts_left == 0 {
            wasmtime::bail!("reducer called meter.start-diff more often than there are diffs in the batch");
        }
        meter.starts_left -= 1;
        meter.started += 1;
        meter.refuel = Some(meter.diff_fuel);
        self.emitted.this_diff = 0;
        Ok(())
    }
}

/// The store's call hook: a `start-diff` returning to the guest resets the fuel to one
/// diff's worth (an import's `Host` method sees its data, not the store's fuel).
pub(crate) fn refuel(mut store: StoreContextMut<'_, GuestData>, hook: CallHook) -> wasmtime::Result<()> {
    if matches!(hook, CallHook::ReturningFromHost)
        && let Some(fuel) = store.data_mut().meter.refuel.take()
    {
        store.set_fuel(fuel)?;
    }
    Ok(())
}

/// The per-diff CPU budget: `start-diff` resets the fuel to one diff's worth, at most once
/// per diff passed in.
pub(crate) struct Meter {
    pub(crate) diff_fuel: u64,
    pub(crate) starts_left: u32,
    /// `start-diff` calls in this call: the diff being applied is `started - 1`.
    pub(crate) started: u32,
    /// The fuel a `start-diff` asked for, set as it returns (see [`refuel`]).
    pub(crate) refuel: Option<u64>,
}

/// Reactions emitted during one `apply` call, within the limits.
pub(crate) struct Emitted {
    per_diff_max: usize,
    bytes_max: usize,
    this_diff: usize,
    pub(crate) list: Vec<(u32, Reaction)>,
}

impl Emitted {
    pub(crate) fn push(&mut self, index: u32, reaction: Reaction) -> wasmtime::Result<()> {
        if self.this_diff >= self.per_diff_max {
            wasmtime::bail!("the diff emitted more than reactions_per_diff_max ({}) reactions", self.per_diff_max);
        }
        let bytes = reaction.key.len()
            + reaction.value.len()
            + reaction.headers.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>();
        if bytes > self.bytes_max {
            wasmtime::bail!("a reaction of {bytes} bytes is over reaction_bytes_max ({})", self.bytes_max);
        }
        if let Err(reason) = statefold_core::model::validate_topic(&reaction.topic) {
            wasmtime::bail!("a reaction to topic {:?}: {reason}", reaction.topic);
        }
        if let Some((name, _)) = reaction.headers.iter().find(|(name, _)| name.starts_with("statefold-")) {
            wasmtime::bail!("a reaction's header {name:?}: names starting `statefold-` are the host's");
        }
        self.this_diff += 1;
        self.list.push((index, reaction));
        Ok(())
    }
}

/// Caps linear memory and tables; remembers the memory size (the guest's heap-bytes report
/// is clamped to it, so a lying guest cannot force evictions).
pub(crate) struct Limiter {
    memory_bytes_max: usize,
    pub(crate) memory_bytes: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes_max {
            wasmtime::bail!(
                "reducer exceeded its memory limit: wanted {desired} bytes, reducer_memory_bytes_max is {}",
                self.memory_bytes_max
            );
        }
        self.memory_bytes = self.memory_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        const TABLE_ELEMENTS_MAX: usize = 1 << 20;
        if desired > TABLE_ELEMENTS_MAX {
            wasmtime::bail!(
                "reducer exceeded the table limit: wanted {desired} elements, at most {TABLE_ELEMENTS_MAX}"
            );
        }
        Ok(true)
    }
}

/// Wall and monotonic clock, both stopped at zero (the Unix epoch): a reducer that reads
/// the time gets the same answer on every replica.
struct EpochClock;

impl HostWallClock for EpochClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for EpochClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }

    fn now(&self) -> u64 {
        0
    }
}

/// Keeps the last `capacity` bytes the guest wrote; never fails a write (a chatty reducer
/// must not trap because of its logging).
#[derive(Clone)]
pub(crate) struct TailPipe {
    capacity: usize,
    buffer: Arc<Mutex<VecDeque<u8>>>,
}

impl TailPipe {
    fn new(capacity: usize) -> TailPipe {
        TailPipe { capacity, buffer: Arc::new(Mutex::new(VecDeque::new())) }
    }

    /// Takes what was written so far, as text.
    pub(crate) fn take(&self) -> String {
        let mut buffer = self.buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let bytes: Vec<u8> = buffer.drain(..).collect();
        String::from_utf8_lossy(&bytes).trim().to_owned()
    }

    fn push(&self, bytes: &[u8]) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let keep = bytes.len().min(self.capacity);
        let overflow = (buffer.len() + keep).saturating_sub(self.capacity);
        let drop = overflow.min(buffer.len());
        buffer.drain(..drop);
        buffer.extend(&bytes[bytes.len() - keep..]);
    }
}

impl IsTerminal for TailPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for TailPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASIp3 guests write through this; reducers are WASIp2 components.
        Box::new(tokio::io::sink())
    }
}

impl OutputStream for TailPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for TailPipe {
    async fn ready(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_pipe_keeps_the_last_bytes() {
        let pipe = TailPipe::new(8);
        pipe.push(b"hello ");
        pipe.push(b"world, again");
        assert_eq!(pipe.take(), "d, again");
        pipe.push(b"0123456789abc");
        assert_eq!(pipe.take(), "56789abc");
        assert_eq!(pipe.take(), "");
    }
}
