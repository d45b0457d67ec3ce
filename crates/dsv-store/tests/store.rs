//! Integration tests of the storage engine over the in-memory database
//! (fast) with real pack files in a temporary folder.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use dsv_store::kv::{CrashingKv, MemKv};
use dsv_store::{
    ChunkerParams, EntryTarget, Error, GcOptions, IngestOptions, NoProgress, RepoConfig, StageMode,
    Store, StoreOptions, VerifyOptions,
};
use proptest::prelude::*;

fn small_config() -> RepoConfig {
    RepoConfig {
        chunking: ChunkerParams {
            min_size: 256,
            avg_size: 1024,
            max_size: 4096,
        },
        ..RepoConfig::default()
    }
}

fn mem_store(dir: &Path, kv: MemKv, config: RepoConfig) -> Store {
    Store::init_with_backend(
        &dir.join(".dsv"),
        config,
        Box::new(kv),
        StoreOptions::default(),
    )
    .unwrap()
}

fn reopen(dir: &Path, kv: MemKv) -> Store {
    Store::open_with_backend(&dir.join(".dsv"), Box::new(kv), StoreOptions::default()).unwrap()
}

fn age(path: &Path) {
    let past = SystemTime::now() - Duration::from_secs(60);
    for e in walk(path) {
        if e.is_file() {
            std::fs::File::options()
                .write(true)
                .open(&e)
                .unwrap()
                .set_modified(past)
                .unwrap();
        }
    }
}

fn walk(path: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

fn write_tree(root: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (p, data) in files {
        let full = root.join(p);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, data).unwrap();
    }
}

fn snapshot(store: &Store, folder: &Path) -> dsv_store::Version {
    let draft = store.create_draft(&[]).unwrap();
    store
        .stage_folder(&draft, folder, &IngestOptions::default())
        .unwrap();
    store
        .finalize(&draft, "snap", BTreeMap::new(), &mut |_, _, _| Ok(()))
        .unwrap()
}

fn read_back(store: &Store, root: &dsv_store::ObjectId) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut files = Vec::new();
    store
        .walk_files(root, &mut |p, e| {
            files.push((String::from_utf8_lossy(p).into_owned(), e.clone()));
            Ok(())
        })
        .unwrap();
    for (p, e) in files {
        let mut buf = Vec::new();
        match e.target {
            EntryTarget::File(id) => {
                store.read_file_to(&id, &mut buf).unwrap();
            }
            EntryTarget::Symlink(t) => buf = t,
            EntryTarget::Dir { .. } => unreachable!("walk_files yields no directories"),
        }
        out.insert(p, buf);
    }
    out
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    // Half compressible text, half noise, so both codecs are exercised.
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (i / 512) % 2 == 0 {
                b"sensor,reading\n"[i % 15]
            } else {
                (s >> 33) as u8
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn ingested_trees_read_back_byte_identical(
        files in prop::collection::btree_map("[a-c]{1,2}(/[a-d]{1,3}){0,2}\\.bin", (0u64..1000, 0usize..20_000), 1..25)
    ) {
        // Drop paths that are prefixes of other paths (a file cannot also be a folder).
        let mut tree: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (p, (seed, len)) in &files {
            let clash = files.keys().any(|o| o != p && (o.starts_with(&format!("{p}/")) || p.starts_with(&format!("{o}/"))));
            if !clash {
                tree.insert(p.clone(), content(*seed, *len));
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        write_tree(&data, &tree);
        let store = mem_store(tmp.path(), MemKv::new(), small_config());
        let v = snapshot(&store, &data);
        prop_assert_eq!(read_back(&store, &v.object.root), tree.clone());
        prop_assert_eq!(v.object.file_count, tree.len() as u64);
        prop_assert_eq!(v.object.total_bytes, tree.values().map(|d| d.len() as u64).sum::<u64>());
        let report = store.verify(VerifyOptions { read_data: true }, &NoProgress).unwrap();
        prop_assert!(report.ok(), "{:?}", report.problems);
    }
}

#[test]
fn an_insertion_in_a_large_file_reuses_most_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let original = content(42, 10 << 20)
        .into_iter()
        .enumerate()
        .map(|(i, b)| b ^ (i as u8).wrapping_mul(31))
        .collect::<Vec<u8>>();
    std::fs::write(data.join("big.bin"), &original).unwrap();
    let store = mem_store(tmp.path(), MemKv::new(), RepoConfig::default());
    let v1 = snapshot(&store, &data);
    let mut edited = original.clone();
    edited.splice(5 << 20..5 << 20, std::iter::repeat_n(7u8, 100));
    std::fs::write(data.join("big.bin"), &edited).unwrap();
    let draft = store.create_draft(&[v1.id]).unwrap();
    store
        .stage_folder(&draft, &data, &IngestOptions::default())
        .unwrap();
    let v2 = store
        .finalize(&draft, "edit", BTreeMap::new(), &mut |_, _, _| Ok(()))
        .unwrap();
    let chunks = |v: &dsv_store::Version| {
        let e = store.lookup(&v.object.root, b"big.bin").unwrap().unwrap();
        let EntryTarget::File(id) = e.target else {
            panic!("not a file")
        };
        store.file_object(&id).unwrap().chunks
    };
    let (a, b) = (chunks(&v1), chunks(&v2));
    let old: std::collections::HashSet<_> = a.iter().map(|c| c.0).collect();
    let reused = b.iter().filter(|c| old.contains(&c.0)).count();
    assert!(
        reused * 100 >= b.len() * 95,
        "{reused} of {} chunks reused",
        b.len()
    );
    assert!(
        v2.object.delta.stored_bytes < 600 * 1024,
        "stored {} new bytes",
        v2.object.delta.stored_bytes
    );
    assert_eq!(v2.object.delta.modified, 1);
    let mut out = Vec::new();
    store.cat(&v2.object.root, b"big.bin", &mut out).unwrap();
    assert!(out == edited, "edited file reads back");
}

#[test]
fn renaming_a_folder_stores_almost_nothing_and_reports_renames() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut tree = BTreeMap::new();
    for i in 0..1000 {
        tree.insert(format!("batch-a/img{i:04}.raw"), content(i, 3000));
    }
    write_tree(&data, &tree);
    let store = mem_store(tmp.path(), MemKv::new(), RepoConfig::default());
    let v1 = snapshot(&store, &data);
    std::fs::rename(data.join("batch-a"), data.join("batch-b")).unwrap();
    let draft = store.create_draft(&[v1.id]).unwrap();
    store
        .stage_folder(&draft, &data, &IngestOptions::default())
        .unwrap();
    let v2 = store
        .finalize(&draft, "rename", BTreeMap::new(), &mut |_, _, _| Ok(()))
        .unwrap();
    assert_eq!(v2.object.delta.renamed, 1000);
    assert_eq!(
        v2.object.delta.added + v2.object.delta.removed + v2.object.delta.modified,
        0
    );
    let folder_bytes: u64 = tree.values().map(|d| d.len() as u64).sum();
    assert!(
        v2.object.delta.stored_bytes * 100 < folder_bytes,
        "stored {} of {folder_bytes}",
        v2.object.delta.stored_bytes
    );
    let diff = store.diff_versions(&v1.id, &v2.id).unwrap();
    assert_eq!(diff.renamed[0].from, b"batch-a/img0000.raw");
    assert_eq!(diff.renamed[0].to, b"batch-b/img0000.raw");
}

