//! The hash chain: `h0 = blake3("statefold/v1" ‖ kind ‖ 0x00 ‖ id)`,
//! `h(n) = blake3(h(n-1) ‖ diff(n))`. Only applied diffs are part of it, so a given
//! (state, hash, diff) yields the same next hash on every replica and after every restart.
//! A replay (rebuilding states with another reducer) starts a new chain with [`Hash::rebase`].

use std::fmt;
use std::str::FromStr;

/// A model's version hash (blake3, 32 bytes; hex on the wire).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash([u8; 32]);

impl Hash {
    /// The hash of a model before its first diff.
    pub fn genesis(kind: &str, id: &str) -> Hash {
        let mut h = blake3::Hasher::new();
        h.update(b"statefold/v1");
        h.update(kind.as_bytes());
        h.update(&[0]);
        h.update(id.as_bytes());
        Hash(*h.finalize().as_bytes())
    }

    /// The hash after applying `diff` to the version with this hash.
    pub fn next(&self, diff: &[u8]) -> Hash {
        let mut h = blake3::Hasher::new();
        h.update(&self.0);
        h.update(diff);
        Hash(*h.finalize().as_bytes())
    }

    /// The hash a replay gives the version it rebuilds from: `blake3("statefold/replay" ‖
    /// old hash ‖ reducer)`. States rebuilt by another reducer get new hashes, so a client
    /// holding an old one is sent a snapshot, never a patch against a state it does not have.
    pub fn rebase(&self, reducer: &[u8; 32]) -> Hash {
        let mut h = blake3::Hasher::new();
        h.update(b"statefold/replay");
        h.update(&self.0);
        h.update(reducer);
        Hash(*h.finalize().as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Hash {
        Hash(bytes)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed hash: expected 64 hex digits")]
pub struct MalformedHash;

impl FromStr for Hash {
    type Err = MalformedHash;

    fn from_str(s: &str) -> Result<Hash, MalformedHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| MalformedHash)?;
        Ok(Hash(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_vectors() {
        // Written out so that a change to the chain rule is a visible, deliberate diff.
        let h0 = Hash::genesis("counter", "m1");
        assert_eq!(h0.to_string(), blake3::hash(b"statefold/v1counter\0m1").to_hex().as_str());
        let h1 = h0.next(br#"{"add":1}"#);
        let mut concat = h0.as_bytes().to_vec();
        concat.extend_from_slice(br#"{"add":1}"#);
        assert_eq!(h1.as_bytes(), blake3::hash(&concat).as_bytes());
        assert_eq!(h1.to_string().parse::<Hash>(), Ok(h1));
        assert_eq!("xyz".parse::<Hash>(), Err(MalformedHash));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(Hash::genesis("ab", "c"), Hash::genesis("a", "bc"));
    }
}
