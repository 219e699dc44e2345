//! The values of the column families: how heads, diffs, versions, rejections, replays and
//! kind versions are written and read back (strictly: a value that does not decode is
//! corruption). Keys are in `codec`.

use super::*;

pub(super) fn decode<'a, T>(
    what: &'static str,
    key: &[u8],
    value: &'a [u8],
    f: impl FnOnce(&mut Dec<'a>) -> Result<T, Malformed>,
) -> Result<T, StoreError> {
    let mut dec = Dec::value(value).map_err(|m| StoreError::corrupt(what, key, m.0))?;
    let out = f(&mut dec).map_err(|m| StoreError::corrupt(what, key, m.0))?;
    dec.finish().map_err(|m| StoreError::corrupt(what, key, m.0))?;
    Ok(out)
}

/// The first key after every key that starts with `prefix` (which ends in a NUL).
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    *end.last_mut().expect("model prefixes end in a separator") += 1;
    end
}

pub(super) fn module_key(id: &ModuleHash) -> Vec<u8> {
    [&b"m"[..], &id.0].concat()
}

/// A chunk of a module a deploy record carries in parts, until its deploy record is folded.
pub(super) fn chunk_key(id: &ModuleHash, index: u32) -> Vec<u8> {
    [&b"c"[..], &id.0, &index.to_be_bytes()].concat()
}

/// After every chunk key of module `id`.
pub(super) fn chunk_keys_end(id: &ModuleHash) -> Vec<u8> {
    [&b"c"[..], &id.0, &[0xff; 5]].concat()
}

pub(super) fn version_key(name: &str, id: &ModuleHash) -> Vec<u8> {
    [&b"v"[..], name.as_bytes(), &[0], &id.0].concat()
}

/// A position: the next offset, the partition's digest if one is kept, the last record
/// folded if known.
pub(super) fn encode_progress(position: &Position) -> Vec<u8> {
    let mut enc = Enc::value();
    enc.u64(position.next_offset);
    match &position.digest {
        Some(digest) => enc.u8(1).hash(digest),
        None => enc.u8(0),
    };
    match &position.witness {
        Some(witness) => enc.u8(1).u64(witness.offset).raw(&witness.fingerprint),
        None => enc.u8(0),
    };
    enc.done()
}

/// (next offset, digest, witness). Positions stored before witnesses were kept hold the
/// next offset and the digest alone (8 or 40 bytes after the format byte, lengths the
/// tagged layout never has).
pub(super) fn decode_progress(d: &mut Dec<'_>) -> Result<(u64, Option<Hash>, Option<Witness>), Malformed> {
    let next = d.u64()?;
    match d.len() {
        0 => return Ok((next, None, None)),
        32 => return Ok((next, Some(d.hash()?), None)),
        _ => {}
    }
    let digest = if d.u8()? == 1 { Some(d.hash()?) } else { None };
    let witness = if d.u8()? == 1 {
        let offset = d.u64()?;
        let fingerprint = d.raw(16)?.try_into().expect("16 bytes");
        Some(Witness { offset, fingerprint })
    } else {
        None
    };
    Ok((next, digest, witness))
}

/// The partition count a topic was first folded with.
pub(super) fn topic_key(source: &str, topic: &str) -> Vec<u8> {
    [&b"t"[..], source.as_bytes(), &[0], topic.as_bytes()].concat()
}

pub(super) fn kind_versions_key(kind: &str) -> Vec<u8> {
    [&b"k"[..], kind.as_bytes()].concat()
}

pub(super) fn encode_kind_versions(versions: &KindVersions) -> Vec<u8> {
    let mut enc = Enc::value();
    enc.module(&versions.genesis).u32(versions.partition_count);
    enc.u32(versions.partitions.len() as u32);
    for (partition, version) in &versions.partitions {
        enc.u32(*partition).module(version);
    }
    enc.u32(versions.replays.len() as u32);
    for (partition, (generation, version)) in &versions.replays {
        enc.u32(*partition).u64(*generation).module(version);
    }
    enc.done()
}

pub(super) fn replay_key(kind: &str) -> Vec<u8> {
    [&b"r"[..], kind.as_bytes()].concat()
}

pub(super) fn encode_replay(job: &ReplayJob) -> Vec<u8> {
    Enc::value()
        .module(&job.reducer)
        .u64(job.started_ms as u64)
        .opt_i64(job.finished_ms)
        .u64(job.total)
        .u64(job.done)
        .u64(job.failed)
        .opt_bytes(job.first_error.as_deref().map(str::as_bytes))
        .opt_bytes(job.cursor.as_deref().map(str::as_bytes))
        .opt_bytes(job.subject.as_deref().map(str::as_bytes))
        .done()
}

