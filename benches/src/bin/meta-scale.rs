//! `meta-scale`: one file changed in a 1,000,000-file dataset — how many
//! bytes of new metadata, and how long a diff of the two versions takes.
//! Two layouts: one flat folder of 1M files, and 1,000 folders × 1,000.

use std::collections::BTreeMap;
use std::time::Instant;

use dsv_store::id::hash;
use dsv_store::object::{Entry, EntryTarget, FileObject, Object};
use dsv_store::tree::{build_dir, Change, Pending};
use dsv_store::{ObjectId, RepoConfig, Store, StoreOptions};

fn file_entry(name: String, i: u64, p: &mut Pending) -> Entry {
    let f = FileObject {
        size: 4096,
        chunks: vec![(dsv_store::ChunkId(hash(&i.to_le_bytes())), 4096)],
    };
    let id = p.put(Object::File(f));
    Entry {
        name: name.into_bytes(),
        mode: 0o644,
        size: 4096,
        target: EntryTarget::File(id),
    }
}

fn run(label: &str, nested: bool) {
    let t = tempfile::tempdir().expect("tmp");
    let store = Store::init(
        &t.path().join(".dsv"),
        RepoConfig::default(),
        StoreOptions::default(),
    )
    .expect("init");
    let started = Instant::now();
    let mut pending = Pending::default();
    let root: ObjectId = if nested {
        let mut dirs = Vec::new();
        for d in 0..1000u64 {
            let mut files: Vec<Entry> = (0..1000u64)
                .map(|f| file_entry(format!("f{f:04}.bin"), d * 1000 + f, &mut pending))
                .collect();
            files.sort_by(|a, b| a.name.cmp(&b.name));
            let (id, s) = build_dir(&mut pending, files, 0);
            dirs.push(Entry {
                name: format!("d{d:04}").into_bytes(),
                mode: 0o755,
                size: s.total_size,
                target: EntryTarget::Dir {
                    id,
                    file_count: s.file_count,
                },
            });
        }
        build_dir(&mut pending, dirs, 0).0
    } else {
        let mut files: Vec<Entry> = (0..1_000_000u64)
            .map(|f| file_entry(format!("f{f:07}.bin"), f, &mut pending))
            .collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        build_dir(&mut pending, files, 0).0
    };
    let written = store.write_objects(&pending).expect("write");
    drop(pending);
    let draft = store.create_draft(&[]).expect("draft");
    store.set_draft_root(&draft, root).expect("root");
    let v1 = store
        .finalize(&draft, "1M files", BTreeMap::new(), &mut |_, _, _| Ok(()))
        .expect("finalize");
    let build_s = started.elapsed().as_secs_f64();

    let draft = store.create_draft(&[v1.id]).expect("draft");
    let mut p = Pending::default();
    let path = if nested {
        "d0500/f0500.bin".to_string()
    } else {
        "f0500000.bin".to_string()
    };
    let e = file_entry("x".into(), 99_999_999, &mut p);
    store.write_objects(&p).expect("file object");
    let report = store
        .stage_changes(&draft, vec![(path.into_bytes(), Change::Set(e))])
        .expect("stage");
    let v2 = store
        .finalize(&draft, "one change", BTreeMap::new(), &mut |_, _, _| Ok(()))
        .expect("finalize");
    let mut times = Vec::new();
    for _ in 0..21 {
        let t0 = Instant::now();
        let d = store.diff_versions(&v1.id, &v2.id).expect("diff");
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(d.modified.len(), 1);
    }
    times.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    println!(
        "{label}: {} files ({} MB of tree metadata, built in {build_s:.1} s); one file changed: \
         {} bytes of new metadata (draft) / {} (version delta); diff median {:.2} ms, max {:.2} ms",
        v1.object.file_count,
        written / 1_000_000,
        report.stored_bytes,
        v2.object.delta.stored_bytes,
        times[times.len() / 2],
        times[times.len() - 1]
    );
}

fn main() {
    run("flat folder", false);
    run("1000 x 1000 folders", true);
}
