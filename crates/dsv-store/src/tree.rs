//! Reading and editing trees.
//!
//! A directory is one tree node: a [`TreeNode::Leaf`] of sorted entries, or,
//! past [`LEAF_MAX_ENTRIES`] names, a [`TreeNode::Shard`] whose children each
//! hold the names whose BLAKE3 hash has a given byte at the shard's level.
//! The shape depends only on the set of names, so equal directories have
//! equal ids. Edits touch only the path from the root to the changed names:
//! changing one file in a directory of a million files rewrites a leaf of a
//! few entries and two shard nodes.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Kind, Result};
use crate::id::{hash, ObjectId};
use crate::kv::{Cf, KvRead};
use crate::object::{
    shard_bucket, stored, DirSummary, Entry, EntryTarget, FileObject, Object, ShardNode, TreeNode,
    LEAF_MAX_ENTRIES, MAX_SHARD_LEVEL,
};

/// Something objects can be read from.
pub trait ObjectRead {
    /// Reads and decodes one object.
    fn object(&self, id: &ObjectId) -> Result<Object>;

    /// Reads a tree node.
    fn tree(&self, id: &ObjectId) -> Result<TreeNode> {
        match self.object(id)? {
            Object::Tree(t) => Ok(t),
            other => Err(Error::WrongObjectType {
                id: *id,
                found: other.type_name(),
                expected: "tree",
            }),
        }
    }

    /// Reads a file manifest.
    fn file(&self, id: &ObjectId) -> Result<FileObject> {
        match self.object(id)? {
            Object::File(f) => Ok(f),
            other => Err(Error::WrongObjectType {
                id: *id,
                found: other.type_name(),
                expected: "file",
            }),
        }
    }
}

/// Reads an object from the database, checking its hash.
pub fn read_object(kv: &dyn KvRead, id: &ObjectId) -> Result<Object> {
    let what = format!("object {id}");
    let v = kv
        .get(Cf::Objects, id.as_bytes())?
        .ok_or_else(|| Error::not_found(Kind::Object, id.to_hex()))?;
    let canonical = stored::unwrap(&v, &what)?;
    let got = hash(&canonical);
    if got != id.0 {
        return Err(Error::corrupted(
            what,
            format!("content hashes to {}", hex::encode(got)),
        ));
    }
    Object::decode(&canonical, &what)
}

/// Object reads straight from a database handle.
pub struct KvObjects<'a>(pub &'a dyn KvRead);

impl ObjectRead for KvObjects<'_> {
    fn object(&self, id: &ObjectId) -> Result<Object> {
        read_object(self.0, id)
    }
}

/// Objects created by an operation and not yet written.
#[derive(Debug, Default)]
pub struct Pending {
    objects: HashMap<ObjectId, (Object, Vec<u8>)>,
}

impl Pending {
    /// Adds an object; returns its id.
    pub fn put(&mut self, obj: Object) -> ObjectId {
        let bytes = obj.encode();
        let id = ObjectId(hash(&bytes));
        self.objects.entry(id).or_insert((obj, bytes));
        id
    }
    /// Number of pending objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }
    /// Whether none are pending.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
    /// A pending object.
    pub fn get(&self, id: &ObjectId) -> Option<&Object> {
        self.objects.get(id).map(|(o, _)| o)
    }
    /// Canonical encodings of the pending objects.
    pub fn encodings(&self) -> impl Iterator<Item = (&ObjectId, &Vec<u8>)> {
        self.objects.iter().map(|(id, (_, b))| (id, b))
    }
    /// Moves another set in.
    pub fn absorb(&mut self, other: Pending) {
        for (k, v) in other.objects {
            self.objects.entry(k).or_insert(v);
        }
    }
}

/// Pending objects over a database: reads see both, writes go to pending.
pub struct Objs<'a> {
    /// Committed objects.
    pub kv: &'a dyn KvRead,
    /// New objects.
    pub pending: &'a mut Pending,
}

impl ObjectRead for Objs<'_> {
    fn object(&self, id: &ObjectId) -> Result<Object> {
        if let Some((o, _)) = self.pending.objects.get(id) {
            return Ok(o.clone());
        }
        read_object(self.kv, id)
    }
}

/// The id of the empty directory.
pub fn empty_tree_id() -> ObjectId {
    ObjectId(hash(&TreeNode::Leaf(Vec::new()).encode()))
}

