//! Checks that a file is a compatible `statefold:reducer` component, with a specific reason
//! when it is not.

use wasmtime::Engine;
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

use super::bindings::GuestPre;
use super::sandbox::GuestData;
use super::{LoadError, REDUCER_INTERFACE, ReducerInfo, ReducerLimits, WIT_VERSION, WIT_VERSIONS};

/// Rejects what is not wasm, and core modules, before compiling anything.
pub(super) fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    // Bytes 4..8: version (u16 LE) and layer (u16 LE); layer 0 is a core module.
    match u16::from_le_bytes([bytes[6], bytes[7]]) {
        0 => Err(LoadError::CoreModule),
        _ => check_complete(bytes),
    }
}

/// Walks the top-level sections (id byte, LEB128 size, contents): a file cut short, as a
/// half-written copy is, ends inside one. Reported as such rather than as a parse error.
fn check_complete(bytes: &[u8]) -> Result<(), LoadError> {
    let truncated = || LoadError::Truncated { bytes: bytes.len() };
    let mut at = 8;
    while at < bytes.len() {
        at += 1; // section id
        let mut size: u64 = 0;
        for shift in (0..35).step_by(7) {
            let byte = *bytes.get(at).ok_or_else(truncated)?;
            at += 1;
            size |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        at = at.checked_add(size as usize).ok_or_else(truncated)?;
        if at > bytes.len() {
            return Err(truncated());
        }
    }
    Ok(())
}

/// Finds the `statefold:reducer/reducer` export and checks its version.
pub(super) fn check_world(engine: &Engine, component: &Component) -> Result<(semver::Version, Vec<String>), LoadError> {
    let ty = component.component_type();
    let exports: Vec<String> = ty.exports(engine).map(|(name, _)| name.to_owned()).collect();
    let imports: Vec<String> = ty
        .imports(engine)
        .filter(|(_, item)| matches!(item.ty, ComponentItem::ComponentInstance(_)))
        .map(|(name, _)| name.to_owned())
        .collect();
    let prefix = format!("{REDUCER_INTERFACE}@");
    let Some(found) = exports.iter().find_map(|name| name.strip_prefix(&prefix)) else {
        let exports = if exports.is_empty() { "nothing".to_owned() } else { exports.join(", ") };
        return Err(LoadError::WrongWorld { exports });
    };
    let found =
        semver::Version::parse(found).map_err(|e| LoadError::Invalid(format!("export version {found:?}: {e}")))?;
    // Same major; while 0.x, a minor this host lists (0.x.y and 0.x.z are compatible).
    let compatible = found.pre.is_empty()
        && WIT_VERSIONS.iter().map(|v| semver::Version::parse(v).expect("a valid version")).any(|supported| {
            found.major == supported.major && (supported.major != 0 || found.minor == supported.minor)
        });
    if !compatible {
        return Err(LoadError::IncompatibleVersion { found, supported: WIT_VERSION });
    }
    Ok((found, imports))
}

/// Instantiates once in a fresh sandbox and asks the reducer what it is.
pub(super) fn describe(
    pre: &GuestPre<GuestData>,
    limits: &ReducerLimits,
    wit_version: semver::Version,
    imports: Vec<String>,
) -> Result<ReducerInfo, LoadError> {
    let mut store = wasmtime::Store::new(pre.engine(), GuestData::new(limits));
    store.limiter(|data| &mut data.limiter);
    let fail = |store: &wasmtime::Store<GuestData>, e: wasmtime::Error| {
        let stderr = store.data().stderr.take();
        LoadError::Describe(if stderr.is_empty() { format!("{e:#}") } else { format!("{e:#}; stderr: {stderr}") })
    };
    store.set_fuel(limits.call_fuel_max).map_err(|e| LoadError::Describe(e.to_string()))?;
    let guest = pre.instantiate(&mut store).map_err(|e| fail(&store, e))?;
    let info = guest.describe(&mut store).map_err(|e| fail(&store, e))?;
    if info.name.trim().is_empty() {
        return Err(LoadError::Describe("the reducer's name is empty".into()));
    }
    Ok(ReducerInfo {
        name: info.name,
        version: info.version,
        diff_format: info.diff_format,
        state_format: info.state_format,
        merge: info.capabilities.contains(super::bindings::Capabilities::MERGE),
        delta: info.capabilities.contains(super::bindings::Capabilities::DELTA),
        wit_version,
        imports,
    })
}
