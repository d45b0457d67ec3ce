//! The tree diff (with sharding, subtree skipping and rename pairing)
//! against a naive model that compares two flat maps.

use std::collections::{BTreeMap, VecDeque};

use dsv_store::id::hash;
use dsv_store::kv::MemKv;
use dsv_store::object::{Entry, EntryTarget, Object, TreeNode};
use dsv_store::tree::{apply_root, changes_from_paths, Change, Objs, Pending};
use dsv_store::ObjectId;
use proptest::prelude::*;

type Model = BTreeMap<String, (u8, bool)>;

fn entry(content: u8, exec: bool) -> Entry {
    Entry {
        name: Vec::new(),
        mode: if exec { 0o755 } else { 0o644 },
        size: content as u64,
        target: EntryTarget::File(ObjectId(hash(&[content]))),
    }
}

fn build(w: &mut Objs<'_>, base: ObjectId, from: &Model, to: &Model) -> ObjectId {
    let mut changes = Vec::new();
    for (p, (c, x)) in to {
        if from.get(p) != Some(&(*c, *x)) {
            changes.push((p.clone().into_bytes(), Change::Set(entry(*c, *x))));
        }
    }
    for p in from.keys().filter(|p| !to.contains_key(*p)) {
        changes.push((p.clone().into_bytes(), Change::Remove));
    }
    if changes.is_empty() {
        return base;
    }
    apply_root(w, base, changes_from_paths(changes).unwrap())
        .unwrap()
        .0
}

#[derive(Debug, PartialEq, Eq, Default)]
struct Expected {
    added: Vec<String>,
    modified: Vec<String>,
    removed: Vec<String>,
    renamed: Vec<(String, String)>,
}

fn naive(a: &Model, b: &Model) -> Expected {
    let mut e = Expected::default();
    let mut removed: Vec<String> = a.keys().filter(|k| !b.contains_key(*k)).cloned().collect();
    let added: Vec<String> = b.keys().filter(|k| !a.contains_key(*k)).cloned().collect();
    e.modified = a
        .keys()
        .filter(|k| b.get(*k).is_some_and(|v| a[*k] != *v))
        .cloned()
        .collect();
    let mut by: BTreeMap<(u8, bool), VecDeque<usize>> = BTreeMap::new();
    for (i, p) in removed.iter().enumerate() {
        by.entry(a[p]).or_default().push_back(i);
    }
    let mut taken = vec![false; removed.len()];
    for p in added {
        match by.get_mut(&b[&p]).and_then(|q| q.pop_front()) {
            Some(i) => {
                taken[i] = true;
                e.renamed.push((removed[i].clone(), p));
            }
            None => e.added.push(p),
        }
    }
    let mut i = 0;
    removed.retain(|_| {
        i += 1;
        !taken[i - 1]
    });
    e.removed = removed;
    e.renamed.sort_by(|x, y| x.1.cmp(&y.1));
    e
}

fn model_strategy() -> impl Strategy<Value = Model> {
    let path = prop_oneof![
        (0u16..700).prop_map(|n| format!("big/f{n:03}")),
        (0u16..40).prop_map(|n| format!("small/f{n:02}")),
        (0u16..30).prop_map(|n| format!("g{n:02}")),
    ];
    prop::collection::btree_map(path, (0u8..12, any::<bool>()), 0..900)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn diff_equals_the_naive_model(a in model_strategy(), b in model_strategy(), keep in 0.0f64..1.0) {
        // Make b share most of a, so both large and small differences occur.
        let mut b2: Model = a.iter().filter(|(k, _)| (hash(k.as_bytes())[0] as f64 / 255.0) < keep).map(|(k, v)| (k.clone(), *v)).collect();
        for (k, v) in b.iter().take(b.len() / 4) {
            b2.insert(k.clone(), *v);
        }
        let kv = MemKv::new();
        let mut pending = Pending::default();
        let empty = pending.put(Object::Tree(TreeNode::Leaf(Vec::new())));
        let mut w = Objs { kv: &kv, pending: &mut pending };
        let ta = build(&mut w, empty, &Model::new(), &a);
        let tb_edit = build(&mut w, ta, &a, &b2);
        let tb_fresh = build(&mut w, empty, &Model::new(), &b2);
        prop_assert_eq!(tb_edit, tb_fresh, "edits and a fresh build give the same tree id");
        let d = dsv_store::diff::diff_trees(&w, &ta, &tb_edit).unwrap();
        let s = |v: &[u8]| String::from_utf8(v.to_vec()).unwrap();
        let got = Expected {
            added: d.added.iter().map(|p| s(&p.path)).collect(),
            modified: d.modified.iter().map(|p| s(&p.path)).collect(),
            removed: d.removed.iter().map(|p| s(&p.path)).collect(),
            renamed: d.renamed.iter().map(|r| (s(&r.from), s(&r.to))).collect(),
        };
        prop_assert_eq!(got, naive(&a, &b2));
    }
}