pub(super) fn encode_version(record: &VersionRecord) -> Vec<u8> {
    let status = match record.status {
        VersionStatus::Active => 0,
        VersionStatus::Retired => 1,
        VersionStatus::Refused => 2,
    };
    let (code, message) = record.refusal.clone().unzip();
    let (declared_name, declared_version) = record.declared.clone().unzip();
    Enc::value()
        .u8(status)
        .opt_bytes(code.as_deref().map(str::as_bytes))
        .opt_bytes(message.as_deref().map(str::as_bytes))
        .bytes(record.origin.as_bytes())
        .opt_bytes(declared_name.as_deref().map(str::as_bytes))
        .opt_bytes(declared_version.as_deref().map(str::as_bytes))
        .u64(record.bytes)
        .u64(record.first_ms as u64)
        .u64(record.changed_ms as u64)
        .opt_bytes(record.subject.as_deref().map(str::as_bytes))
        .done()
}

pub(super) fn decode_version(name: &str, key: &[u8], value: &[u8]) -> Result<VersionRecord, StoreError> {
    let id = key
        .len()
        .checked_sub(32)
        .map(|at| ModuleHash(key[at..].try_into().expect("32 bytes")))
        .ok_or_else(|| StoreError::corrupt("reducer version key", key, "too short"))?;
    let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
    decode(REDUCERS, key, value, |d| {
        let status = match d.u8()? {
            0 => VersionStatus::Active,
            1 => VersionStatus::Retired,
            2 => VersionStatus::Refused,
            other => return Err(Malformed(format!("unknown version status {other}"))),
        };
        let code = text(d.opt_bytes()?);
        let message = text(d.opt_bytes()?);
        let origin = d.string()?;
        let declared_name = text(d.opt_bytes()?);
        let declared_version = text(d.opt_bytes()?);
        Ok(VersionRecord {
            name: name.to_owned(),
            id,
            status,
            refusal: code.zip(message),
            origin,
            declared: declared_name.zip(declared_version),
            bytes: d.u64()?,
            first_ms: d.u64()? as i64,
            changed_ms: d.u64()? as i64,
            // (Absent from versions stored before subjects were recorded.)
            subject: if d.is_empty() { None } else { text(d.opt_bytes()?) },
        })
    })
}

/// A head as stored: a base (see [`HEAD_BASE`]).
pub(super) fn encode_head(head: &Head) -> Vec<u8> {
    let mut enc = Enc::value_in(HEAD_BASE);
    enc.u64(head.seq).opt_u64(head.offset).hash(&head.hash).module(&head.reducer);
    enc.u32(head.checkpoints.len() as u32);
    for (seq, offset) in &head.checkpoints {
        enc.u64(*seq).u64(*offset);
    }
    enc.opt_u64(head.pruned_through).opt_u64(head.partition.map(u64::from)).u64(head.replayed);
    enc.u64(head.checkpoint_bytes).u64(head.tail_bytes).opt_u64(head.run_since).done()
}

/// A stored head (a base, or a whole head stored before bases: either way what
/// `Reader::head` advances by the model's last diff).
pub(super) fn decode_head(key: &[u8], value: &[u8]) -> Result<Head, StoreError> {
    let (mut dec, _) = Dec::value_in(value, &[FORMAT, HEAD_BASE]).map_err(|m| StoreError::corrupt("head", key, m.0))?;
    let head = read_head(&mut dec).map_err(|m| StoreError::corrupt("head", key, m.0))?;
    dec.finish().map_err(|m| StoreError::corrupt("head", key, m.0))?;
    check_head(&head).map_err(|detail| StoreError::corrupt("head", key, detail))?;
    Ok(head)
}

pub(super) fn read_head(dec: &mut Dec<'_>) -> Result<Head, Malformed> {
    let seq = dec.u64()?;
    let offset = dec.opt_u64()?;
    let hash = dec.hash()?;
    let reducer = dec.module()?;
    let n = dec.u32()? as usize;
    let mut checkpoints = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        checkpoints.push((dec.u64()?, dec.u64()?));
    }
    let pruned_through = dec.opt_u64()?;
    // Heads written before partitions and replays were recorded end here.
    let (partition, replayed) = if dec.is_empty() {
        (None, 0)
    } else {
        let partition = dec.opt_u64()?.map(|p| u32::try_from(p).map_err(|_| Malformed(format!("partition {p}"))));
        (partition.transpose()?, dec.u64()?)
    };
    // Heads written before checkpoint sizes were recorded end here: 0 is "not known", and
    // the next checkpoint is due by the diff count alone.
    let (checkpoint_bytes, tail_bytes) = if dec.is_empty() { (0, 0) } else { (dec.u64()?, dec.u64()?) };
    // Heads written before runs were recorded end here: not known.
    let run_since = if dec.is_empty() { None } else { dec.opt_u64()? };
    Ok(Head {
        seq,
        offset,
        hash,
        reducer,
        checkpoints,
        pruned_through,
        partition,
        replayed,
        checkpoint_bytes,
        tail_bytes,
        run_since,
    })
}

