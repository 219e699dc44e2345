//! Reducer versions in the vocabulary: a module's identity ([`ModuleHash`]), deploy
//! records in chunks ([`DeployChunk`]) and what folding one changed ([`DeployFolded`]),
//! the version each partition folds with ([`KindVersions`]), replays ([`ReplayJob`]) and
//! the registry's records ([`VersionRecord`]).

use super::*;

/// One chunk of a module too large for one record (see [`DEPLOY_CHUNK_HEADER`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployChunk {
    pub module: ModuleHash,
    pub index: u32,
    pub bytes: Bytes,
}

impl DeployChunk {
    /// Parses a [`DEPLOY_CHUNK_HEADER`] (`HASH INDEX COUNT`).
    pub fn parse_header(header: &[u8]) -> Result<(ModuleHash, u32, u32), String> {
        match hash_and_numbers(header) {
            Some((module, [index, count])) if index < count => Ok((module, index, count)),
            _ => Err(format!(
                "{DEPLOY_CHUNK_HEADER} is {:?}, not \"HASH INDEX COUNT\" (index below count)",
                String::from_utf8_lossy(header)
            )),
        }
    }

    /// Parses a [`DEPLOY_MODULE_HEADER`] (`HASH COUNT`).
    pub fn parse_module_header(header: &[u8]) -> Result<(ModuleHash, u32), String> {
        match hash_and_numbers(header) {
            Some((module, [count])) if count > 0 => Ok((module, count)),
            _ => Err(format!("{DEPLOY_MODULE_HEADER} is {:?}, not \"HASH COUNT\"", String::from_utf8_lossy(header))),
        }
    }
}

/// A header of the form `HASH N1 .. Nk`: a module hash in hex and exactly `K` numbers,
/// separated by single spaces.
fn hash_and_numbers<const K: usize>(header: &[u8]) -> Option<(ModuleHash, [u32; K])> {
    let mut words = std::str::from_utf8(header).ok()?.split(' ');
    let module = ModuleHash::parse(words.next()?)?;
    let mut numbers = [0; K];
    for number in &mut numbers {
        *number = words.next()?.parse().ok()?;
    }
    words.next().is_none().then_some((module, numbers))
}

/// A deploy record folded: `partition` folds with `version` after `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployFolded {
    pub kind: Arc<str>,
    /// The reducer's name (the record's header).
    pub name: String,
    pub version: ModuleHash,
    pub origin: String,
    /// Who deployed it ([`SUBJECT_HEADER`]).
    pub subject: Option<String>,
    /// What the module declares: (name, version).
    pub declared: (String, String),
    pub partition: u32,
    pub offset: u64,
    /// The record's timestamp: of two deploys folded out of order (a partition folded from
    /// further back than the others), the later one stays active.
    pub timestamp_ms: Option<i64>,
    /// The module (stored: later diffs name the version), from the record or assembled
    /// from its chunks.
    pub module: Bytes,
}

/// Which reducer version folds each partition of a kind. Deploy records in the log change
/// it, so every replica that folds the same records uses the same versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindVersions {
    /// The version of a partition that has folded no deploy record: the kind's first.
    pub genesis: ModuleHash,
    /// Partitions that folded a deploy record, and the last one's version.
    pub partitions: BTreeMap<u32, ModuleHash>,
    /// Partitions the latest deploy wrote to (0 before any deploy).
    pub partition_count: u32,
    /// Partitions that folded a replay record: how many, and the version the last one
    /// rebuilds with (the partition's version at that record).
    pub replays: BTreeMap<u32, (u64, ModuleHash)>,
}

impl KindVersions {
    pub fn new(genesis: ModuleHash) -> KindVersions {
        KindVersions { genesis, partitions: BTreeMap::new(), partition_count: 0, replays: BTreeMap::new() }
    }

    /// The replay generation of `partition`: replay records folded in it.
    pub fn replayed(&self, partition: u32) -> u64 {
        self.replays.get(&partition).map_or(0, |(generation, _)| *generation)
    }

    /// The version that folds `partition` now.
    pub fn of(&self, partition: u32) -> ModuleHash {
        self.partitions.get(&partition).copied().unwrap_or(self.genesis)
    }

    /// Every version some partition folds with now.
    pub fn in_use(&self) -> Vec<ModuleHash> {
        let mut out: Vec<ModuleHash> = self.partitions.values().copied().collect();
        let all_deployed =
            self.partition_count > 0 && (0..self.partition_count).all(|p| self.partitions.contains_key(&p));
        if !all_deployed {
            out.push(self.genesis);
        }
        out.sort_by_key(|v| v.0);
        out.dedup();
        out
    }
}

/// A replay of a kind: its states rebuilt from the retained diffs by its active reducer,
/// a page of models at a time between batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayJob {
    pub kind: String,
    /// The version that rebuilds.
    pub reducer: ModuleHash,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// Models of the kind when it started.
    pub total: u64,
    /// Models rebuilt.
    pub done: u64,
    /// Models that could not be rebuilt (they keep their history).
    pub failed: u64,
    pub first_error: Option<String>,
    /// The last model id handled; the next page starts after it.
    pub cursor: Option<String>,
    /// The subject of the token that asked for it (with `[auth]`).
    pub subject: Option<String>,
}

/// blake3 of a module's bytes: the identity of a reducer version.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleHash(pub [u8; 32]);

impl ModuleHash {
    pub fn of(bytes: &[u8]) -> ModuleHash {
        ModuleHash(*blake3::hash(bytes).as_bytes())
    }

    /// A module hash from its hex form (as [`fmt::Display`] writes it).
    pub fn parse(text: &str) -> Option<ModuleHash> {
        let bytes = hex::decode(text).ok()?;
        Some(ModuleHash(bytes.try_into().ok()?))
    }
}

impl fmt::Display for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleHash({self})")
    }
}

/// Where a version stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionStatus {
    /// Folding the reducer's kinds now.
    Active,
    /// Was active; its module is kept (stored diffs name it; deploy it again to roll back).
    Retired,
    /// A deploy that did not happen.
    Refused,
}

impl VersionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionStatus::Active => "active",
            VersionStatus::Retired => "retired",
            VersionStatus::Refused => "refused",
        }
    }
}

/// One version of a reducer, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    /// The reducer's name: its file name in the reducers directory without `.wasm`.
    pub name: String,
    pub id: ModuleHash,
    pub status: VersionStatus,
    /// Why it was refused: (code, message).
    pub refusal: Option<(String, String)>,
    /// How it arrived: `startup`, `directory`, `http`.
    pub origin: String,
    /// The subject of the token that deployed it (with `[auth]`).
    pub subject: Option<String>,
    /// What the module declares (`describe`): (name, version).
    pub declared: Option<(String, String)>,
    pub bytes: u64,
    /// When this version was first seen, and when its status last changed (ms since epoch).
    pub first_ms: i64,
    pub changed_ms: i64,
}