#[test]
fn unchanged_folder_is_not_rehashed_and_changes_are_seen() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut tree = BTreeMap::new();
    for i in 0..50 {
        tree.insert(format!("d{}/f{i}.csv", i % 5), content(i, 2000));
    }
    write_tree(&data, &tree);
    age(&data);
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let draft = store.create_draft(&[]).unwrap();
    let first = store
        .stage_folder(&draft, &data, &IngestOptions::default())
        .unwrap();
    assert_eq!(first.files_hashed, 50);
    assert_eq!(first.diff.added.len(), 50);
    let again = store
        .stage_folder(&draft, &data, &IngestOptions::default())
        .unwrap();
    assert_eq!(again.files_hashed, 0, "stat cache skips unchanged files");
    assert!(again.diff.is_empty() && !again.committed);
    // Same size, new content, new mtime: must be noticed.
    let p = data.join("d0/f0.csv");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&p, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(5))
        .unwrap();
    let third = store
        .stage_folder(&draft, &data, &IngestOptions::default())
        .unwrap();
    assert_eq!(third.files_hashed, 1);
    assert_eq!(third.diff.modified.len(), 1);
}

#[test]
fn a_whole_second_mtime_is_trusted_only_two_seconds_later() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut tree = BTreeMap::new();
    tree.insert("coarse.csv".to_string(), content(1, 3000));
    tree.insert("fine.csv".to_string(), content(2, 3000));
    write_tree(&data, &tree);
    let set = |name: &str, t: SystemTime| {
        std::fs::File::options()
            .write(true)
            .open(data.join(name))
            .unwrap()
            .set_modified(t)
            .unwrap();
    };
    let since_epoch = (SystemTime::now() - Duration::from_millis(500))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    // The current whole second (what a coarse file system stores: under
    // 1 s old, a second of slack before the 2 s margin), and 0.5 s old with
    // sub-second digits (past the 100 ms margin).
    let now_s = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    set(
        "coarse.csv",
        SystemTime::UNIX_EPOCH + Duration::from_secs(now_s),
    );
    let mut fine = since_epoch;
    if fine.subsec_nanos() == 0 {
        fine += Duration::from_millis(1);
    }
    set("fine.csv", SystemTime::UNIX_EPOCH + fine);
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let draft = store.create_draft(&[]).unwrap();
    let first = store
        .stage_folder(&draft, &data, &IngestOptions::default())
        .unwrap();
    assert_eq!(first.files_hashed, 2);
    let again = store
        .stage_folder(&draft, &data, &IngestOptions::default())
        .unwrap();
    assert_eq!(
        again.files_hashed, 1,
        "the whole-second mtime is not trusted yet, the fine one is"
    );
}

#[test]
fn add_mode_keeps_and_sync_mode_removes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_tree(
        &a,
        &[
            ("x.txt".to_string(), b"x".to_vec()),
            ("y.txt".to_string(), b"y".to_vec()),
        ]
        .into(),
    );
    write_tree(
        &b,
        &[
            ("y.txt".to_string(), b"Y".to_vec()),
            ("z.txt".to_string(), b"z".to_vec()),
        ]
        .into(),
    );
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let draft = store.create_draft(&[]).unwrap();
    store
        .stage_folder(
            &draft,
            &a,
            &IngestOptions {
                dataset_path: "sub",
                ..Default::default()
            },
        )
        .unwrap();
    let add = IngestOptions {
        dataset_path: "sub",
        mode: StageMode::Add,
        ..Default::default()
    };
    let r = store.stage_folder(&draft, &b, &add).unwrap();
    assert_eq!(
        (
            r.diff.added.len(),
            r.diff.modified.len(),
            r.diff.removed.len()
        ),
        (1, 1, 0)
    );
    let root = store.draft(&draft).unwrap().record.root;
    let got = read_back(&store, &root);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["sub/x.txt", "sub/y.txt", "sub/z.txt"]
    );
    let r = store
        .stage_folder(
            &draft,
            &b,
            &IngestOptions {
                dataset_path: "sub",
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(r.diff.removed.len(), 1);
    assert!(matches!(
        store.stage_folder(
            &draft,
            &b,
            &IngestOptions {
                dataset_path: "../up",
                ..Default::default()
            }
        ),
        Err(Error::Invalid(_))
    ));
}

#[test]
fn symlinks_empty_entries_odd_names_and_special_files() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("empty-dir")).unwrap();
    std::fs::write(data.join("empty.txt"), b"").unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
    std::fs::write(data.join(odd), b"latin-1 name").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", data.join("outside")).unwrap();
    let fifo = data.join("pipe");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY-free: mkfifo through the shell keeps this test free of unsafe code.
    std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    drop(c);
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let draft = store.create_draft(&[]).unwrap();
    let r = store
        .stage_folder(&draft, &data, &IngestOptions::default())
        .unwrap();
    assert_eq!(r.skipped_special, vec![fifo]);
    let root = store.draft(&draft).unwrap().record.root;
    let link = store.lookup(&root, b"outside").unwrap().unwrap();
    assert_eq!(
        link.target,
        EntryTarget::Symlink(b"/etc/passwd".to_vec()),
        "stored as a link, not followed"
    );
    let dir = store.lookup(&root, b"empty-dir").unwrap().unwrap();
    assert!(dir.is_dir());
    assert_eq!(store.lookup(&root, b"empty.txt").unwrap().unwrap().size, 0);
    let mut out = Vec::new();
    store.cat(&root, b"caf\xe9.txt", &mut out).unwrap();
    assert_eq!(out, b"latin-1 name");
}

#[test]
fn bad_folders_leave_the_repository_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let kv = MemKv::new();
    let store = mem_store(tmp.path(), kv.clone(), small_config());
    let draft = store.create_draft(&[]).unwrap();
    let before = kv.snapshot();
    let missing = tmp.path().join("nope");
    let err = store
        .stage_folder(&draft, &missing, &IngestOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    let file = tmp.path().join("file.txt");
    std::fs::write(&file, b"x").unwrap();
    let err = store
        .stage_folder(&draft, &file, &IngestOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("not a folder"), "{err}");
    assert_eq!(kv.snapshot(), before);
    let packs = std::fs::read_dir(store.packs_dir()).unwrap().count();
    assert_eq!(packs, 0);
}

