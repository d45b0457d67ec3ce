//! Differences between two trees, in time proportional to what changed:
//! equal subtree ids are skipped without being read, shard nodes at the same
//! level are compared bucket by bucket, and files that moved (same content,
//! new path) are reported as renames.

use std::collections::{BTreeMap, VecDeque};

use crate::error::Result;
use crate::id::{hash, ObjectId};
use crate::object::{Delta, Entry, EntryTarget, TreeNode};
use crate::tree::{join, list_dir, list_node, walk_files, ObjectRead};

/// A path and its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathEntry {
    /// Full `/`-separated path.
    pub path: Vec<u8>,
    /// The entry (name is the last component).
    pub entry: Entry,
}

/// A file whose content or mode changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Modified {
    /// Full path.
    pub path: Vec<u8>,
    /// Before.
    pub old: Entry,
    /// After.
    pub new: Entry,
}

/// A file that moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renamed {
    /// Old path.
    pub from: Vec<u8>,
    /// New path.
    pub to: Vec<u8>,
    /// The entry at its new path.
    pub entry: Entry,
}

/// What changed between two trees (files and symlinks; directories are
/// implied by the paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// New paths, sorted.
    pub added: Vec<PathEntry>,
    /// Changed paths, sorted.
    pub modified: Vec<Modified>,
    /// Removed paths, sorted.
    pub removed: Vec<PathEntry>,
    /// Moved paths, sorted by new path.
    pub renamed: Vec<Renamed>,
}

impl Diff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.modified.is_empty()
            && self.removed.is_empty()
            && self.renamed.is_empty()
    }

    /// Counts and logical bytes (`stored_bytes` is left 0 for the caller).
    pub fn delta(&self) -> Delta {
        Delta {
            added: self.added.len() as u64,
            modified: self.modified.len() as u64,
            removed: self.removed.len() as u64,
            renamed: self.renamed.len() as u64,
            added_bytes: self.added.iter().map(|p| p.entry.size).sum::<u64>()
                + self.modified.iter().map(|m| m.new.size).sum::<u64>(),
            stored_bytes: 0,
        }
    }
}

/// Compares tree `a` (before) with tree `b` (after).
pub fn diff_trees(r: &dyn ObjectRead, a: &ObjectId, b: &ObjectId) -> Result<Diff> {
    let mut d = Diff::default();
    diff_dirs(r, b"", a, b, &mut d)?;
    detect_renames(&mut d);
    d.added.sort_by(|x, y| x.path.cmp(&y.path));
    d.removed.sort_by(|x, y| x.path.cmp(&y.path));
    d.modified.sort_by(|x, y| x.path.cmp(&y.path));
    d.renamed.sort_by(|x, y| x.to.cmp(&y.to));
    Ok(d)
}

fn all_below(r: &dyn ObjectRead, path: &[u8], e: &Entry, out: &mut Vec<PathEntry>) -> Result<()> {
    match e.target {
        EntryTarget::Dir { id, .. } => walk_files(r, &id, path, &mut |p, e| {
            out.push(PathEntry {
                path: p.to_vec(),
                entry: e.clone(),
            });
            Ok(())
        }),
        _ => {
            out.push(PathEntry {
                path: path.to_vec(),
                entry: e.clone(),
            });
            Ok(())
        }
    }
}