/// All entries of a directory, sorted by name.
pub fn list_dir(r: &dyn ObjectRead, id: &ObjectId) -> Result<Vec<Entry>> {
    let node = r.tree(id)?;
    list_node(r, node)
}

/// All entries of a decoded directory node, sorted by name.
pub fn list_node(r: &dyn ObjectRead, node: TreeNode) -> Result<Vec<Entry>> {
    match node {
        TreeNode::Leaf(e) => Ok(e),
        TreeNode::Shard(s) => {
            let mut all = Vec::with_capacity(s.entry_count.min(1 << 24) as usize);
            for (_, c) in &s.children {
                all.extend(list_dir(r, c)?);
            }
            all.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(all)
        }
    }
}

/// Finds one name in a directory without listing it.
pub fn find_in_dir(r: &dyn ObjectRead, dir: &ObjectId, name: &[u8]) -> Result<Option<Entry>> {
    let mut id = *dir;
    loop {
        match r.tree(&id)? {
            TreeNode::Leaf(entries) => {
                return Ok(entries
                    .binary_search_by(|e| e.name.as_slice().cmp(name))
                    .ok()
                    .map(|i| entries[i].clone()))
            }
            TreeNode::Shard(s) => {
                let b = shard_bucket(name, s.level);
                match s.children.iter().find(|(k, _)| *k == b) {
                    Some((_, c)) => id = *c,
                    None => return Ok(None),
                }
            }
        }
    }
}

/// Splits a `/`-separated relative path into validated names. The empty
/// path means the root.
pub fn split_path(path: &[u8]) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        if part.is_empty() {
            continue;
        }
        crate::object::validate_name(part).map_err(|why| {
            Error::Invalid(format!(
                "invalid path '{}': {why}",
                String::from_utf8_lossy(path)
            ))
        })?;
        out.push(part);
    }
    Ok(out)
}

/// Looks up a path below `root`. The empty path returns `None` (the root
/// has no entry of its own).
pub fn lookup(r: &dyn ObjectRead, root: &ObjectId, path: &[u8]) -> Result<Option<Entry>> {
    let parts = split_path(path)?;
    let mut dir = *root;
    let mut found = None;
    for (i, part) in parts.iter().enumerate() {
        let Some(e) = find_in_dir(r, &dir, part)? else {
            return Ok(None);
        };
        if i + 1 < parts.len() {
            match e.target {
                EntryTarget::Dir { id, .. } => dir = id,
                _ => return Ok(None),
            }
        }
        found = Some(e);
    }
    Ok(found)
}

/// Joins a parent path and a name.
pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    p.extend_from_slice(parent);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// Visits every file and symlink below `dir` with its full path, in path
/// order. `prefix` is prepended to every path.
pub fn walk_files(
    r: &dyn ObjectRead,
    dir: &ObjectId,
    prefix: &[u8],
    visit: &mut dyn FnMut(&[u8], &Entry) -> Result<()>,
) -> Result<()> {
    for e in list_dir(r, dir)? {
        let path = join(prefix, &e.name);
        match e.target {
            EntryTarget::Dir { id, .. } => walk_files(r, &id, &path, visit)?,
            _ => visit(&path, &e)?,
        }
    }
    Ok(())
}

/// Builds a directory from sorted, unique entries; returns its id and summary.
pub fn build_dir(p: &mut Pending, entries: Vec<Entry>, level: u8) -> (ObjectId, DirSummary) {
    if entries.len() <= LEAF_MAX_ENTRIES || level > MAX_SHARD_LEVEL {
        let node = TreeNode::Leaf(entries);
        let summary = node.summary();
        return (p.put(Object::Tree(node)), summary);
    }
    let entry_count = entries.len() as u64;
    let mut buckets: BTreeMap<u8, Vec<Entry>> = BTreeMap::new();
    for e in entries {
        buckets
            .entry(shard_bucket(&e.name, level))
            .or_default()
            .push(e);
    }
    let mut children = Vec::with_capacity(buckets.len());
    let (mut file_count, mut total_size) = (0, 0);
    for (b, group) in buckets {
        let (id, s) = build_dir(p, group, level + 1);
        file_count += s.file_count;
        total_size += s.total_size;
        children.push((b, id));
    }
    let node = TreeNode::Shard(ShardNode {
        level,
        entry_count,
        file_count,
        total_size,
        children,
    });
    let summary = node.summary();
    (p.put(Object::Tree(node)), summary)
}

