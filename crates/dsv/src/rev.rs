//! Revision specs — one parser used by every command:
//!
//! - `PROJECT/NAME` — the dataset's newest version: the one finalized last
//!   (whatever its version string: `--version 0.9.0` after `1.0.0` is the
//!   newest);
//! - `PROJECT/NAME@1.0.3` — that version string;
//! - `PROJECT/NAME@TAG` — the newest (last finalized) version carrying the tag;
//! - a unique prefix (≥ 6 hex digits) of a version id.
//!
//! The project is everything before the last `/` (projects may nest:
//! `vision/cams/day`), the name the last segment.

use crate::error::{Error, Result};

/// A parsed revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevSpec {
    /// A dataset, optionally narrowed by `@selector` (version or tag).
    Dataset {
        /// Project.
        project: String,
        /// Name.
        name: String,
        /// Version string or tag after `@`.
        selector: Option<String>,
    },
    /// A version id prefix.
    Id(String),
}

/// Minimum hex digits of an id prefix.
pub const MIN_PREFIX: usize = 6;

impl RevSpec {
    /// Parses a revision string.
    pub fn parse(s: &str) -> Result<RevSpec> {
        let bad = |reason: &str| Error::InvalidRevision {
            spec: s.to_string(),
            reason: reason.to_string(),
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(bad("empty"));
        }
        if !t.contains('/') && !t.contains('@') {
            if t.chars().all(|c| c.is_ascii_hexdigit()) {
                if t.len() < MIN_PREFIX {
                    return Err(bad("an id prefix needs at least 6 hex digits"));
                }
                if t.len() > 64 {
                    return Err(bad("longer than a 64-digit id"));
                }
                return Ok(RevSpec::Id(t.to_ascii_lowercase()));
            }
            return Err(bad(
                "expected PROJECT/NAME, PROJECT/NAME@VERSION, PROJECT/NAME@TAG or an id prefix",
            ));
        }
        let (path, selector) = match t.rsplit_once('@') {
            Some((p, sel)) => {
                if sel.is_empty() {
                    return Err(bad("nothing after '@'"));
                }
                (p, Some(sel.to_string()))
            }
            None => (t, None),
        };
        let (project, name) = split_dataset(path).map_err(|r| bad(&r))?;
        Ok(RevSpec::Dataset {
            project,
            name,
            selector,
        })
    }
}

/// Splits `PROJECT/NAME` (project may contain `/`) and validates both.
pub fn split_dataset(path: &str) -> std::result::Result<(String, String), String> {
    let Some((project, name)) = path.rsplit_once('/') else {
        return Err("expected PROJECT/NAME".into());
    };
    validate_part(project, "project")?;
    validate_part(name, "name")?;
    if project.split('/').any(str::is_empty) {
        return Err("empty project segment".into());
    }
    Ok((project.to_string(), name.to_string()))
}

fn validate_part(s: &str, what: &str) -> std::result::Result<(), String> {
    if s.is_empty() {
        return Err(format!("empty {what}"));
    }
    if s.len() > 200 {
        return Err(format!("{what} longer than 200 bytes"));
    }
    if s.chars().any(|c| c.is_control() || c == '@') {
        return Err(format!("{what} contains '@' or a control character"));
    }
    for seg in s.split('/') {
        if seg == "." || seg == ".." {
            return Err(format!("{what} has a '{seg}' segment"));
        }
        if seg.trim() != seg {
            return Err(format!(
                "{what} segment '{seg}' starts or ends with white space"
            ));
        }
    }
    Ok(())
}

/// Parses `PROJECT/NAME` alone (no selector, no id). Nothing is trimmed: a
/// name that could not be typed back as a revision is refused.
pub fn parse_dataset_name(s: &str) -> Result<(String, String)> {
    split_dataset(s).map_err(|reason| Error::InvalidRevision {
        spec: s.to_string(),
        reason,
    })
}

