//! Little-endian encoding helpers for stored values, with a bounds-checked
//! reader that never panics (the decoders are fuzzed).

use crate::error::{Error, Result};

/// Appends little-endian fields to a buffer.
#[derive(Debug, Default)]
pub struct Enc {
    /// The bytes written so far.
    pub buf: Vec<u8>,
}

impl Enc {
    /// An encoder with capacity.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// u16 LE.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// u32 LE.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// u64 LE.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// i64 LE.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Raw bytes, no length.
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// Bytes with a u16 length prefix. Callers check the length first.
    pub fn bytes16(&mut self, v: &[u8]) -> &mut Self {
        self.u16(v.len() as u16).raw(v)
    }
    /// Bytes with a u32 length prefix.
    pub fn bytes32(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32).raw(v)
    }
}

/// Reads little-endian fields from a slice; every read is bounds-checked and
/// reports `Corrupted` naming `what`.
#[derive(Debug)]
pub struct Dec<'a, 'w> {
    data: &'a [u8],
    pos: usize,
    what: &'w str,
}

impl<'a, 'w> Dec<'a, 'w> {
    /// A decoder over `data`; `what` names the value in errors.
    pub fn new(data: &'a [u8], what: &'w str) -> Self {
        Self { data, pos: 0, what }
    }
    /// A `Corrupted` error for this value.
    pub fn err(&self, reason: impl Into<String>) -> Error {
        Error::corrupted(
            self.what,
            format!("{} (at byte {})", reason.into(), self.pos),
        )
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(self.err(format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = self
                    .data
                    .get(self.pos..end)
                    .ok_or_else(|| self.err("truncated"))?;
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated: wanted {n} bytes, {} left",
                self.remaining()
            ))),
        }
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        <[u8; N]>::try_from(s).map_err(|_| self.err("truncated"))
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    /// u16 LE.
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    /// u32 LE.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// u64 LE.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// i64 LE.
    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// 32 bytes (an id).
    pub fn id(&mut self) -> Result<[u8; 32]> {
        self.array()
    }
    /// Bytes with a u16 length prefix.
    pub fn bytes16(&mut self) -> Result<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    /// Bytes with a u32 length prefix.
    pub fn bytes32(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// UTF-8 text with a u32 length prefix.
    pub fn str32(&mut self) -> Result<String> {
        let b = self.bytes32()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("text is not UTF-8"))
    }
    /// UTF-8 text with a u16 length prefix.
    pub fn str16(&mut self) -> Result<String> {
        let b = self.bytes16()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("text is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let mut e = Enc::default();
        e.u8(1)
            .u16(2)
            .u32(3)
            .u64(4)
            .i64(-5)
            .bytes16(b"ab")
            .bytes32(b"cde");
        let mut d = Dec::new(&e.buf, "test");
        assert_eq!(d.u8().unwrap(), 1);
        assert_eq!(d.u16().unwrap(), 2);
        assert_eq!(d.u32().unwrap(), 3);
        assert_eq!(d.u64().unwrap(), 4);
        assert_eq!(d.i64().unwrap(), -5);
        assert_eq!(d.bytes16().unwrap(), b"ab");
        assert_eq!(d.bytes32().unwrap(), b"cde");
        d.finish().unwrap();
        let mut short = Dec::new(&e.buf[..5], "short");
        short.u8().unwrap();
        short.u16().unwrap();
        assert!(matches!(short.u32(), Err(Error::Corrupted { .. })));
    }
}