#[test]
fn a_flipped_byte_is_found_by_fsck_and_reads_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_tree(
        &data,
        &[
            ("a.bin".to_string(), content(1, 50_000)),
            ("b.bin".to_string(), content(2, 50_000)),
        ]
        .into(),
    );
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let v = snapshot(&store, &data);
    assert!(store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap()
        .ok());
    let e = store.lookup(&v.object.root, b"a.bin").unwrap().unwrap();
    let EntryTarget::File(fid) = e.target else {
        panic!("file expected")
    };
    let (chunk, _) = store.file_object(&fid).unwrap().chunks[3];
    let loc = store.chunk_loc(&chunk).unwrap();
    let path = dsv_store::pack::pack_path(&store.packs_dir(), loc.pack);
    let mut bytes = std::fs::read(&path).unwrap();
    let at =
        (loc.offset + dsv_store::pack::RECORD_HEADER_LEN) as usize + loc.stored_len as usize / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    // Metadata-only fsck does not read chunk data.
    assert!(store
        .verify(VerifyOptions::default(), &NoProgress)
        .unwrap()
        .ok());
    let report = store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].what, chunk.to_hex());
    assert!(
        report.problems[0].detail.contains("a.bin"),
        "{}",
        report.problems[0].detail
    );
    let err = store.read_file_to(&fid, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ChecksumMismatch { .. } | Error::Corrupted { .. }
        ),
        "{err}"
    );
    // The other file is intact.
    let mut out = Vec::new();
    store.cat(&v.object.root, b"b.bin", &mut out).unwrap();
    assert_eq!(out, content(2, 50_000));
}

/// Runs init → draft → stage → finalize → tag, crashing at write `k`.
fn scripted(tmp: &Path, data: &Path, kv: MemKv, k: usize) -> Result<(), Error> {
    let crashing = CrashingKv::new(kv, k);
    let store = Store::init_with_backend(
        &tmp.join(".dsv"),
        small_config(),
        Box::new(crashing),
        StoreOptions::default(),
    )?;
    let draft = store.create_draft(&[])?;
    store.stage_folder(&draft, data, &IngestOptions::default())?;
    let v = store.finalize(&draft, "m", BTreeMap::new(), &mut |_, v, b| {
        dsv_store::store::set_ref_batch("main", &v.id, b)
    })?;
    store.write(|_| {
        let mut b = dsv_store::Batch::default();
        dsv_store::store::add_tag_batch(&v.id, "prod", &mut b)?;
        Ok((b, ()))
    })?;
    Ok(())
}

#[test]
fn a_crash_at_any_write_leaves_the_old_or_the_new_state() {
    let base = tempfile::tempdir().unwrap();
    let data = base.path().join("data");
    write_tree(
        &data,
        &[
            ("a.csv".to_string(), content(5, 30_000)),
            ("d/b.csv".to_string(), content(6, 9_000)),
        ]
        .into(),
    );
    let mut completed = false;
    for k in 0..10 {
        let tmp = tempfile::tempdir().unwrap();
        let kv = MemKv::new();
        let outcome = scripted(tmp.path(), &data, kv.clone(), k);
        if k == 0 {
            assert!(outcome.is_err());
            continue; // init never completed: there is no repository to check
        }
        let store = reopen(tmp.path(), kv.clone());
        let report = store
            .verify(VerifyOptions { read_data: true }, &NoProgress)
            .unwrap();
        assert!(report.ok(), "crash at write {k}: {:?}", report.problems);
        let versions = store.list_versions().unwrap();
        let main = store.get_ref("main").unwrap();
        match main {
            Some(id) => {
                // The version and its ref were one write: all of it is there.
                assert_eq!(versions.len(), 1);
                assert_eq!(versions[0].0, id);
                let got = read_back(&store, &store.version(&id).unwrap().object.root);
                assert_eq!(got.len(), 2);
            }
            None => assert!(
                versions.is_empty(),
                "crash at write {k}: version without its ref"
            ),
        }
        // Orphaned packs from the failed write are removed by gc.
        store
            .gc(
                GcOptions {
                    orphan_grace: Duration::ZERO,
                    ..Default::default()
                },
                false,
            )
            .unwrap();
        assert!(store
            .verify(VerifyOptions { read_data: true }, &NoProgress)
            .unwrap()
            .ok());
        if outcome.is_ok() {
            completed = true;
            assert_eq!(store.tags_of(&main.unwrap()).unwrap(), ["prod"]);
        } else if main.is_none()
            && store
                .list_drafts()
                .unwrap()
                .iter()
                .all(|d| d.record.finalized.is_some())
        {
            let packs = std::fs::read_dir(store.packs_dir()).unwrap().count();
            assert_eq!(packs, 0, "crash at write {k}: orphan packs left after gc");
        }
    }
    assert!(
        completed,
        "the script ran to completion at some crash point"
    );
}

#[test]
fn gc_frees_deleted_versions_and_keeps_live_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_tree(&a, &[("one.bin".to_string(), content(10, 200_000))].into());
    write_tree(&b, &[("two.bin".to_string(), content(11, 200_000))].into());
    let kv = MemKv::new();
    let store = mem_store(tmp.path(), kv.clone(), small_config());
    let va = snapshot(&store, &a);
    let vb = snapshot(&store, &b);
    let plan = store.gc(GcOptions::default(), true).unwrap();
    assert_eq!(plan.dead_chunks, 0);
    store
        .write(|kv| {
            let mut batch = dsv_store::Batch::default();
            store.delete_version_batch(kv, &va.id, &mut batch)?;
            Ok((batch, ()))
        })
        .unwrap();
    let before = kv.snapshot();
    let plan = store
        .gc(
            GcOptions {
                repack_threshold: 0.0,
                ..Default::default()
            },
            true,
        )
        .unwrap();
    assert!(plan.dead_chunks > 0 && plan.dead_objects > 0);
    assert_eq!(kv.snapshot(), before, "a dry run changes nothing");
    let done = store
        .gc(
            GcOptions {
                repack_threshold: 0.0,
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(done.dead_chunks, plan.dead_chunks);
    assert!(done.bytes_freed > 0);
    assert!(store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap()
        .ok());
    assert_eq!(
        read_back(&store, &vb.object.root)["two.bin"],
        content(11, 200_000)
    );
    assert!(store.version(&va.id).is_err());
    let again = store.gc(GcOptions::default(), false).unwrap();
    assert_eq!(again.dead_chunks + again.dead_objects, 0);
}

#[test]
fn merges_and_prefix_lookups() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_tree(
        &a,
        &[
            ("p.txt".to_string(), b"a-p".to_vec()),
            ("q.txt".to_string(), b"a-q".to_vec()),
        ]
        .into(),
    );
    write_tree(
        &b,
        &[
            ("q.txt".to_string(), b"b-q".to_vec()),
            ("r.txt".to_string(), b"b-r".to_vec()),
        ]
        .into(),
    );
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let va = snapshot(&store, &a);
    let vb = snapshot(&store, &b);
    let draft = store.create_draft(&[va.id, vb.id]).unwrap();
    let vm = store
        .finalize(&draft, "merge", BTreeMap::new(), &mut |_, _, _| Ok(()))
        .unwrap();
    assert_eq!(vm.object.parents, vec![va.id, vb.id]);
    let got = read_back(&store, &vm.object.root);
    assert_eq!(got["q.txt"], b"b-q", "later parent wins");
    assert_eq!(got.len(), 3);
    assert_eq!((vm.object.delta.added, vm.object.delta.modified), (1, 1));
    assert_eq!(
        store.resolve_version_prefix(&vm.id.to_hex()[..10]).unwrap(),
        vm.id
    );
    assert!(matches!(
        store.resolve_version_prefix("zz"),
        Err(Error::ParseId(_))
    ));
    let all = store.list_versions().unwrap();
    let common = (1..64).find(|&n| {
        all.iter()
            .filter(|(v, _)| v.to_hex()[..n] == vm.id.to_hex()[..n])
            .count()
            == 1
    });
    assert!(common.is_some());
    assert!(matches!(
        store.stage_folder(&draft, &a, &IngestOptions::default()),
        Err(Error::DraftFinalized(..))
    ));
}

