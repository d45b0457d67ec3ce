//! Typed 32-byte BLAKE3 identifiers.
//!
//! Every id is a newtype over `[u8; 32]` made by one macro, so a `ChunkId`
//! can never be passed where a `VersionId` is expected. Ids print as 64
//! lower-case hex digits and parse from the same; prefix lookups are done by
//! the store (see [`crate::Store::resolve_version_prefix`]).

use std::fmt;
use std::str::FromStr;

/// Length in bytes of every id.
pub const ID_LEN: usize = 32;

/// An id string that is not 64 hex digits (or a prefix that is not hex).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id '{input}': {reason}")]
pub struct ParseIdError {
    /// The text that failed to parse.
    pub input: String,
    /// Why it failed.
    pub reason: &'static str,
}

macro_rules! define_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; ID_LEN]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; ID_LEN] {
                &self.0
            }
            /// Builds an id from a 32-byte slice; `None` when the length is wrong.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                <[u8; ID_LEN]>::try_from(bytes).ok().map(Self)
            }
            /// Lower-case hex, 64 digits.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            /// The first `n` hex digits (for display).
            pub fn short(&self, n: usize) -> String {
                let mut s = self.to_hex();
                s.truncate(n);
                s
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short(12))
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                if s.len() != ID_LEN * 2 {
                    return Err(ParseIdError { input: s.to_string(), reason: "expected 64 hex digits" });
                }
                let mut out = [0u8; ID_LEN];
                hex::decode_to_slice(s, &mut out)
                    .map_err(|_| ParseIdError { input: s.to_string(), reason: "not hexadecimal" })?;
                Ok(Self(out))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

define_id!(
    /// BLAKE3 of a chunk's uncompressed bytes.
    ChunkId
);
define_id!(
    /// BLAKE3 of an object's canonical encoding (file manifest or tree node).
    ObjectId
);
define_id!(
    /// BLAKE3 of a version object's canonical encoding.
    VersionId
);
define_id!(
    /// Random id of a draft (a writable staging area).
    DraftId
);

impl DraftId {
    /// A fresh random draft id: 32 bytes from the operating system's random
    /// generator, so ids made on different machines (or by processes that
    /// share a pid and a clock) never collide.
    pub fn random() -> crate::error::Result<Self> {
        random_bytes().map(Self)
    }
}

/// `N` bytes from the operating system's random generator ([`os_random`]).
pub fn random_bytes<const N: usize>() -> crate::error::Result<[u8; N]> {
    let mut b = [0u8; N];
    os_random(&mut b).map_err(crate::error::Error::Random)?;
    Ok(b)
}

/// Fills `buf` from the operating system's random generator: the
/// `getrandom(2)` system call (which waits only until the kernel's pool is
/// first initialized, early in boot), or `/dev/urandom` on kernels without
/// it. Never a time- or pid-derived value.
pub fn os_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // slice; the kernel writes at most `rest.len()` bytes into it.
        #[allow(unsafe_code)]
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOSYS) => return urandom(rest),
                _ => return Err(e),
            }
        }
        filled += n as usize;
    }
    Ok(())
}

fn urandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// A parsed hex prefix (1..=64 hex digits) used for unique-prefix lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HexPrefix {
    /// Whole bytes of the prefix.
    pub bytes: Vec<u8>,
    /// The high nibble of a trailing odd digit, if any.
    pub odd_nibble: Option<u8>,
    text: String,
}

impl HexPrefix {
    /// Parses a prefix; rejects empty, over-long or non-hex input.
    pub fn parse(s: &str) -> Result<Self, ParseIdError> {
        let err = |reason| ParseIdError {
            input: s.to_string(),
            reason,
        };
        if s.is_empty() || s.len() > ID_LEN * 2 {
            return Err(err("expected 1 to 64 hex digits"));
        }
        let lower = s.to_ascii_lowercase();
        let even = lower.len() / 2 * 2;
        let bytes = hex::decode(&lower[..even]).map_err(|_| err("not hexadecimal"))?;
        let odd_nibble = if lower.len() % 2 == 1 {
            let c = lower.as_bytes()[lower.len() - 1];
            Some(
                (c as char)
                    .to_digit(16)
                    .ok_or_else(|| err("not hexadecimal"))? as u8,
            )
        } else {
            None
        };
        Ok(Self {
            bytes,
            odd_nibble,
            text: lower,
        })
    }

    /// Whether the full id bytes start with this prefix.
    pub fn matches(&self, id: &[u8]) -> bool {
        if !id.starts_with(&self.bytes) {
            return false;
        }
        match self.odd_nibble {
            None => true,
            Some(n) => id.get(self.bytes.len()).is_some_and(|b| b >> 4 == n),
        }
    }

    /// The prefix as typed (lower-cased).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// BLAKE3 of `data`.
pub fn hash(data: &[u8]) -> [u8; ID_LEN] {
    *blake3::hash(data).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ChunkId(hash(b"abc"));
        let parsed: ChunkId = id.to_hex().parse().unwrap();
        assert_eq!(id, parsed);
        assert!("xyz".parse::<ChunkId>().is_err());
        assert!(format!("{:?}", id).starts_with("ChunkId("));
    }

    #[test]
    fn prefix_matching() {
        let id = ObjectId(hash(b"abc"));
        let hex = id.to_hex();
        for n in 1..=64 {
            let p = HexPrefix::parse(&hex[..n]).unwrap();
            assert!(p.matches(id.as_bytes()), "prefix of length {n}");
        }
        let other = HexPrefix::parse(if hex.starts_with('0') { "1" } else { "0" }).unwrap();
        assert!(!other.matches(id.as_bytes()));
        assert!(HexPrefix::parse("").is_err());
        assert!(HexPrefix::parse("zz").is_err());
    }

    #[test]
    fn draft_ids_are_unique() {
        let a = DraftId::random().unwrap();
        let b = DraftId::random().unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn os_random_fills_the_whole_buffer_and_differs_each_call() {
        // 64 bytes that are all zero after the call would mean the buffer
        // was not written (odds 2^-512 otherwise).
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        os_random(&mut a).unwrap();
        os_random(&mut b).unwrap();
        assert_ne!(a, [0u8; 64]);
        assert_ne!(a, b);
        let mut c = [0u8; 16];
        urandom(&mut c).unwrap();
        assert_ne!(c, [0u8; 16]);
    }
}