/// A change to one name of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Put this entry under the name (replacing whatever was there).
    Set(Entry),
    /// Remove the name.
    Remove,
    /// Apply changes inside the directory of that name (created when
    /// missing; removed when the changes leave it empty).
    Descend(BTreeMap<Vec<u8>, Change>),
    /// Overlay a directory entry: names in it win, other names stay.
    Merge(Entry),
}

/// Builds the nested change map for path-level changes. Later changes to
/// the same path win.
pub fn changes_from_paths(items: Vec<(Vec<u8>, Change)>) -> Result<BTreeMap<Vec<u8>, Change>> {
    let mut root: BTreeMap<Vec<u8>, Change> = BTreeMap::new();
    for (path, change) in items {
        let parts: Vec<Vec<u8>> = split_path(&path)?.into_iter().map(<[u8]>::to_vec).collect();
        if parts.is_empty() {
            return Err(Error::Invalid("a change needs a non-empty path".into()));
        }
        insert_change(&mut root, &parts, change);
    }
    Ok(root)
}

fn insert_change(map: &mut BTreeMap<Vec<u8>, Change>, parts: &[Vec<u8>], change: Change) {
    let (first, rest) = parts
        .split_first()
        .expect("non-empty because callers check");
    if rest.is_empty() {
        map.insert(first.clone(), change);
        return;
    }
    let slot = map
        .entry(first.clone())
        .or_insert_with(|| Change::Descend(BTreeMap::new()));
    if !matches!(slot, Change::Descend(_)) {
        *slot = Change::Descend(BTreeMap::new());
    }
    if let Change::Descend(sub) = slot {
        insert_change(sub, rest, change);
    }
}

fn dir_entry(name: Vec<u8>, mode: u32, id: ObjectId, s: DirSummary) -> Entry {
    Entry {
        name,
        mode,
        size: s.total_size,
        target: EntryTarget::Dir {
            id,
            file_count: s.file_count,
        },
    }
}

fn overlay_changes(w: &Objs<'_>, overlay: &ObjectId) -> Result<BTreeMap<Vec<u8>, Change>> {
    Ok(list_dir(w, overlay)?
        .into_iter()
        .map(|e| {
            let c = if e.is_dir() {
                Change::Merge(e.clone())
            } else {
                Change::Set(e.clone())
            };
            (e.name, c)
        })
        .collect())
}

/// Applies `changes` to directory `base` (or an empty one); returns the new
/// directory's id and summary.
pub fn apply_dir(
    w: &mut Objs<'_>,
    base: Option<ObjectId>,
    level: u8,
    changes: BTreeMap<Vec<u8>, Change>,
) -> Result<(ObjectId, DirSummary)> {
    if changes.is_empty() {
        if let Some(id) = base {
            return Ok((id, w.tree(&id)?.summary()));
        }
    }
    let node = match base {
        Some(id) => Some(w.tree(&id)?),
        None => None,
    };
    match node {
        Some(TreeNode::Shard(s)) => {
            let mut groups: BTreeMap<u8, BTreeMap<Vec<u8>, Change>> = BTreeMap::new();
            for (name, c) in changes {
                groups
                    .entry(shard_bucket(&name, s.level))
                    .or_default()
                    .insert(name, c);
            }
            let mut children: BTreeMap<u8, ObjectId> = s.children.iter().copied().collect();
            let (mut entries, mut files, mut size) = (s.entry_count, s.file_count, s.total_size);
            for (b, group) in groups {
                let old = children.get(&b).copied();
                let old_sum = match old {
                    Some(id) => w.tree(&id)?.summary(),
                    None => DirSummary::default(),
                };
                let (nid, ns) = apply_dir(w, old, s.level + 1, group)?;
                entries = entries - old_sum.entry_count + ns.entry_count;
                files = files - old_sum.file_count + ns.file_count;
                size = size - old_sum.total_size + ns.total_size;
                if ns.entry_count == 0 {
                    children.remove(&b);
                } else {
                    children.insert(b, nid);
                }
            }
            if entries as usize <= LEAF_MAX_ENTRIES {
                let mut all = Vec::new();
                for c in children.values() {
                    all.extend(list_dir(w, c)?);
                }
                all.sort_by(|a, b| a.name.cmp(&b.name));
                return Ok(build_dir(w.pending, all, s.level));
            }
            let node = TreeNode::Shard(ShardNode {
                level: s.level,
                entry_count: entries,
                file_count: files,
                total_size: size,
                children: children.into_iter().collect(),
            });
            let summary = node.summary();
            Ok((w.pending.put(Object::Tree(node)), summary))
        }
        leaf => {
            let entries = match leaf {
                Some(TreeNode::Leaf(e)) => e,
                _ => Vec::new(),
            };
            let mut map: BTreeMap<Vec<u8>, Entry> =
                entries.into_iter().map(|e| (e.name.clone(), e)).collect();
            for (name, change) in changes {
                apply_change(w, &mut map, name, change)?;
            }
            Ok(build_dir(w.pending, map.into_values().collect(), level))
        }
    }
}