#[test]
fn gc_removes_orphan_packs_but_not_ones_a_writer_holds() {
    let tmp = tempfile::tempdir().unwrap();
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let write_pack = || {
        let w = dsv_store::pack::PackWriter::new(store.packs_dir(), 1 << 20);
        let id = dsv_store::ChunkId(*blake3::hash(b"orphan").as_bytes());
        w.append(&id, 0, 6, b"orphan").unwrap();
        w.finish().unwrap()
    };
    let held = write_pack();
    let crashed = write_pack();
    drop(crashed); // a writer that died before its commit: unlocked, unindexed
    let report = store
        .gc(
            GcOptions {
                orphan_grace: Duration::ZERO,
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(report.packs_deleted, 1, "only the unlocked orphan goes");
    let left: Vec<_> = std::fs::read_dir(store.packs_dir()).unwrap().collect();
    assert_eq!(left.len(), 1);
    assert_eq!(held.ids().len(), 1);
    drop(held);
    let report = store
        .gc(
            GcOptions {
                orphan_grace: Duration::from_secs(3600),
                ..Default::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(
        report.packs_deleted, 0,
        "young orphans are left for their writer"
    );
}

#[test]
fn an_ambiguous_id_prefix_is_an_error_naming_the_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let store = mem_store(dir.path(), MemKv::new(), RepoConfig::default());
    // Two live versions whose ids share their first 4 bytes (8 hex digits).
    let mut a = [0x11u8; 32];
    let mut b = [0x11u8; 32];
    a[4] = 0xaa;
    b[4] = 0xbb;
    let (a, b) = (dsv_store::VersionId(a), dsv_store::VersionId(b));
    store
        .write(|_| {
            let mut batch = dsv_store::Batch::default();
            for id in [&a, &b] {
                batch.put(
                    dsv_store::Cf::Roots,
                    dsv_store::schema::root_version_key(id),
                    0i64.to_le_bytes().to_vec(),
                );
            }
            Ok((batch, ()))
        })
        .unwrap();
    let e = store.resolve_version_prefix("11111111").unwrap_err();
    assert!(matches!(e, dsv_store::Error::Ambiguous { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("11111111"), "{msg}");
    assert_eq!(store.resolve_version_prefix("11111111aa").unwrap(), a);
    assert_eq!(store.resolve_version_prefix("11111111bb").unwrap(), b);
}

/// Sum of the pack files' lengths.
fn pack_bytes(store: &Store) -> u64 {
    std::fs::read_dir(store.packs_dir())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// The first file of a tree.
fn first_file(store: &Store, root: &dsv_store::ObjectId) -> dsv_store::ObjectId {
    let mut out = None;
    store
        .walk_files(root, &mut |_, e| {
            if let (None, EntryTarget::File(id)) = (&out, &e.target) {
                out = Some(*id);
            }
            Ok(())
        })
        .unwrap();
    out.expect("a file")
}

/// Flips one byte inside the stored data of `chunk`'s record.
fn damage_chunk(store: &Store, chunk: &dsv_store::ChunkId) {
    let loc = store.chunk_loc(chunk).unwrap();
    let path = dsv_store::pack::pack_path(&store.packs_dir(), loc.pack);
    let mut bytes = std::fs::read(&path).unwrap();
    let at =
        (loc.offset + dsv_store::pack::RECORD_HEADER_LEN) as usize + loc.stored_len as usize / 2;
    bytes[at] ^= 0x5A;
    std::fs::write(&path, &bytes).unwrap();
}

#[test]
fn a_repair_makes_the_next_ingest_store_the_chunk_again_and_heals_old_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let files: BTreeMap<String, Vec<u8>> = [
        ("a.bin".to_string(), content(41, 60_000)),
        ("b.bin".to_string(), content(42, 20_000)),
    ]
    .into();
    write_tree(&data, &files);
    age(&data); // old enough for the stat cache to trust
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let v1 = snapshot(&store, &data);
    let a = store.lookup(&v1.object.root, b"a.bin").unwrap().unwrap();
    let EntryTarget::File(a_id) = a.target else {
        panic!("a file")
    };
    let bad = store.file_object(&a_id).unwrap().chunks[1].0;
    damage_chunk(&store, &bad);

    let check = store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap();
    assert_eq!(check.damaged.len(), 1, "{:?}", check.problems);
    assert_eq!(check.damaged[0].0, bad);
    // Before the repair, a sync of the intact file deduplicates against the
    // bad copy: nothing is stored.
    let fixed = store.repair(&check).unwrap();
    assert_eq!(fixed.marked, vec![bad.to_hex()]);
    assert!(fixed.stat_entries_dropped >= 1, "{fixed:?}");

    // Reads name the damaged chunk and the file, never return bytes.
    let e = store.read_file_to(&a_id, &mut Vec::new()).unwrap_err();
    match &e {
        Error::DamagedChunk { chunk, file, .. } => {
            assert_eq!(*chunk, bad);
            assert_eq!(*file, Some(a_id));
        }
        other => panic!("{other:?}"),
    }
    assert!(e.is_repository_problem());
    // A metadata check lists the damaged chunk with the version and path.
    let quick = store.verify(VerifyOptions::default(), &NoProgress).unwrap();
    let p = quick
        .problems
        .iter()
        .find(|p| p.kind == "damaged-chunk")
        .expect("listed");
    assert!(p.detail.contains("a.bin"), "{p:?}");

    // The intact file is synced again: its chunk is stored again.
    let out = store
        .commit_folder(
            &[v1.id],
            &data,
            &IngestOptions::default(),
            "again",
            BTreeMap::new(),
            &mut |_, _, _| Ok(()),
        )
        .unwrap();
    assert!(out.version.is_none(), "same tree as v1");
    assert!(out.report.new_chunks >= 1, "{:?}", out.report);
    assert!(out.report.stored_bytes > 0);
    // The old version is whole again, and the repository clean.
    assert_eq!(read_back(&store, &v1.object.root), files);
    let after = store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap();
    assert!(after.ok(), "{:?}", after.problems);
    // Nothing left for gc to trip over.
    store.gc(GcOptions::default(), false).unwrap();
    assert_eq!(read_back(&store, &v1.object.root), files);
}

#[test]
fn gc_drops_damaged_records_of_chunks_nothing_uses_and_keeps_referenced_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_tree(&a, &[("x.bin".to_string(), content(51, 30_000))].into());
    write_tree(&b, &[("y.bin".to_string(), content(52, 30_000))].into());
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let va = snapshot(&store, &a);
    let vb = snapshot(&store, &b);
    for v in [&va, &vb] {
        let f = first_file(&store, &v.object.root);
        damage_chunk(&store, &store.file_object(&f).unwrap().chunks[0].0);
    }
    let check = store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap();
    assert_eq!(store.repair(&check).unwrap().marked.len(), 2);
    store
        .write(|kv| {
            let mut batch = dsv_store::Batch::default();
            store.delete_version_batch(kv, &va.id, &mut batch)?;
            Ok((batch, ()))
        })
        .unwrap();
    let r = store.gc(GcOptions::default(), false).unwrap();
    assert_eq!(r.damaged_records_removed, 1, "{r:?}");
    let quick = store.verify(VerifyOptions::default(), &NoProgress).unwrap();
    let kinds: Vec<_> = quick.problems.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, ["damaged-chunk"], "vb's damage is still listed");
}

/// Runs `hook` once, the first time an ingest finishes hashing: between
/// an ingest and its commit, where a concurrent gc can strike.
struct OnceAfterHashing<F: Fn() + Sync>(std::sync::atomic::AtomicBool, F);
impl<F: Fn() + Sync> dsv_store::Progress for OnceAfterHashing<F> {
    fn finish(&self) {
        if !self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
            (self.1)();
        }
    }
}

#[test]
fn a_gc_between_ingest_and_commit_fails_nothing_it_did_not_remove_and_retries_what_it_did() {
    let tmp = tempfile::tempdir().unwrap();
    let (garbage, fresh, shared) = (
        tmp.path().join("garbage"),
        tmp.path().join("fresh"),
        tmp.path().join("shared"),
    );
    write_tree(
        &garbage,
        &[("g.bin".to_string(), content(61, 40_000))].into(),
    );
    write_tree(&fresh, &[("f.bin".to_string(), content(62, 40_000))].into());
    write_tree(
        &shared,
        &[("s.bin".to_string(), content(63, 40_000))].into(),
    );
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let delete = |v: &dsv_store::Version| {
        store
            .write(|kv| {
                let mut batch = dsv_store::Batch::default();
                store.delete_version_batch(kv, &v.id, &mut batch)?;
                Ok((batch, ()))
            })
            .unwrap()
    };
    let gc = || {
        let r = store.gc(GcOptions::default(), false).unwrap();
        assert!(r.dead_chunks > 0, "the gc removes something");
    };

    // 1. The gc removes data the new version shares nothing with: the
    // commit goes through (it used to fail with "a concurrent gc removed…").
    let vg = snapshot(&store, &garbage);
    delete(&vg);
    let hook = OnceAfterHashing(Default::default(), gc);
    let out = store
        .commit_folder(
            &[],
            &fresh,
            &IngestOptions {
                progress: &hook,
                ..Default::default()
            },
            "fresh",
            BTreeMap::new(),
            &mut |_, _, _| Ok(()),
        )
        .unwrap();
    assert!(hook.0.load(std::sync::atomic::Ordering::SeqCst));
    let v = out.version.unwrap();
    assert_eq!(
        read_back(&store, &v.object.root)["f.bin"],
        content(62, 40_000)
    );

    // 2. The ingest deduplicated against chunks of a deleted version, which
    // the gc then removes: the write notices, ingests again (storing them
    // anew) and succeeds.
    let vs = snapshot(&store, &shared);
    delete(&vs);
    let hook = OnceAfterHashing(Default::default(), gc);
    let draft = store.create_draft(&[]).unwrap();
    let r = store
        .stage_folder(
            &draft,
            &shared,
            &IngestOptions {
                progress: &hook,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(hook.0.load(std::sync::atomic::Ordering::SeqCst));
    assert!(r.new_chunks > 0, "stored again after the gc: {r:?}");
    let v = store
        .finalize(&draft, "m", BTreeMap::new(), &mut |_, _, _| Ok(()))
        .unwrap();
    assert_eq!(
        read_back(&store, &v.object.root)["s.bin"],
        content(63, 40_000)
    );
    let check = store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap();
    assert!(check.ok(), "{:?}", check.problems);
}

#[test]
fn a_dry_run_frees_exactly_what_the_real_gc_frees() {
    let tmp = tempfile::tempdir().unwrap();
    let config = RepoConfig {
        pack_target_size: 1 << 20,
        ..small_config()
    };
    let (ab, a, c) = (
        tmp.path().join("ab"),
        tmp.path().join("a"),
        tmp.path().join("c"),
    );
    let fa = content(71, 300_000);
    write_tree(
        &ab,
        &[
            ("a.bin".to_string(), fa.clone()),
            ("b.bin".to_string(), content(72, 300_000)),
        ]
        .into(),
    );
    write_tree(&a, &[("a.bin".to_string(), fa.clone())].into());
    write_tree(&c, &[("c.bin".to_string(), content(73, 2_500_000))].into());
    let store = mem_store(tmp.path(), MemKv::new(), config);
    let vab = snapshot(&store, &ab);
    let va = snapshot(&store, &a); // shares a.bin's chunks: a partly live pack
    let vc = snapshot(&store, &c); // several packs, all dead once deleted
    for v in [&vab, &vc] {
        store
            .write(|kv| {
                let mut batch = dsv_store::Batch::default();
                store.delete_version_batch(kv, &v.id, &mut batch)?;
                Ok((batch, ()))
            })
            .unwrap();
    }
    // And the leftover of a writer that died before its commit.
    let w = dsv_store::pack::PackWriter::new(store.packs_dir(), 1 << 20);
    let orphan = content(74, 50_000);
    let id = dsv_store::ChunkId(*blake3::hash(&orphan).as_bytes());
    w.append(&id, 0, orphan.len() as u32, &orphan).unwrap();
    drop(w.finish().unwrap());

    let before = pack_bytes(&store);
    let dry = store.gc(GcOptions::default(), true).unwrap();
    assert!(dry.packs_repacked >= 1, "{dry:?}");
    assert!(dry.packs_deleted >= 2, "{dry:?}");
    assert_eq!(dry.orphan_packs, 1, "{dry:?}");
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.orphan_packs, stats.orphan_bytes),
        (1, dry.orphan_bytes)
    );
    let real = store.gc(GcOptions::default(), false).unwrap();
    let after = pack_bytes(&store);
    assert_eq!(
        real.bytes_freed,
        before - after,
        "the real run's own figure"
    );
    assert_eq!(
        dry.bytes_freed, real.bytes_freed,
        "dry {dry:?} real {real:?}"
    );
    assert_eq!(
        (
            dry.packs_deleted,
            dry.packs_repacked,
            dry.orphan_packs,
            dry.orphan_bytes
        ),
        (
            real.packs_deleted,
            real.packs_repacked,
            real.orphan_packs,
            real.orphan_bytes
        )
    );
    assert_eq!(read_back(&store, &va.object.root)["a.bin"], fa);
    assert!(store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap()
        .ok());
}

#[test]
fn a_pack_with_a_bad_header_is_refused_by_reads_and_reported_by_fsck() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_tree(&data, &[("x.bin".to_string(), content(81, 20_000))].into());
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let v = snapshot(&store, &data);
    let pack = std::fs::read_dir(store.packs_dir())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let name = pack.file_name().unwrap().to_str().unwrap().to_string();
    let good = std::fs::read(&pack).unwrap();
    for (at, byte, kind) in [(0usize, b'Q', "corrupt-pack"), (8, 2u8, "unsupported-pack")] {
        let mut bad = good.clone();
        bad[at] = byte;
        std::fs::write(&pack, &bad).unwrap();
        store.refresh().unwrap(); // forget the open file
        let e = store
            .cat(&v.object.root, b"x.bin", &mut Vec::new())
            .unwrap_err();
        assert!(e.to_string().contains(&name), "{e}");
        assert!(
            matches!(
                e,
                Error::Corrupted { .. } | Error::UnsupportedFormatVersion { .. }
            ),
            "{e:?}"
        );
        let r = store.verify(VerifyOptions::default(), &NoProgress).unwrap();
        assert!(
            r.problems.iter().any(|p| p.kind == kind && p.what == name),
            "{:?}",
            r.problems
        );
        // A newer format is not damage: a repair leaves it alone.
        assert_eq!(r.damaged.is_empty(), kind == "unsupported-pack");
    }
}

/// Two versions of identical content, parents, message and metadata made in
/// the same millisecond (two datasets of one repository, or one dataset on
/// two machines) used to hash to one id: the version salt keeps them apart.
#[test]
fn identical_versions_in_the_same_millisecond_get_different_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let mut meta = BTreeMap::new();
    meta.insert("dsv.dataset".to_string(), "same".to_string());
    // Both versions in one batch: the clock rarely ticks between them; try
    // again until it did not, so that the test covers the colliding case.
    let mut attempts = 0;
    let (a, b) = (0..1000)
        .find_map(|_| {
            attempts += 1;
            let (a, b) = store
                .write(|kv| {
                    let mut b = dsv_store::kv::Batch::default();
                    let root = dsv_store::tree::empty_tree_id();
                    let diff = dsv_store::diff::Diff::default();
                    let x =
                        store.version_batch(kv, root, &[], &diff, 0, "m", meta.clone(), &mut b)?;
                    let y =
                        store.version_batch(kv, root, &[], &diff, 0, "m", meta.clone(), &mut b)?;
                    Ok((b, (x, y)))
                })
                .unwrap();
            (a.object.created_ms == b.object.created_ms).then_some((a, b))
        })
        .expect("two versions in the same millisecond");
    // Everything but the salt is equal: without it the ids would be too.
    let unsalted = |v: &dsv_store::Version| dsv_store::VersionObject {
        salt: None,
        ..v.object.clone()
    };
    assert_eq!(unsalted(&a), unsalted(&b));
    assert_ne!(a.object.salt, b.object.salt);
    assert_ne!(a.id, b.id);
    for v in [&a, &b] {
        assert_eq!(store.version(&v.id).unwrap(), *v);
    }
    let report = store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    // Every attempt committed its two versions.
    assert_eq!(report.versions, 2 * attempts);
}

