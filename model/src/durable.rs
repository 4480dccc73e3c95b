//! Files that survive a crash or power loss once a rename has published them: the
//! bytes are flushed to disk (fsync) before the rename, and the directory after it, so
//! after a crash a reader finds the old version or the new, complete one.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Flushes the file at `path` to disk.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Flushes a directory's entries (names created, renamed or removed in it) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(dir, e))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Flushes every file under `dir` (recursively) and then the directories themselves.
pub fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            sync_file(&path)?;
        }
    }
    sync_dir(dir)
}

/// Moves the finished `tmp` (a file or a folder, already synced) to `dest` and syncs
/// `dest`'s directory, so the rename itself is durable.
pub fn publish(tmp: &Path, dest: &Path) -> Result<()> {
    std::fs::rename(tmp, dest).map_err(|e| Error::io(dest, e))?;
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}

/// Appends `line` and a newline to `path` with one write on a file opened for
/// appending, so concurrent readers see whole lines (a crash can leave at most one
/// torn last line, which readers of JSONL logs skip).
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let mut bytes = String::with_capacity(line.len() + 1);
    bytes.push_str(line);
    bytes.push('\n');
    f.write_all(bytes.as_bytes())
        .map_err(|e| Error::io(path, e))
}

/// The complete lines of a JSONL log that parse: a torn last line (a crash mid-write)
/// is skipped, as is an empty one; a bad line before the last is an error naming it.
pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {
                tracing::warn!(file = %path.display(), "skipping a torn last line");
            }
            Err(e) => return Err(Error::invalid(format!("{}:{}: {e}", path.display(), i + 1))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_skipped_and_a_bad_middle_line_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        append_line(&p, r#"{"step":1}"#).unwrap();
        append_line(&p, r#"{"step":2}"#).unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(br#"{"step":3,"lo"#).unwrap();
        let rows = read_jsonl(&p).unwrap();
        assert_eq!(rows.len(), 2);
        std::fs::write(&p, "{\"step\":1}\nnot json\n{\"step\":3}\n").unwrap();
        let e = read_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains("m.jsonl:2"), "{e}");
    }

    #[test]
    fn published_files_and_trees_are_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(".x.tmp");
        std::fs::create_dir_all(tmp.join("sub")).unwrap();
        std::fs::write(tmp.join("sub/a"), b"1").unwrap();
        sync_tree(&tmp).unwrap();
        publish(&tmp, &dir.path().join("x")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("x/sub/a")).unwrap(), b"1");
    }
}