fn apply_change(
    w: &mut Objs<'_>,
    map: &mut BTreeMap<Vec<u8>, Entry>,
    name: Vec<u8>,
    change: Change,
) -> Result<()> {
    let existing_dir = map.get(&name).and_then(|e| match e.target {
        EntryTarget::Dir { id, .. } => Some((id, e.mode)),
        _ => None,
    });
    match change {
        Change::Set(mut e) => {
            e.name = name.clone();
            map.insert(name, e);
        }
        Change::Remove => {
            map.remove(&name);
        }
        Change::Descend(sub) => {
            let (id, s) = apply_dir(w, existing_dir.map(|d| d.0), 0, sub)?;
            if s.entry_count == 0 {
                map.remove(&name);
            } else {
                let mode = existing_dir.map(|d| d.1).unwrap_or(0o755);
                map.insert(name.clone(), dir_entry(name, mode, id, s));
            }
        }
        Change::Merge(mut overlay) => {
            let EntryTarget::Dir { id: oid, .. } = overlay.target else {
                overlay.name = name.clone();
                map.insert(name, overlay);
                return Ok(());
            };
            match existing_dir {
                Some((eid, _)) if eid == oid => {}
                Some((eid, _)) => {
                    let sub = overlay_changes(w, &oid)?;
                    let (id, s) = apply_dir(w, Some(eid), 0, sub)?;
                    map.insert(name.clone(), dir_entry(name, overlay.mode, id, s));
                }
                None => {
                    overlay.name = name.clone();
                    map.insert(name, overlay);
                }
            }
        }
    }
    Ok(())
}

/// Overlays directory `top` on directory `base`: every path of `top` wins,
/// paths only in `base` stay (the merge rule for several parents).
pub fn merge_dirs(
    w: &mut Objs<'_>,
    base: ObjectId,
    top: ObjectId,
) -> Result<(ObjectId, DirSummary)> {
    if base == top {
        return Ok((base, w.tree(&base)?.summary()));
    }
    let changes = overlay_changes(w, &top)?;
    apply_dir(w, Some(base), 0, changes)
}