/// A version object in the encoding format-1 builds wrote (no salt, object
/// format 1) still reads and verifies beside salted ones.
#[test]
fn format1_version_objects_still_read_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let root = dsv_store::tree::empty_tree_id();
    let old = dsv_store::VersionObject {
        root,
        parents: Vec::new(),
        created_ms: 1_600_000_000_000,
        message: "written by dsv 0.1.0".into(),
        metadata: BTreeMap::new(),
        delta: Default::default(),
        file_count: 0,
        total_bytes: 0,
        salt: None,
    };
    let bytes = old.encode();
    assert_eq!(bytes[1], 1, "format-1 object encoding");
    let id = dsv_store::VersionId(dsv_store::id::hash(&bytes));
    store
        .write(|_| {
            let mut b = dsv_store::kv::Batch::default();
            b.put(
                dsv_store::kv::Cf::Objects,
                id.as_bytes().to_vec(),
                dsv_store::object::stored::wrap(&bytes, 3),
            );
            b.put(
                dsv_store::kv::Cf::Roots,
                dsv_store::schema::root_version_key(&id),
                old.created_ms.to_le_bytes().to_vec(),
            );
            Ok((b, ()))
        })
        .unwrap();
    let v = store.version(&id).unwrap();
    assert_eq!(v.object, old);
    // A child made now is salted; both verify.
    let d = store.create_draft(&[id]).unwrap();
    let child = store
        .finalize(&d, "new", BTreeMap::new(), &mut |_, _, _| Ok(()))
        .unwrap();
    assert!(child.object.salt.is_some());
    assert_eq!(child.object.parents, vec![id]);
    let report = store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.versions, 2);
}

