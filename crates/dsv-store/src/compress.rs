//! zstd compression of chunks with per-thread reusable contexts.

use std::cell::RefCell;

use crate::error::{Error, Result};
use crate::id::ChunkId;

/// Chunk stored as is.
pub const CODEC_RAW: u8 = 0;
/// Chunk stored as one zstd frame.
pub const CODEC_ZSTD: u8 = 1;

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// No chunk is larger (the largest allowed `max_size`).
pub const MAX_CHUNK: usize = 16 << 20;

/// Compresses `raw` at `level`; returns `None` when compression does not
/// shrink it (the chunk is then stored raw).
pub fn compress(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    if raw.len() < 64 {
        return None;
    }
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        let (_, c) = slot.as_mut()?;
        let out = c.compress(raw).ok()?;
        (out.len() < raw.len()).then_some(out)
    })
}

/// Decodes a stored chunk into its raw bytes and checks its hash.
pub fn decode_chunk(id: &ChunkId, codec: u8, stored: &[u8], raw_len: u32) -> Result<Vec<u8>> {
    if raw_len as usize > MAX_CHUNK {
        return Err(Error::corrupted(
            format!("chunk {id}"),
            format!("declared size {raw_len} exceeds {MAX_CHUNK}"),
        ));
    }
    let raw = match codec {
        CODEC_RAW => stored.to_vec(),
        CODEC_ZSTD => DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| {
                    Error::corrupted(format!("chunk {id}"), format!("zstd init: {e}"))
                })?);
            }
            let d = slot
                .as_mut()
                .ok_or_else(|| Error::corrupted(format!("chunk {id}"), "no decompressor"))?;
            d.decompress(stored, raw_len as usize)
                .map_err(|e| Error::corrupted(format!("chunk {id}"), format!("zstd: {e}")))
        })?,
        other => {
            return Err(Error::corrupted(
                format!("chunk {id}"),
                format!("unknown codec {other}"),
            ))
        }
    };
    if raw.len() != raw_len as usize {
        return Err(Error::corrupted(
            format!("chunk {id}"),
            format!("decoded {} bytes, index says {raw_len}", raw.len()),
        ));
    }
    let got = ChunkId(crate::id::hash(&raw));
    if got != *id {
        return Err(Error::ChecksumMismatch { expected: *id, got });
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressible_round_trip_and_raw_fallback() {
        let text = b"timestamp,temperature\n".repeat(1000);
        let id = ChunkId(crate::id::hash(&text));
        let z = compress(&text, 3).expect("text compresses");
        assert!(z.len() < text.len() / 10);
        assert_eq!(
            decode_chunk(&id, CODEC_ZSTD, &z, text.len() as u32).unwrap(),
            text
        );
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let _ = compress(&noise, 3);
        let wrong = ChunkId(crate::id::hash(b"other"));
        assert!(matches!(
            decode_chunk(&wrong, CODEC_RAW, &text, text.len() as u32),
            Err(Error::ChecksumMismatch { .. })
        ));
    }
}