/// Applies changes to a root directory.
pub fn apply_root(
    w: &mut Objs<'_>,
    root: ObjectId,
    changes: BTreeMap<Vec<u8>, Change>,
) -> Result<(ObjectId, DirSummary)> {
    apply_dir(w, Some(root), 0, changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;

    fn file(name: &str, n: u64) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            mode: 0o644,
            size: n,
            target: EntryTarget::File(ObjectId(hash(&n.to_le_bytes()))),
        }
    }

    fn names(r: &dyn ObjectRead, root: &ObjectId) -> Vec<String> {
        let mut out = Vec::new();
        walk_files(r, root, b"", &mut |p, _| {
            out.push(String::from_utf8(p.to_vec()).unwrap());
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn large_directories_shard_and_edits_are_canonical() {
        let kv = MemKv::new();
        let mut pending = Pending::default();
        let entries: Vec<Entry> = {
            let mut v: Vec<Entry> = (0..3000).map(|i| file(&format!("f{i:05}"), i)).collect();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        };
        let (full, s) = build_dir(&mut pending, entries.clone(), 0);
        assert_eq!(s.entry_count, 3000);
        let mut w = Objs {
            kv: &kv,
            pending: &mut pending,
        };
        assert!(matches!(w.tree(&full).unwrap(), TreeNode::Shard(_)));
        // Remove one name by edit; must equal building without it.
        let mut changes = BTreeMap::new();
        changes.insert(b"f00042".to_vec(), Change::Remove);
        let (edited, _) = apply_dir(&mut w, Some(full), 0, changes).unwrap();
        let mut fewer = entries.clone();
        fewer.remove(42);
        let (rebuilt, _) = build_dir(w.pending, fewer, 0);
        assert_eq!(edited, rebuilt);
        assert_eq!(find_in_dir(&w, &full, b"f00042").unwrap().unwrap().size, 42);
        assert!(find_in_dir(&w, &edited, b"f00042").unwrap().is_none());
        // Shrinking below the threshold collapses to a leaf.
        let mut changes = BTreeMap::new();
        for i in 0..2900 {
            changes.insert(format!("f{i:05}").into_bytes(), Change::Remove);
        }
        let (small, s) = apply_dir(&mut w, Some(full), 0, changes).unwrap();
        assert_eq!(s.entry_count, 100);
        assert!(matches!(w.tree(&small).unwrap(), TreeNode::Leaf(_)));
    }

    #[test]
    fn names_sharing_a_shard_byte_build_trees_that_decode() {
        // 300 names whose level-0 shard byte is the same: a shard with one
        // child, which the decoder must accept.
        let mut picked: Vec<Entry> = (0u64..)
            .map(|i| format!("n{i}"))
            .filter(|n| crate::object::shard_bucket(n.as_bytes(), 0) == 7)
            .take(300)
            .enumerate()
            .map(|(i, n)| file(&n, i as u64))
            .collect();
        picked.sort_by(|a, b| a.name.cmp(&b.name));
        let mut pending = Pending::default();
        let (root, s) = build_dir(&mut pending, picked.clone(), 0);
        assert_eq!(s.entry_count, 300);
        let kv = MemKv::new();
        let w = Objs {
            kv: &kv,
            pending: &mut pending,
        };
        let TreeNode::Shard(top) = w.tree(&root).unwrap() else {
            panic!("more than 256 names shard");
        };
        assert_eq!(top.children.len(), 1);
        let bytes = TreeNode::Shard(top).encode();
        assert!(Object::decode(&bytes, "tree").is_ok());
        assert_eq!(names(&w, &root).len(), 300);
        assert_eq!(
            find_in_dir(&w, &root, &picked[123].name)
                .unwrap()
                .unwrap()
                .size,
            picked[123].size
        );
    }

    #[test]
    fn path_changes_create_and_prune_directories() {
        let kv = MemKv::new();
        let mut pending = Pending::default();
        let mut w = Objs {
            kv: &kv,
            pending: &mut pending,
        };
        let root = empty_tree_id();
        w.pending.put(Object::Tree(TreeNode::Leaf(Vec::new())));
        let changes = changes_from_paths(vec![
            (b"a/b/c.txt".to_vec(), Change::Set(file("x", 3))),
            (b"a/d.txt".to_vec(), Change::Set(file("y", 4))),
        ])
        .unwrap();
        let (r1, s1) = apply_root(&mut w, root, changes).unwrap();
        assert_eq!(s1.file_count, 2);
        assert_eq!(s1.total_size, 7);
        assert_eq!(names(&w, &r1), ["a/b/c.txt", "a/d.txt"]);
        let changes = changes_from_paths(vec![(b"a/b/c.txt".to_vec(), Change::Remove)]).unwrap();
        let (r2, _) = apply_root(&mut w, r1, changes).unwrap();
        assert_eq!(names(&w, &r2), ["a/d.txt"]);
        assert!(
            lookup(&w, &r2, b"a/b").unwrap().is_none(),
            "emptied directory pruned"
        );
        assert!(split_path(b"a/../b").is_err());
    }

    #[test]
    fn merge_later_wins_and_keeps_others() {
        let kv = MemKv::new();
        let mut pending = Pending::default();
        let (a, _) = build_dir(&mut pending, vec![file("p", 1), file("q", 2)], 0);
        let (b, _) = build_dir(&mut pending, vec![file("q", 20), file("r", 3)], 0);
        let mut w = Objs {
            kv: &kv,
            pending: &mut pending,
        };
        let (m, s) = merge_dirs(&mut w, a, b).unwrap();
        assert_eq!(s.entry_count, 3);
        assert_eq!(find_in_dir(&w, &m, b"q").unwrap().unwrap().size, 20);
    }
}
