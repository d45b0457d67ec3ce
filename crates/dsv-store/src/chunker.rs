//! Content-defined chunking: a gear rolling hash with FastCDC's normalized
//! chunking and cut-point skipping.
//!
//! A cut is placed after byte `i` when the top bits of the gear hash are all
//! zero. Before the average size a harder mask (2 more bits) is used, after it
//! an easier one (2 fewer bits), which narrows the size distribution around
//! the average. The first `min` bytes of a chunk are never hashed (they cannot
//! hold a cut), which is where most of the speed comes from. Because the hash
//! depends only on the last 64 bytes, boundaries re-synchronise within one
//! chunk after an insertion or deletion.
//!
//! The gear table is derived from a fixed seed with splitmix64; it is part of
//! the repository's dedup contract (changing it changes every boundary, not
//! the format), see `docs/FORMAT.md`.

use serde::{Deserialize, Serialize};

/// Chunk size bounds, recorded in the repository's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    /// No chunk is shorter, except a file's last one.
    pub min_size: u32,
    /// Target average; must be a power of two.
    pub avg_size: u32,
    /// No chunk is longer.
    pub max_size: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        Self {
            min_size: 16 * 1024,
            avg_size: 64 * 1024,
            max_size: 256 * 1024,
        }
    }
}

impl ChunkerParams {
    /// Checks the bounds: `64 <= min <= avg <= max <= 16 MiB`, avg a power of two.
    pub fn validate(&self) -> Result<(), String> {
        let Self {
            min_size,
            avg_size,
            max_size,
        } = *self;
        if !avg_size.is_power_of_two() {
            return Err(format!(
                "average chunk size {avg_size} is not a power of two"
            ));
        }
        if !(64 <= min_size && min_size <= avg_size && avg_size <= max_size) {
            return Err(format!(
                "chunk sizes must satisfy 64 <= min ({min_size}) <= avg ({avg_size}) <= max ({max_size})"
            ));
        }
        if max_size > 16 * 1024 * 1024 {
            return Err(format!("maximum chunk size {max_size} exceeds 16 MiB"));
        }
        Ok(())
    }

    fn masks(&self) -> (u64, u64) {
        let bits = self.avg_size.trailing_zeros();
        let hard = (bits + 2).min(63);
        let easy = bits.saturating_sub(2).max(1);
        (top_bits(hard), top_bits(easy))
    }
}

fn top_bits(n: u32) -> u64 {
    !0u64 << (64 - n)
}

const fn splitmix64(state: u64) -> (u64, u64) {
    let s = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (s, z ^ (z >> 31))
}

const fn gear_table() -> [u64; 256] {
    let mut table = [0u64; 256];
    // Seed: ASCII "dsv-gear" as a little-endian u64.
    let mut state = u64::from_le_bytes(*b"dsv-gear");
    let mut i = 0;
    while i < 256 {
        let (s, v) = splitmix64(state);
        state = s;
        table[i] = v;
        i += 1;
    }
    table
}

/// The 256-entry gear table.
pub static GEAR: [u64; 256] = gear_table();

/// A chunker with precomputed masks.
#[derive(Debug, Clone, Copy)]
pub struct Chunker {
    params: ChunkerParams,
    mask_hard: u64,
    mask_easy: u64,
}

impl Chunker {
    /// A chunker for validated `params`.
    pub fn new(params: ChunkerParams) -> Self {
        let (mask_hard, mask_easy) = params.masks();
        Self {
            params,
            mask_hard,
            mask_easy,
        }
    }

    /// The parameters.
    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Length of the first chunk of `data`, treating `data` as the rest of
    /// the file (the end of `data` is the end of the file).
    #[inline]
    pub fn cut(&self, data: &[u8]) -> usize {
        let n = data.len();
        let min = self.params.min_size as usize;
        if n <= min {
            return n;
        }
        let max = n.min(self.params.max_size as usize);
        let normal = max.min(self.params.avg_size as usize);
        let mut h: u64 = 0;
        if normal > min {
            for (j, &b) in data[min..normal].iter().enumerate() {
                h = (h << 1).wrapping_add(GEAR[b as usize]);
                if h & self.mask_hard == 0 {
                    return min + j + 1;
                }
            }
        }
        let start = normal.max(min);
        for (j, &b) in data[start..max].iter().enumerate() {
            h = (h << 1).wrapping_add(GEAR[b as usize]);
            if h & self.mask_easy == 0 {
                return start + j + 1;
            }
        }
        max
    }