/// Turns a freshly made repository into what a format-1 build left: the
/// database marker at 1 and a `config.json` with `format_version` 1 and no
/// features section.
fn make_format1(dir: &Path, kv: &MemKv) {
    let mut b = dsv_store::kv::Batch::default();
    b.put(
        dsv_store::kv::Cf::Meta,
        dsv_store::schema::META_FORMAT,
        1u32.to_le_bytes().to_vec(),
    );
    dsv_store::kv::KvWrite::write(kv, b).unwrap();
    set_config(dir, |c| {
        c["format_version"] = 1.into();
        c.as_object_mut().unwrap().remove("features");
    });
}

fn set_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(".dsv").join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut c);
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(".dsv").join("config.json")).unwrap())
        .unwrap()
}

fn meta_format(kv: &MemKv) -> u32 {
    use dsv_store::kv::Backend;
    let v = kv
        .open_read()
        .unwrap()
        .get(dsv_store::kv::Cf::Meta, dsv_store::schema::META_FORMAT)
        .unwrap()
        .unwrap();
    u32::from_le_bytes(v.try_into().unwrap())
}

fn try_open(dir: &Path, kv: &MemKv) -> Result<Store, Error> {
    Store::open_with_backend(
        &dir.join(".dsv"),
        Box::new(kv.clone()),
        StoreOptions::default(),
    )
}

