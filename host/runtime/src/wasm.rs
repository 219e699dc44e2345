//! The core's [`Guest`] over a wasmtime instance of a reducer component.

use std::collections::HashMap;

use wasmtime::component::ResourceAny;
use wasmtime::{Engine, Store};

use super::bindings::{self, GuestPre, on_guest};
use super::sandbox::GuestData;
use super::{Applied, Composed, Guest, Handle, Instantiate, ReducerLimits, Trap};
use statefold_core::chain::Hash;
use statefold_core::model::DiffRecord;

/// A compiled component, ready to instantiate.
pub(super) struct Component {
    pub(super) pre: GuestPre<GuestData>,
    pub(super) engine: Engine,
}

impl Instantiate for Component {
    fn instantiate(&self, limits: &ReducerLimits) -> Result<Box<dyn Guest>, Trap> {
        let mut store = Store::new(&self.engine, GuestData::new(limits));
        store.limiter(|data| &mut data.limiter);
        store.call_hook(super::sandbox::refuel);
        let instance = store.set_fuel(limits.call_fuel_max).and_then(|()| self.pre.instantiate(&mut store));
        let guest = instance.map_err(|e| Trap(format!("{e:#}")))?;
        let fuel = (limits.diff_fuel_max, limits.call_fuel_max);
        Ok(Box::new(WasmGuest { store: Box::new(store), guest, models: HashMap::new(), next: 0, fuel }))
    }
}

/// One instance: its store, its bindings, and the models (resources) it holds by handle.
pub(super) struct WasmGuest {
    store: Box<Store<GuestData>>,
    guest: bindings::Guest,
    models: HashMap<Handle, ResourceAny>,
    next: Handle,
    /// (reducer_diff_fuel_max, reducer_call_fuel_max), for messages.
    fuel: (u64, u64),
}

impl WasmGuest {
    /// Describes a wasmtime error for people, with what the guest wrote to stderr lately.
    fn trap(&self, error: wasmtime::Error) -> Trap {
        let stderr = self.store.data().stderr.take();
        let reason = match error.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::OutOfFuel) => format!(
                "exceeded its CPU budget (reducer_diff_fuel_max {} per diff, reducer_call_fuel_max {} per call)",
                self.fuel.0, self.fuel.1
            ),
            _ => format!("{error:#}"),
        };
        Trap(if stderr.is_empty() { reason } else { format!("{reason}; stderr: {stderr}") })
    }

    fn resource(&self, handle: Handle) -> Result<ResourceAny, Trap> {
        self.models.get(&handle).copied().ok_or_else(|| Trap(format!("no model {handle} in this instance")))
    }
}

impl Guest for WasmGuest {
    fn create(&mut self, model: &str, snapshot: Option<&[u8]>) -> Result<Result<Handle, String>, Trap> {
        let (store, guest) = (&mut *self.store, &self.guest);
        let created: wasmtime::Result<Result<ResourceAny, String>> = on_guest!(guest, g, _m => {
            let api = g.statefold_reducer_reducer().model();
            match snapshot {
                Some(snapshot) => api.call_restore(&mut *store, model, snapshot),
                None => api.call_constructor(&mut *store, model).map(Ok),
            }
        });
        match created {
            Ok(Ok(resource)) => {
                self.next += 1;
                self.models.insert(self.next, resource);
                Ok(Ok(self.next))
            }
            Ok(Err(refusal)) => Ok(Err(refusal)),
            Err(e) => Err(self.trap(e)),
        }
    }

    fn apply(&mut self, handle: Handle, prevs: &[Hash], batch: &[DiffRecord]) -> Result<Applied, Trap> {
        let resource = self.resource(handle)?;
        let (store, guest) = (&mut *self.store, &self.guest);
        store.data_mut().emitted.list.clear();
        let result: wasmtime::Result<Applied> = on_guest!(guest, g, m => {
            let wit: Vec<m::Diff> = batch
                .iter()
                .zip(prevs)
                .map(|(d, prev)| m::Diff {
                    context: m::DiffContext {
                        offset: d.offset,
                        timestamp_ms: d.timestamp_ms,
                        headers: d.headers.clone(),
                        prev_hash: prev.as_bytes().to_vec(),
                    },
                    payload: d.payload.clone(),
                })
                .collect();
            g.statefold_reducer_reducer().model().call_apply(&mut *store, resource, &wit).map(|result| Applied {
                applied: result.applied,
                refusal: result.refusal.map(|r| (r.index, r.reason)),
                emitted: Vec::new(),
            })
        });
        let mut applied = result.map_err(|e| self.trap(e))?;
        applied.emitted = std::mem::take(&mut self.store.data_mut().emitted.list);
        Ok(applied)
    }

    fn snapshot(&mut self, handle: Handle) -> Result<Vec<u8>, Trap> {
        let resource = self.resource(handle)?;
        let (store, guest) = (&mut *self.store, &self.guest);
        let snapshot =
            on_guest!(guest, g, _m => g.statefold_reducer_reducer().model().call_snapshot(&mut *store, resource));
        snapshot.map_err(|e| self.trap(e))
    }

    fn drop_model(&mut self, handle: Handle) -> Result<(), Trap> {
        let Some(resource) = self.models.remove(&handle) else { return Ok(()) };
        resource.resource_drop(&mut *self.store).map_err(|e| self.trap(e))
    }

    fn merge(&mut self, diffs: &[Vec<u8>]) -> Result<Result<Composed, String>, Trap> {
        let (store, guest) = (&mut *self.store, &self.guest);
        let merged = on_guest!(guest, g, m => {
            g.statefold_reducer_reducer().call_merge(&mut *store, diffs).map(|result| result.map(|composed| match composed {
                m::Composed::Diff(d) => Composed::Diff(d),
                m::Composed::NotComposable(reason) => Composed::NotComposable(reason),
            }))
        });
        merged.map_err(|e| self.trap(e))
    }

    fn delta(&mut self, from: &[u8], to: &[u8]) -> Result<Result<Vec<u8>, String>, Trap> {
        let (store, guest) = (&mut *self.store, &self.guest);
        let delta = on_guest!(guest, g, _m => g.statefold_reducer_reducer().call_delta(&mut *store, from, to));
        delta.map_err(|e| self.trap(e))
    }

    fn memory_bytes(&self) -> usize {
        self.store.data().limiter.memory_bytes
    }

    fn heap_bytes(&mut self) -> Result<u64, Trap> {
        let (store, guest) = (&mut *self.store, &self.guest);
        let heap = on_guest!(guest, g, _m => g.statefold_reducer_reducer().call_heap_bytes(&mut *store));
        heap.map_err(|e| self.trap(e))
    }

    fn arm(&mut self, starts: u32, fuel: u64) -> Result<(), Trap> {
        let meter = &mut self.store.data_mut().meter;
        meter.starts_left = starts;
        meter.started = 0;
        meter.refuel = None;
        self.store.set_fuel(fuel).map_err(|e| Trap(format!("{e:#}")))
    }
}