fn diff_dirs(
    r: &dyn ObjectRead,
    path: &[u8],
    a: &ObjectId,
    b: &ObjectId,
    d: &mut Diff,
) -> Result<()> {
    if a == b {
        return Ok(());
    }
    let na = r.tree(a)?;
    let nb = r.tree(b)?;
    if let (TreeNode::Shard(sa), TreeNode::Shard(sb)) = (&na, &nb) {
        if sa.level == sb.level {
            let ca: BTreeMap<u8, ObjectId> = sa.children.iter().copied().collect();
            let cb: BTreeMap<u8, ObjectId> = sb.children.iter().copied().collect();
            let mut buckets: Vec<u8> = ca.keys().chain(cb.keys()).copied().collect();
            buckets.sort_unstable();
            buckets.dedup();
            for bucket in buckets {
                match (ca.get(&bucket), cb.get(&bucket)) {
                    (Some(x), Some(y)) => diff_dirs(r, path, x, y, d)?,
                    (Some(x), None) => {
                        for e in list_dir(r, x)? {
                            all_below(r, &join(path, &e.name), &e, &mut d.removed)?;
                        }
                    }
                    (None, Some(y)) => {
                        for e in list_dir(r, y)? {
                            all_below(r, &join(path, &e.name), &e, &mut d.added)?;
                        }
                    }
                    (None, None) => {}
                }
            }
            return Ok(());
        }
    }
    let ea = list_node(r, na)?;
    let eb = list_node(r, nb)?;
    let (mut i, mut j) = (0, 0);
    while i < ea.len() || j < eb.len() {
        let ord = match (ea.get(i), eb.get(j)) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Less => {
                let x = &ea[i];
                all_below(r, &join(path, &x.name), x, &mut d.removed)?;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                let y = &eb[j];
                all_below(r, &join(path, &y.name), y, &mut d.added)?;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (x, y) = (&ea[i], &eb[j]);
                let p = join(path, &x.name);
                match (&x.target, &y.target) {
                    (EntryTarget::Dir { id: ia, .. }, EntryTarget::Dir { id: ib, .. }) => {
                        diff_dirs(r, &p, ia, ib, d)?
                    }
                    (EntryTarget::Dir { .. }, _) | (_, EntryTarget::Dir { .. }) => {
                        all_below(r, &p, x, &mut d.removed)?;
                        all_below(r, &p, y, &mut d.added)?;
                    }
                    (tx, ty) => {
                        if tx != ty || x.mode != y.mode {
                            d.modified.push(Modified {
                                path: p,
                                old: x.clone(),
                                new: y.clone(),
                            });
                        }
                    }
                }
                i += 1;
                j += 1;
            }
        }
    }
    Ok(())
}

/// Identity of an entry's content, for rename matching.
fn content_key(e: &Entry) -> Option<[u8; 32]> {
    match &e.target {
        EntryTarget::File(id) => Some(id.0),
        EntryTarget::Symlink(t) => {
            let mut v = b"symlink:".to_vec();
            v.extend_from_slice(t);
            Some(hash(&v))
        }
        EntryTarget::Dir { .. } => None,
    }
}

fn detect_renames(d: &mut Diff) {
    if d.added.is_empty() || d.removed.is_empty() {
        return;
    }
    d.removed.sort_by(|x, y| x.path.cmp(&y.path));
    d.added.sort_by(|x, y| x.path.cmp(&y.path));
    let mut by_content: BTreeMap<([u8; 32], u32), VecDeque<usize>> = BTreeMap::new();
    for (i, p) in d.removed.iter().enumerate() {
        if let Some(k) = content_key(&p.entry) {
            by_content
                .entry((k, p.entry.mode))
                .or_default()
                .push_back(i);
        }
    }
    let mut taken = vec![false; d.removed.len()];
    let mut still_added = Vec::with_capacity(d.added.len());
    for p in std::mem::take(&mut d.added) {
        let hit = content_key(&p.entry)
            .and_then(|k| by_content.get_mut(&(k, p.entry.mode)))
            .and_then(|q| q.pop_front());
        match hit {
            Some(i) => {
                taken[i] = true;
                d.renamed.push(Renamed {
                    from: d.removed[i].path.clone(),
                    to: p.path,
                    entry: p.entry,
                });
            }
            None => still_added.push(p),
        }
    }
    d.added = still_added;
    let mut k = 0;
    d.removed.retain(|_| {
        let keep = !taken[k];
        k += 1;
        keep
    });
}