/// Invariants of a head, checked before it is written and after it is read.
pub(super) fn check_head(head: &Head) -> Result<(), String> {
    if (head.seq == 0) != head.offset.is_none() {
        return Err(format!("seq {} with offset {:?}", head.seq, head.offset));
    }
    let mut last: Option<(u64, u64)> = None;
    for &(seq, offset) in &head.checkpoints {
        if seq == 0 || seq > head.seq || head.offset.is_some_and(|o| offset > o) {
            return Err(format!("checkpoint ({seq}, {offset}) beyond head ({}, {:?})", head.seq, head.offset));
        }
        if last.is_some_and(|(s, o)| s >= seq || o >= offset) {
            return Err("checkpoints out of order".into());
        }
        last = Some((seq, offset));
    }
    if let Some(pruned) = head.pruned_through
        && head.checkpoints.first().is_none_or(|&(_, o)| o != pruned)
    {
        return Err(format!("pruned through {pruned} but the oldest checkpoint is {:?}", head.checkpoints.first()));
    }
    Ok(())
}

pub(super) fn encode_diff(applied: &Applied) -> Vec<u8> {
    Enc::value()
        .u64(applied.seq)
        .hash(&applied.hash)
        .module(&applied.reducer)
        .opt_i64(applied.timestamp_ms)
        .headers(&applied.headers)
        .bytes(&applied.payload)
        .u64(applied.tail_bytes)
        .done()
}

/// A `diffs` value, decoded field by field (the inverse of [`encode_diff`]).
pub(super) struct DiffValue<'a> {
    pub(super) seq: u64,
    pub(super) hash: Hash,
    pub(super) reducer: ModuleHash,
    pub(super) timestamp_ms: Option<i64>,
    pub(super) headers: Vec<(String, Vec<u8>)>,
    pub(super) payload: &'a [u8],
    /// The model's tail bytes after it (`None`: a diff stored before they were recorded).
    pub(super) tail_bytes: Option<u64>,
}

pub(super) fn read_diff<'a>(d: &mut Dec<'a>) -> Result<DiffValue<'a>, Malformed> {
    Ok(DiffValue {
        seq: d.u64()?,
        hash: d.hash()?,
        reducer: d.module()?,
        timestamp_ms: d.opt_i64()?,
        headers: d.headers()?,
        payload: d.bytes()?,
        tail_bytes: if d.is_empty() { None } else { Some(d.u64()?) },
    })
}

/// A stored diff, checked to follow `prev` in the hash chain.
pub(super) fn checked_diff(
    model: &ModelKey,
    key: &[u8],
    v: DiffValue<'_>,
    offset: u64,
    prev: Hash,
) -> Result<Applied, StoreError> {
    if prev.next(v.payload) != v.hash {
        return Err(StoreError::corrupt("diff", key, "hash does not follow from the previous hash and the diff"));
    }
    Ok(Applied {
        model: model.clone(),
        offset,
        seq: v.seq,
        prev,
        hash: v.hash,
        reducer: v.reducer,
        timestamp_ms: v.timestamp_ms,
        headers: v.headers,
        payload: Bytes::copy_from_slice(v.payload),
        tail_bytes: v.tail_bytes.unwrap_or(0),
    })
}

pub(super) fn encode_reject(rejected: &Rejected) -> Vec<u8> {
    Enc::value()
        .opt_bytes(rejected.key.as_deref())
        .opt_i64(rejected.timestamp_ms)
        .bytes(rejected.reason.code().as_str().as_bytes())
        .bytes(rejected.reason.message().as_bytes())
        .opt_u64(rejected.reason.detail())
        .done()
}

/// A rejected record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRejection {
    pub partition: u32,
    pub offset: u64,
    pub key: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
    pub reason: Rejection,
}

pub(super) fn decode_reject(key: &[u8], value: &[u8]) -> Result<StoredRejection, StoreError> {
    let malformed = || StoreError::corrupt("rejection key", key, "expected topic, partition and offset");
    let offset = key_offset(key).map_err(|_| malformed())?;
    let partition_at = key.len().checked_sub(12).ok_or_else(malformed)?;
    let partition = u32::from_be_bytes(key[partition_at..partition_at + 4].try_into().expect("4 bytes"));
    let (record_key, timestamp_ms, code, message, detail) = decode(REJECTS, key, value, |d| {
        Ok((d.opt_bytes()?.map(<[u8]>::to_vec), d.opt_i64()?, d.string()?, d.string()?, d.opt_u64()?))
    })?;
    let reason = Rejection::from_parts(&code, message, detail)
        .ok_or_else(|| StoreError::corrupt("rejection", key, format!("unknown code {code:?}")))?;
    Ok(StoredRejection { partition, offset, key: record_key, timestamp_ms, reason })
}