    /// Lengths of all chunks of a whole file held in `data`.
    pub fn chunk_lengths(&self, data: &[u8]) -> Vec<usize> {
        let mut out = Vec::with_capacity(data.len() / self.params.avg_size as usize + 1);
        let mut off = 0;
        while off < data.len() {
            let len = self.cut(&data[off..]);
            out.push(len);
            off += len;
        }
        out
    }

    /// Cuts as many chunks as are final in `window`, a piece of a file that
    /// does not reach its end: a cut is final once `max_size` bytes follow
    /// its start inside the window. Returns the chunk lengths; the rest of
    /// the window must be carried into the next one.
    pub fn cut_window(&self, window: &[u8], out: &mut Vec<usize>) -> usize {
        let max = self.params.max_size as usize;
        let mut off = 0;
        while window.len() - off >= max {
            let len = self.cut(&window[off..off + max]);
            out.push(len);
            off += len;
        }
        off
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            let (ns, v) = splitmix64(s);
            s = ns;
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.truncate(n);
        out
    }

    #[test]
    fn chunks_cover_the_input_within_bounds() {
        let c = Chunker::new(ChunkerParams::default());
        let data = pseudo_random(4 << 20, 1);
        let lens = c.chunk_lengths(&data);
        assert_eq!(lens.iter().sum::<usize>(), data.len());
        for (i, &l) in lens.iter().enumerate() {
            assert!(l <= 256 * 1024);
            if i + 1 < lens.len() {
                assert!(l >= 16 * 1024, "chunk {i} of {l} bytes is below min");
            }
        }
        let avg = data.len() / lens.len();
        assert!((32 * 1024..=128 * 1024).contains(&avg), "average {avg}");
    }

    #[test]
    fn window_cuts_equal_whole_cuts() {
        let c = Chunker::new(ChunkerParams::default());
        let data = pseudo_random(3 << 20, 7);
        let whole = c.chunk_lengths(&data);
        let mut lens = Vec::new();
        let mut off = 0;
        let window = 700 * 1024;
        while data.len() - off > window {
            off += c.cut_window(&data[off..off + window], &mut lens);
        }
        lens.extend(c.chunk_lengths(&data[off..]));
        assert_eq!(whole, lens);
    }

    #[test]
    fn boundaries_survive_an_insertion() {
        let c = Chunker::new(ChunkerParams::default());
        let data = pseudo_random(10 << 20, 3);
        let mut edited = data.clone();
        let mid = data.len() / 2;
        edited.splice(mid..mid, std::iter::repeat_n(0xAB, 100));
        let ids = |d: &[u8]| {
            let mut off = 0;
            let mut set = std::collections::HashSet::new();
            for l in c.chunk_lengths(d) {
                set.insert(crate::id::hash(&d[off..off + l]));
                off += l;
            }
            set
        };
        let a = ids(&data);
        let b = ids(&edited);
        let reused = b.iter().filter(|h| a.contains(*h)).count();
        assert!(
            reused * 100 >= b.len() * 95,
            "{reused} of {} reused",
            b.len()
        );
    }

    #[test]
    fn validate_rejects_bad_bounds() {
        assert!(ChunkerParams::default().validate().is_ok());
        let bad = ChunkerParams {
            min_size: 100,
            avg_size: 1000,
            max_size: 2000,
        };
        assert!(bad.validate().is_err());
        let bad = ChunkerParams {
            min_size: 8192,
            avg_size: 4096,
            max_size: 65536,
        };
        assert!(bad.validate().is_err());
    }
}
