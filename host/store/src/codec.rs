//! Keys and values of the column families. Every value starts with a format byte; decoding
//! is strict (lengths checked, nothing left over), so a damaged value is found on read.

use statefold_core::chain::Hash;
use statefold_core::model::ModuleHash;

pub(super) const FORMAT: u8 = 1;

/// The format byte of a head stored as a base: its seq, offset, hash and tail bytes may be
/// behind, and are then those of the model's last stored diff (see `Reader::head`). A server
/// from before it stops on such a head (an unknown format) rather than read it as current.
pub(super) const HEAD_BASE: u8 = 2;

/// A value or key that does not decode.
#[derive(Debug)]
pub(super) struct Malformed(pub String);

pub(super) struct Enc(pub Vec<u8>);

impl Enc {
    pub fn value() -> Enc {
        Enc(vec![FORMAT])
    }
    /// A value whose format byte is `format`.
    pub fn value_in(format: u8) -> Enc {
        Enc(vec![format])
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).u64(v),
            None => self.u8(0),
        }
    }
    pub fn opt_i64(&mut self, v: Option<i64>) -> &mut Self {
        self.opt_u64(v.map(|v| v as u64))
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn hash(&mut self, h: &Hash) -> &mut Self {
        self.0.extend_from_slice(h.as_bytes());
        self
    }
    pub fn module(&mut self, m: &ModuleHash) -> &mut Self {
        self.0.extend_from_slice(&m.0);
        self
    }
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(u32::try_from(b.len()).expect("values are bounded far below 4 GiB"));
        self.0.extend_from_slice(b);
        self
    }
    pub fn opt_bytes(&mut self, b: Option<&[u8]>) -> &mut Self {
        match b {
            Some(b) => self.u8(1).bytes(b),
            None => self.u8(0),
        }
    }
    pub fn headers(&mut self, headers: &[(String, Vec<u8>)]) -> &mut Self {
        self.u32(headers.len() as u32);
        for (name, value) in headers {
            self.bytes(name.as_bytes()).bytes(value);
        }
        self
    }
    pub fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

pub(super) struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    pub fn value(buf: &'a [u8]) -> Result<Dec<'a>, Malformed> {
        Dec::value_in(buf, &[FORMAT]).map(|(dec, _)| dec)
    }
    /// A value in one of `formats`, and which.
    pub fn value_in(buf: &'a [u8], formats: &[u8]) -> Result<(Dec<'a>, u8), Malformed> {
        match buf.split_first() {
            Some((format, rest)) if formats.contains(format) => Ok((Dec { buf: rest }, *format)),
            Some((other, _)) => Err(Malformed(format!("unknown value format {other}"))),
            None => Err(Malformed("empty value".into())),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed(format!("truncated: wanted {n} bytes, {} left", self.buf.len())));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub fn u64(&mut self) -> Result<u64, Malformed> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn flag(&mut self) -> Result<bool, Malformed> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(Malformed(format!("bad option tag {other}"))),
        }
    }
    pub fn opt_u64(&mut self) -> Result<Option<u64>, Malformed> {
        if self.flag()? { Ok(Some(self.u64()?)) } else { Ok(None) }
    }
    pub fn opt_i64(&mut self) -> Result<Option<i64>, Malformed> {
        Ok(self.opt_u64()?.map(|v| v as i64))
    }
    pub fn hash(&mut self) -> Result<Hash, Malformed> {
        Ok(Hash::from_bytes(self.take(32)?.try_into().expect("32 bytes")))
    }
    pub fn module(&mut self) -> Result<ModuleHash, Malformed> {
        Ok(ModuleHash(self.take(32)?.try_into().expect("32 bytes")))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn opt_bytes(&mut self) -> Result<Option<&'a [u8]>, Malformed> {
        if self.flag()? { Ok(Some(self.bytes()?)) } else { Ok(None) }
    }
    pub fn string(&mut self) -> Result<String, Malformed> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Malformed("string is not UTF-8".into()))
    }
    pub fn headers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Malformed> {
        let n = self.u32()? as usize;
        if n > self.buf.len() {
            return Err(Malformed(format!("{n} headers cannot fit in {} bytes", self.buf.len())));
        }
        let mut headers = Vec::with_capacity(n);
        for _ in 0..n {
            headers.push((self.string()?, self.bytes()?.to_vec()));
        }
        Ok(headers)
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn raw(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        self.take(n)
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn finish(self) -> Result<(), Malformed> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(Malformed(format!("{n} trailing bytes"))),
        }
    }
}

/// `kind ‖ 0 ‖ id`: a model's key in `heads`.
pub(super) fn head_key(kind: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(kind.len() + id.len() + 1);
    key.extend_from_slice(kind.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

/// `kind ‖ 0 ‖ id ‖ 0`: the prefix of a model's keys in `diffs`, `states` and `hashes`.
/// Ids hold no NUL, so no model's prefix is another's.
pub(super) fn model_prefix(kind: &str, id: &str) -> Vec<u8> {
    let mut key = head_key(kind, id);
    key.push(0);
    key
}

pub(super) fn offset_key(prefix: &[u8], offset: u64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

/// `topic ‖ 0 ‖ partition`: the prefix of a partition's keys in `log` and `rejects`.
pub(super) fn partition_prefix(topic: &str, partition: u32) -> Vec<u8> {
    let mut key = topic.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&partition.to_be_bytes());
    key
}

/// `source ‖ 0 ‖ topic ‖ 0 ‖ partition`: a source position's key in `progress`.
pub(super) fn progress_key(source: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut key = source.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&partition_prefix(topic, partition));
    key
}

/// The start of every position of (`source`, `topic`): source ‖ 0 ‖ topic ‖ 0.
pub(super) fn progress_prefix(source: &str, topic: &str) -> Vec<u8> {
    [source.as_bytes(), &[0], topic.as_bytes(), &[0]].concat()
}

/// The offset at the end of a key built by [`offset_key`].
pub(super) fn key_offset(key: &[u8]) -> Result<u64, Malformed> {
    let tail = key.len().checked_sub(8).ok_or_else(|| Malformed("key too short for an offset".into()))?;
    Ok(u64::from_be_bytes(key[tail..].try_into().expect("8 bytes")))
}
