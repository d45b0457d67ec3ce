//! Where should chunk bytes live? Writes the same 512 MiB of 64 KiB chunks
//! three ways and prints wall time and bytes written to disk
//! (`/proc/self/io`), before and after deleting half and reclaiming space:
//!
//! 1. pack files + a RocksDB index (dsv's design),
//! 2. RocksDB values (inline, in the LSM tree),
//! 3. RocksDB BlobDB (key-value separation).
//!
//! Run: `cargo run --release -p dsv-store --example chunk_store_bench`

use std::time::Instant;

use dsv_store::pack::PackWriter;
use dsv_store::ChunkId;
use rocksdb::{Options, WriteBatch, WriteOptions, DB};

const CHUNK: usize = 64 << 10;
const COUNT: usize = 8192;

fn io_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("write_bytes:"))
                .and_then(|l| l[12..].trim().parse().ok())
        })
        .unwrap_or(0)
}

fn chunks() -> Vec<(ChunkId, Vec<u8>)> {
    let mut s = 0x1234_5678_9abc_def1u64;
    (0..COUNT)
        .map(|_| {
            let mut v = vec![0u8; CHUNK];
            for c in v.chunks_mut(8) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                c.copy_from_slice(&s.to_le_bytes());
            }
            (ChunkId(dsv_store::id::hash(&v)), v)
        })
        .collect()
}

fn report(name: &str, t: Instant, w0: u64) {
    let secs = t.elapsed().as_secs_f64();
    let mb = (COUNT * CHUNK) as f64 / 1e6;
    println!(
        "{name:<34} {secs:6.2} s  {:7.0} MB/s  {:8.1} MB written",
        mb / secs,
        (io_written() - w0) as f64 / 1e6
    );
}

fn rocks(path: &std::path::Path, blob: bool) -> DB {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_write_buffer_size(64 << 20);
    if blob {
        o.set_enable_blob_files(true);
        o.set_min_blob_size(4096);
        o.set_enable_blob_gc(true);
        o.set_blob_gc_age_cutoff(1.0);
    }
    DB::open(&o, path).expect("open")
}

fn main() {
    let data = chunks();
    let tmp = tempfile::tempdir().expect("tmp");

    // 1. Packs + index.
    let dir = tmp.path().join("packs");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let db = rocks(&tmp.path().join("index"), false);
    let (t, w0) = (Instant::now(), io_written());
    let w = PackWriter::new(&dir, 128 << 20);
    let mut batch = WriteBatch::default();
    for (id, v) in &data {
        let loc = w.append(id, 0, v.len() as u32, v).expect("append");
        batch.put(id.as_bytes(), loc.encode());
    }
    let held = w.finish().expect("finish");
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo).expect("write");
    drop(held);
    report("packs + RocksDB index: write", t, w0);
    let (t, w0) = (Instant::now(), io_written());
    // Reclaim half: rewrite the live half into new packs (what gc does).
    let w = PackWriter::new(&dir, 128 << 20);
    let mut batch = WriteBatch::default();
    for (i, (id, v)) in data.iter().enumerate() {
        if i % 2 == 0 {
            batch.delete(id.as_bytes());
        } else {
            let loc = w.append(id, 0, v.len() as u32, v).expect("append");
            batch.put(id.as_bytes(), loc.encode());
        }
    }
    let held = w.finish().expect("finish");
    db.write_opt(batch, &wo).expect("write");
    drop(held);
    report("packs + RocksDB index: gc half", t, w0);
    drop(db);

    // 2 and 3. RocksDB values, inline and in blob files.
    for (name, blob) in [("RocksDB inline values", false), ("RocksDB BlobDB", true)] {
        let db = rocks(&tmp.path().join(name.replace(' ', "-")), blob);
        let (t, w0) = (Instant::now(), io_written());
        for part in data.chunks(256) {
            let mut batch = WriteBatch::default();
            for (id, v) in part {
                batch.put(id.as_bytes(), v);
            }
            db.write_opt(batch, &wo).expect("write");
        }
        db.flush().expect("flush");
        report(&format!("{name}: write"), t, w0);
        let (t, w0) = (Instant::now(), io_written());
        let mut batch = WriteBatch::default();
        for (id, _) in data.iter().step_by(2) {
            batch.delete(id.as_bytes());
        }
        db.write_opt(batch, &wo).expect("write");
        db.flush().expect("flush");
        db.compact_range::<&[u8], &[u8]>(None, None);
        report(&format!("{name}: gc half"), t, w0);
    }
}
