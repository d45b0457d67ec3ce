//! Deterministic data generators for the benchmarks and the peer
//! comparison: the same bytes for every tool and every run.

use std::io::Write;
use std::path::Path;

/// A small, fast deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
    /// Fills a buffer with noise.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// `n` bytes of incompressible noise.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Rng::new(seed).fill(&mut v);
    v
}

/// `n` bytes of compressible, log-like text (zstd -3 shrinks it ~4-6x).
pub fn text(seed: u64, n: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut out = Vec::with_capacity(n + 128);
    let levels = ["INFO", "WARN", "DEBUG", "ERROR"];
    let words = [
        "sensor", "batch", "label", "frame", "camera", "upload", "model", "queue", "worker",
        "shard",
    ];
    while out.len() < n {
        let t = 1_700_000_000 + out.len() as u64 / 40;
        let _ = writeln!(
            out,
            "{t} {} {}-{} id={:08x} value={}.{:03} ok",
            levels[r.range(0, 4) as usize],
            words[r.range(0, 10) as usize],
            words[r.range(0, 10) as usize],
            r.next_u64() as u32,
            r.range(0, 1000),
            r.range(0, 1000)
        );
    }
    out.truncate(n);
    out
}

/// Minute-level sensor rows like the occupancy data, `rows` of them.
pub fn csv_rows(seed: u64, start_minute: u64, rows: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut out = Vec::with_capacity(rows * 80);
    let (mut t, mut h, mut l, mut c) = (21.0f64, 27.0f64, 0.0f64, 450.0f64);
    for i in 0..rows as u64 {
        let m = start_minute + i;
        t += (r.range(0, 21) as f64 - 10.0) * 0.005;
        h += (r.range(0, 21) as f64 - 10.0) * 0.01;
        l = if (m / 60) % 24 > 8 && (m / 60) % 24 < 18 {
            400.0 + r.range(0, 200) as f64
        } else {
            (l * 0.5).floor()
        };
        c += (r.range(0, 21) as f64 - 10.0) * 0.8;
        let occ = u8::from(l > 300.0);
        let _ = writeln!(
            out,
            "\"{}\",\"2015-02-{:02} {:02}:{:02}:00\",{t:.3},{h:.4},{l:.1},{c:.2},{:.17},{occ}",
            i + 1,
            2 + (m / 1440) % 27,
            (m / 60) % 24,
            m % 60,
            0.0045 + h * 0.00001
        );
    }
    out
}

/// The CSV header used by [`csv_rows`].
pub const CSV_HEADER: &[u8] =
    b"\"date\",\"Temperature\",\"Humidity\",\"Light\",\"CO2\",\"HumidityRatio\",\"Occupancy\"\n";

fn write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(path, data)
}

/// 40 binary files totalling `total` bytes: 20 of noise, 20 of text.
pub fn gen_binary(dir: &Path, total: u64) -> std::io::Result<()> {
    let each = (total / 40) as usize;
    for i in 0..40u64 {
        let data = if i % 2 == 0 {
            noise(i, each)
        } else {
            text(i, each)
        };
        write(&dir.join(format!("blob-{i:02}.bin")), &data)?;
    }
    Ok(())
}

/// 2,000 CSV files of minute-level sensor rows (~82 KB each, ~164 MB).
pub fn gen_csv(dir: &Path, files: usize, rows: usize) -> std::io::Result<()> {
    for i in 0..files {
        let mut data = CSV_HEADER.to_vec();
        data.extend(csv_rows(i as u64, i as u64 * rows as u64, rows));
        write(
            &dir.join(format!("site-{:02}/sensor-{i:04}.csv", i % 20)),
            &data,
        )?;
    }
    Ok(())
}

/// `files` files of 1–8 KB in nested folders (half text, half noise).
pub fn gen_small(dir: &Path, files: usize) -> std::io::Result<()> {
    let mut r = Rng::new(7);
    for i in 0..files {
        let n = r.range(1024, 8193) as usize;
        let data = if i % 2 == 0 {
            text(i as u64, n)
        } else {
            noise(i as u64, n)
        };
        write(
            &dir.join(format!(
                "d{:02}/s{:02}/item-{i:05}.dat",
                i % 25,
                (i / 25) % 10
            )),
            &data,
        )?;
    }
    Ok(())
}

/// Inserts 100 bytes into the middle of 5 binary files and overwrites 4 KB
/// in 5 others.
pub fn edit_binary(dir: &Path) -> std::io::Result<()> {
    for i in 0..10u64 {
        let p = dir.join(format!("blob-{:02}.bin", i * 4));
        let mut data = std::fs::read(&p)?;
        let mid = data.len() / 2;
        if i < 5 {
            data.splice(mid..mid, noise(1000 + i, 100));
        } else {
            data[mid..mid + 4096].copy_from_slice(&noise(2000 + i, 4096));
        }
        std::fs::write(&p, data)?;
    }
    Ok(())
}

/// Appends 60 rows to 10 % of the CSV files and adds 50 new ones.
pub fn append_csv(dir: &Path, files: usize, rows: usize) -> std::io::Result<()> {
    for i in (0..files).step_by(10) {
        let p = dir.join(format!("site-{:02}/sensor-{i:04}.csv", i % 20));
        let mut f = std::fs::OpenOptions::new().append(true).open(&p)?;
        f.write_all(&csv_rows(10_000 + i as u64, (i * rows + rows) as u64, 60))?;
    }
    for j in 0..50 {
        let i = files + j;
        let mut data = CSV_HEADER.to_vec();
        data.extend(csv_rows(i as u64, i as u64 * rows as u64, rows));
        write(
            &dir.join(format!("site-{:02}/sensor-{i:04}.csv", i % 20)),
            &data,
        )?;
    }
    Ok(())
}

/// Writes one `size`-byte file of mixed noise and text, block by block.
pub fn gen_big_file(path: &Path, size: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path)?);
    let block = 4 << 20;
    let mut written = 0u64;
    let mut i = 0u64;
    while written < size {
        let n = block.min((size - written) as usize);
        let data = if i % 2 == 0 { noise(i, n) } else { text(i, n) };
        f.write_all(&data)?;
        written += n as u64;
        i += 1;
    }
    f.flush()
}
