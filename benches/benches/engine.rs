//! Criterion benchmarks of the engine's stages on this machine:
#![allow(missing_docs)] // criterion_group! generates undocumented functions
//! chunking (one core), hashing, compression, folder ingest, diff, verify.

use std::collections::BTreeMap;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dsv_store::{
    Chunker, ChunkerParams, IngestOptions, NoProgress, RepoConfig, Store, StoreOptions,
    VerifyOptions,
};

fn mixed(n: usize) -> Vec<u8> {
    let mut v = dsv_benches::noise(1, n / 2);
    v.extend(dsv_benches::text(2, n - n / 2));
    v
}

fn chunking(c: &mut Criterion) {
    let data = mixed(64 << 20);
    let chunker = Chunker::new(ChunkerParams::default());
    let mut g = c.benchmark_group("chunking");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    g.bench_function("gear_cdc_64k_one_core", |b| {
        b.iter(|| chunker.chunk_lengths(&data).len())
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let data = mixed(64 << 10);
    let mut g = c.benchmark_group("hashing");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("blake3_64k_chunk", |b| {
        b.iter(|| dsv_store::id::hash(&data))
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let text = dsv_benches::text(3, 64 << 10);
    let noise = dsv_benches::noise(4, 64 << 10);
    let mut g = c.benchmark_group("compression");
    g.throughput(Throughput::Bytes(64 << 10));
    g.bench_function("zstd3_text_64k", |b| {
        b.iter(|| dsv_store::compress::compress(&text, 3))
    });
    g.bench_function("zstd3_noise_64k", |b| {
        b.iter(|| dsv_store::compress::compress(&noise, 3))
    });
    let z = dsv_store::compress::compress(&text, 3).expect("text compresses");
    let id = dsv_store::ChunkId(dsv_store::id::hash(&text));
    g.bench_function("decode_verify_text_64k", |b| {
        b.iter(|| dsv_store::compress::decode_chunk(&id, 1, &z, text.len() as u32).expect("valid"))
    });
    g.finish();
}

fn make_folder(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for i in 0..16u64 {
        let data = if i % 2 == 0 {
            dsv_benches::noise(i, 4 << 20)
        } else {
            dsv_benches::text(i, 4 << 20)
        };
        total += data.len() as u64;
        std::fs::write(dir.join(format!("f{i}.bin")), data).expect("write");
    }
    total
}

fn ingest(c: &mut Criterion) {
    let src = tempfile::tempdir().expect("tmp");
    let total = make_folder(src.path());
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Bytes(total));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.bench_function("folder_64MiB_mixed_rocksdb", |b| {
        b.iter_batched(
            || {
                let t = tempfile::tempdir().expect("tmp");
                let s = Store::init(
                    &t.path().join(".dsv"),
                    RepoConfig::default(),
                    StoreOptions::default(),
                )
                .expect("init");
                (t, s)
            },
            |(t, s)| {
                s.commit_folder(
                    &[],
                    src.path(),
                    &IngestOptions::default(),
                    "",
                    BTreeMap::new(),
                    &mut |_, _, _| Ok(()),
                )
                .expect("commit");
                drop(s);
                t
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn diff_and_verify(c: &mut Criterion) {
    let t = tempfile::tempdir().expect("tmp");
    let data = t.path().join("data");
    for i in 0..10_000u64 {
        let p = data.join(format!("d{:02}/f{i:05}.txt", i % 50));
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, format!("row {i}\n")).expect("write");
    }
    let s = Store::init(
        &t.path().join(".dsv"),
        RepoConfig::default(),
        StoreOptions::default(),
    )
    .expect("init");
    let v1 = s
        .commit_folder(
            &[],
            &data,
            &IngestOptions::default(),
            "",
            BTreeMap::new(),
            &mut |_, _, _| Ok(()),
        )
        .expect("commit")
        .version
        .expect("new");
    for i in (0..10_000u64).step_by(1000) {
        std::fs::write(
            data.join(format!("d{:02}/f{i:05}.txt", i % 50)),
            format!("changed {i}\n"),
        )
        .expect("write");
    }
    let v2 = s
        .commit_folder(
            &[v1.id],
            &data,
            &IngestOptions::default(),
            "",
            BTreeMap::new(),
            &mut |_, _, _| Ok(()),
        )
        .expect("commit")
        .version
        .expect("new");
    let mut g = c.benchmark_group("diff");
    g.bench_function("10k_files_10_changed", |b| {
        b.iter(|| {
            s.diff_versions(&v1.id, &v2.id)
                .expect("diff")
                .modified
                .len()
        })
    });
    g.finish();

    let big = tempfile::tempdir().expect("tmp");
    let total = make_folder(big.path());
    let s2 = Store::init(
        &t.path().join("big/.dsv"),
        RepoConfig::default(),
        StoreOptions::default(),
    )
    .expect("init");
    s2.commit_folder(
        &[],
        big.path(),
        &IngestOptions::default(),
        "",
        BTreeMap::new(),
        &mut |_, _, _| Ok(()),
    )
    .expect("commit");
    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Bytes(total));
    g.sample_size(10);
    g.bench_function("read_data_64MiB", |b| {
        b.iter(|| {
            assert!(s2
                .verify(VerifyOptions { read_data: true }, &NoProgress)
                .expect("verify")
                .ok())
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    chunking,
    hashing,
    compression,
    ingest,
    diff_and_verify
);
criterion_main!(benches);