fn upgrade(
    dir: &Path,
    kv: &MemKv,
    backfill: &mut dyn FnMut(&dyn dsv_store::KvRead) -> Result<dsv_store::Batch, Error>,
) -> Result<(Store, dsv_store::UpgradeReport), Error> {
    Store::upgrade_with_backend(
        &dir.join(".dsv"),
        Box::new(kv.clone()),
        StoreOptions::default(),
        backfill,
    )
}

#[test]
fn a_format1_repository_is_refused_until_upgraded_and_upgrade_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let kv = MemKv::new();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("a.txt"), b"hello").unwrap();
    let v = {
        let store = mem_store(tmp.path(), kv.clone(), small_config());
        snapshot(&store, &data)
    };
    make_format1(tmp.path(), &kv);
    let err = try_open(tmp.path(), &kv).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NeedsUpgrade {
                found: 1,
                current: 2,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "repository at {} has format 1; run `dsv upgrade`",
            tmp.path().display()
        )),
        "{msg}"
    );
    assert!(err.is_repository_problem());

    let mut calls = 0;
    let (store, report) = upgrade(tmp.path(), &kv, &mut |kv| {
        calls += 1;
        // The backfill reads the repository as format 1 left it.
        assert!(kv
            .get(
                dsv_store::Cf::Roots,
                &dsv_store::schema::root_version_key(&v.id)
            )?
            .is_some());
        let mut b = dsv_store::Batch::default();
        b.put(dsv_store::Cf::App, b"backfilled".to_vec(), b"1".to_vec());
        Ok(b)
    })
    .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(report.from, 1);
    assert_eq!(report.to, 2);
    assert!(report.database_upgraded && report.config_rewritten);
    assert_eq!(meta_format(&kv), 2);
    let c = config_json(tmp.path());
    assert_eq!(c["format_version"], 2);
    assert_eq!(
        c["features"]["incompat"],
        serde_json::json!(["version-salt"])
    );
    assert!(store
        .reader()
        .get(dsv_store::Cf::App, b"backfilled")
        .unwrap()
        .is_some());
    assert_eq!(
        read_back(&store, &store.version(&v.id).unwrap().object.root)["a.txt"],
        b"hello"
    );
    drop(store);

    // Again: nothing to do, the backfill is not called.
    let (store, report) = upgrade(tmp.path(), &kv, &mut |_| {
        panic!("backfill on a current repository")
    })
    .unwrap();
    assert!(report.was_current());
    assert_eq!(report.from, 2);
    // And the upgraded repository takes new versions and verifies.
    std::fs::write(data.join("b.txt"), b"more").unwrap();
    let v2 = snapshot(&store, &data);
    assert!(v2.object.salt.is_some());
    let report = store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

#[test]
fn an_interrupted_upgrade_changes_nothing_or_resumes_without_repeating_the_backfill() {
    let tmp = tempfile::tempdir().unwrap();
    let kv = MemKv::new();
    drop(mem_store(tmp.path(), kv.clone(), small_config()));
    make_format1(tmp.path(), &kv);
    let before = config_json(tmp.path());

    // A backfill that fails: nothing is written.
    let err = upgrade(tmp.path(), &kv, &mut |_| Err(Error::Injected("backfill"))).unwrap_err();
    assert!(matches!(err, Error::Injected("backfill")));
    assert_eq!(meta_format(&kv), 1);
    assert_eq!(config_json(tmp.path()), before);

    // A crash after the database batch, before config.json: the database is
    // at 2, config.json at 1. This build still asks for the upgrade.
    {
        let mut b = dsv_store::kv::Batch::default();
        b.put(dsv_store::Cf::App, b"backfilled".to_vec(), b"1".to_vec());
        b.put(
            dsv_store::Cf::Meta,
            dsv_store::schema::META_FORMAT,
            2u32.to_le_bytes().to_vec(),
        );
        dsv_store::kv::KvWrite::write(&kv, b).unwrap();
    }
    assert!(matches!(
        try_open(tmp.path(), &kv),
        Err(Error::NeedsUpgrade { found: 1, .. })
    ));
    let (_, report) = upgrade(tmp.path(), &kv, &mut |_| panic!("backfill run twice")).unwrap();
    assert!(!report.database_upgraded);
    assert!(report.config_rewritten);
    assert_eq!(config_json(tmp.path())["format_version"], 2);
    try_open(tmp.path(), &kv).unwrap();

    // A database marker behind a current config.json (not a state upgrade
    // leaves, but one it repairs): the database step runs, once.
    {
        let mut b = dsv_store::kv::Batch::default();
        b.put(
            dsv_store::Cf::Meta,
            dsv_store::schema::META_FORMAT,
            1u32.to_le_bytes().to_vec(),
        );
        dsv_store::kv::KvWrite::write(&kv, b).unwrap();
    }
    assert!(matches!(
        try_open(tmp.path(), &kv),
        Err(Error::NeedsUpgrade { found: 1, .. })
    ));
    let mut calls = 0;
    let (_, report) = upgrade(tmp.path(), &kv, &mut |_| {
        calls += 1;
        Ok(dsv_store::Batch::default())
    })
    .unwrap();
    assert_eq!(calls, 1);
    assert!(report.database_upgraded && !report.config_rewritten);
    assert_eq!(meta_format(&kv), 2);
    try_open(tmp.path(), &kv).unwrap();
}