/// Checks a dataset tag: printable, no `@` or `/` and no surrounding white
/// space (`PROJECT/NAME@TAG` must find it), and neither a version string
/// (`PROJECT/NAME@1.0.0` names the version first) nor something that reads
/// as a version id prefix (6+ hex digits).
pub fn validate_tag(t: &str) -> Result<()> {
    dsv_store::store::validate_label(t, "tag")?;
    let bad = |why: &str| Err(Error::Invalid(format!("invalid tag '{t}': {why}")));
    if t.trim() != t {
        return bad("starts or ends with white space");
    }
    if t.contains('@') || t.contains('/') {
        return bad("contains '@' or '/'");
    }
    if semver::Version::parse(t.trim_start_matches('v')).is_ok() {
        return bad("it is a version string; PROJECT/NAME@VERSION names versions");
    }
    if t.len() >= MIN_PREFIX && t.chars().all(|c| c.is_ascii_hexdigit()) {
        return bad("6 or more hex digits read as a version id");
    }
    Ok(())
}

/// Checks a folder inside a dataset (`--dataset-path`): relative, `/`
/// separated, without empty, `.`, `..` or `.dsv` segments (a trailing `/`
/// is allowed). `""` is the dataset's root.
pub fn validate_dataset_path(p: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::Invalid(format!("invalid dataset path '{p}': {why}")));
    if p.starts_with('/') {
        return bad("absolute; give a folder inside the dataset, like 'images/train'");
    }
    let inner = p.strip_suffix('/').unwrap_or(p);
    if inner.is_empty() {
        return Ok(());
    }
    for seg in inner.split('/') {
        match seg {
            "" => return bad("empty segment"),
            "." | ".." => return bad("'.' and '..' segments are not allowed"),
            ".dsv" => return bad("'.dsv' is the repository folder's name"),
            s if s.chars().any(char::is_control) => return bad("control character"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            RevSpec::parse("sensors/occupancy").unwrap(),
            RevSpec::Dataset {
                project: "sensors".into(),
                name: "occupancy".into(),
                selector: None
            }
        );
        assert_eq!(
            RevSpec::parse("a/b/c@1.0.3").unwrap(),
            RevSpec::Dataset {
                project: "a/b".into(),
                name: "c".into(),
                selector: Some("1.0.3".into())
            }
        );
        assert_eq!(
            RevSpec::parse("p/n@production").unwrap(),
            RevSpec::Dataset {
                project: "p".into(),
                name: "n".into(),
                selector: Some("production".into())
            }
        );
        assert_eq!(
            RevSpec::parse("ABCdef12").unwrap(),
            RevSpec::Id("abcdef12".into())
        );
    }

    #[test]
    fn rejects_bad_specs() {
        for s in [
            "",
            "abc",
            "xyz",
            "p/",
            "/n",
            "p/n@",
            "p//q/n",
            "nothex-no-slash",
        ] {
            assert!(RevSpec::parse(s).is_err(), "{s:?} should not parse");
        }
    }

    #[test]
    fn refuses_names_that_cannot_be_typed_back() {
        for s in [
            "../x", "p/..", "./x", "p/.", "a@b/c", "p/a@b", "p//n", "/n", "p/", " p/n", "p/n ",
            "p /n", "a/ b/n",
        ] {
            assert!(parse_dataset_name(s).is_err(), "{s:?} should be refused");
        }
        assert_eq!(
            parse_dataset_name("vision/cams/day").unwrap(),
            ("vision/cams".to_string(), "day".to_string())
        );
    }

    #[test]
    fn refuses_tags_that_a_revision_cannot_name() {
        for t in [
            "",
            "1.0.0",
            "v2.3.4",
            "1.0.0-rc.1",
            "abcdef",
            "0123456789",
            " x",
            "x ",
            "a@b",
            "a/b",
        ] {
            assert!(validate_tag(t).is_err(), "{t:?} should be refused");
        }
        for t in ["reviewed", "production", "v2", "1.0", "abcde", "face-off"] {
            validate_tag(t).unwrap();
        }
    }

    #[test]
    fn dataset_paths_stay_inside_the_dataset() {
        for p in ["/abs", ".dsv", "a/.dsv/b", "..", "a/../b", "a//b", "./a"] {
            assert!(validate_dataset_path(p).is_err(), "{p:?} should be refused");
        }
        for p in ["", "a", "a/b", "a/b/", "images/train"] {
            validate_dataset_path(p).unwrap();
        }
    }
}