#[test]
fn unknown_features_refuse_opening_or_writing_by_class() {
    let tmp = tempfile::tempdir().unwrap();
    let kv = MemKv::new();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("a.txt"), b"hello").unwrap();
    let v = snapshot(&mem_store(tmp.path(), kv.clone(), small_config()), &data);
    let original = config_json(tmp.path());

    // Unknown compat: ignored.
    set_config(tmp.path(), |c| {
        c["features"]["compat"] = serde_json::json!(["shiny-future"])
    });
    let store = try_open(tmp.path(), &kv).unwrap();
    std::fs::write(data.join("b.txt"), b"b").unwrap();
    snapshot(&store, &data);
    drop(store);

    // Unknown ro_compat: reads work, every write is refused naming it, and
    // nothing (not even a pack) is written.
    set_config(tmp.path(), |c| {
        c["features"]["ro_compat"] = serde_json::json!(["task-indexes", "zz-ro"])
    });
    let store = try_open(tmp.path(), &kv).unwrap();
    assert_eq!(store.read_only_features(), ["zz-ro".to_string()]);
    assert_eq!(
        read_back(&store, &store.version(&v.id).unwrap().object.root)["a.txt"],
        b"hello"
    );
    let packs_before = std::fs::read_dir(store.packs_dir()).unwrap().count();
    std::fs::write(data.join("c.txt"), b"new content to store").unwrap();
    let d = store.create_draft(&[v.id]).unwrap_err();
    let msg = d.to_string();
    assert!(matches!(d, Error::ReadOnlyFeatures { .. }), "{d:?}");
    assert!(
        msg.contains("zz-ro")
            && msg.contains(&tmp.path().display().to_string())
            && msg.contains("upgrade dsv"),
        "{msg}"
    );
    let err = store
        .commit_folder(
            &[v.id],
            &data,
            &IngestOptions::default(),
            "m",
            BTreeMap::new(),
            &mut |_, _, _| Ok(()),
        )
        .unwrap_err();
    assert!(matches!(err, Error::ReadOnlyFeatures { .. }), "{err:?}");
    assert!(matches!(
        store.gc(GcOptions::default(), false),
        Err(Error::ReadOnlyFeatures { .. })
    ));
    store.gc(GcOptions::default(), true).unwrap();
    assert_eq!(
        std::fs::read_dir(store.packs_dir()).unwrap().count(),
        packs_before
    );
    drop(store);

    // Unknown incompat: not opened at all (nor upgraded), naming the feature
    // and the repository.
    set_config(tmp.path(), |c| {
        c["features"]["incompat"] = serde_json::json!(["version-salt", "zz-new-encoding"])
    });
    let err = try_open(tmp.path(), &kv).unwrap_err();
    assert!(matches!(err, Error::UnknownFeatures { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("zz-new-encoding")
            && msg.contains(&tmp.path().display().to_string())
            && msg.contains("upgrade dsv"),
        "{msg}"
    );
    assert!(matches!(
        upgrade(tmp.path(), &kv, &mut |_| panic!()),
        Err(Error::UnknownFeatures { .. })
    ));

    // A newer format: refused as before.
    set_config(tmp.path(), |c| *c = original.clone());
    set_config(tmp.path(), |c| c["format_version"] = 3.into());
    assert!(matches!(
        try_open(tmp.path(), &kv),
        Err(Error::UnsupportedFormatVersion { found: 3, .. })
    ));
    assert!(matches!(
        upgrade(tmp.path(), &kv, &mut |_| panic!()),
        Err(Error::UnsupportedFormatVersion { found: 3, .. })
    ));

    // Format 2 without its features section is a damaged config.
    set_config(tmp.path(), |c| {
        *c = original.clone();
        c.as_object_mut().unwrap().remove("features");
    });
    assert!(matches!(
        try_open(tmp.path(), &kv),
        Err(Error::Corrupted { .. })
    ));
}

#[test]
fn rebuild_index_restores_lost_entries_and_an_intact_copy_of_a_damaged_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let files: BTreeMap<String, Vec<u8>> = [
        ("a.bin".to_string(), content(11, 60_000)),
        ("b.bin".to_string(), content(12, 60_000)),
    ]
    .into();
    write_tree(&data, &files);
    let store = mem_store(tmp.path(), MemKv::new(), small_config());
    let v = snapshot(&store, &data);
    let file_id = |name: &[u8]| match store.lookup(&v.object.root, name).unwrap().unwrap().target {
        EntryTarget::File(f) => f,
        _ => panic!("file expected"),
    };
    // a.bin's index entries are lost.
    let lost: Vec<dsv_store::ChunkId> = store
        .file_object(&file_id(b"a.bin"))
        .unwrap()
        .chunks
        .iter()
        .map(|(c, _)| *c)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    store
        .write(|_| {
            let mut b = dsv_store::Batch::default();
            for c in &lost {
                b.delete(dsv_store::Cf::Chunks, c.as_bytes().to_vec());
            }
            Ok((b, ()))
        })
        .unwrap();
    // One of b.bin's chunks is damaged and taken out of service, while an
    // intact copy of its record sits in another pack.
    let (chunk, _) = store.file_object(&file_id(b"b.bin")).unwrap().chunks[2];
    let loc = store.chunk_loc(&chunk).unwrap();
    let packs = store.packs_dir();
    let path = dsv_store::pack::pack_path(&packs, loc.pack);
    let mut bytes = std::fs::read(&path).unwrap();
    let rec_len = dsv_store::pack::RECORD_HEADER_LEN as usize + loc.stored_len as usize;
    let record = bytes[loc.offset as usize..loc.offset as usize + rec_len].to_vec();
    let mut copy = dsv_store::pack::PACK_MAGIC.to_vec();
    copy.extend_from_slice(&dsv_store::pack::PACK_FORMAT.to_le_bytes());
    copy.extend_from_slice(&0u32.to_le_bytes());
    copy.extend_from_slice(&record);
    std::fs::write(dsv_store::pack::pack_path(&packs, 0xfeed), copy).unwrap();
    let at = loc.offset as usize + rec_len - 1;
    bytes[at] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let checked = store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap();
    assert!(!checked.ok());
    assert_eq!(store.repair(&checked).unwrap().marked, vec![chunk.to_hex()]);
    assert!(store
        .read_file_to(&file_id(b"a.bin"), &mut Vec::new())
        .is_err());
    assert!(store
        .read_file_to(&file_id(b"b.bin"), &mut Vec::new())
        .is_err());

    let r = store.rebuild_chunk_index(&NoProgress).unwrap();
    assert_eq!(r.added, lost.len() as u64 + 1, "{r:?}");
    assert_eq!(r.restored, 1, "{r:?}");
    assert_eq!(r.damaged_records, 1, "{r:?}");
    assert_eq!(r.repointed, 0, "{r:?}");
    assert!(r.unreadable.is_empty(), "{r:?}");
    assert!(store
        .verify(VerifyOptions { read_data: true }, &NoProgress)
        .unwrap()
        .ok());
    assert_eq!(read_back(&store, &v.object.root), files);
    // Idempotent.
    let again = store.rebuild_chunk_index(&NoProgress).unwrap();
    assert_eq!((again.added, again.repointed, again.restored), (0, 0, 0));
}
