//! A run folder this process may write into: made private when new (mode 0700), and
//! refused when another user could plant links or files in it.
//!
//! Every process of a run (`tandem run`, the coordinator, the trainer) writes its
//! files there by name (logs, `config.toml`, tokens, the coordinator's state,
//! checkpoints). A folder another user can write in, or one below a folder another user
//! can write in (and rename it away), would let that user plant a link where a file is
//! about to be written and have this process (perhaps root) overwrite what the link
//! points at. So the folder must be owned by this user and writable by no one else, and
//! every folder above it owned by this user or root and writable by no one else unless
//! it is sticky (like `/tmp`, where no one may rename another's entry). Writable by this
//! process's own group counts as its own (a container's volume with `fsGroup`).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Makes `dir` (mode 0700 when it is created) and checks that no other user controls it
/// or a folder above it; the error names the folder and the fix.
pub fn prepare(dir: &Path) -> Result<()> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("creating the run folder {}", dir.display()), e))?;
    }
    check(dir)
}

/// The check of [`prepare`], for a folder that exists.
pub fn check(dir: &Path) -> Result<()> {
    // This process's effective uid and gid: the owners of its /proc entry.
    let (me, group) = std::fs::metadata("/proc/self")
        .map(|m| (m.uid(), m.gid()))
        .map_err(|e| Error::io("reading this process's uid", e))?;
    // Writable by a user other than this one: by anyone, or by a group that is not this
    // process's own (a container's volume shared with its own group, `fsGroup`, is fine).
    let others_write = |m: &std::fs::Metadata| {
        m.mode() & 0o002 != 0 || (m.mode() & 0o020 != 0 && m.gid() != group)
    };
    let real = dir
        .canonicalize()
        .map_err(|e| Error::io(format!("the run folder {}", dir.display()), e))?;
    let meta = std::fs::metadata(&real).map_err(|e| Error::io(real.display().to_string(), e))?;
    if !meta.is_dir() {
        return Err(Error::RunDir(format!(
            "[run] run_dir: {} is not a folder",
            dir.display()
        )));
    }
    if meta.uid() != me {
        return Err(Error::RunDir(format!(
            "[run] run_dir: {} belongs to uid {}, not to this user (uid {me}): another user could plant links there that this process would write through; choose a run_dir of your own",
            real.display(),
            meta.uid()
        )));
    }
    if others_write(&meta) {
        return Err(Error::RunDir(format!(
            "[run] run_dir: {} is writable by other users (mode {:o}): they could plant links there that this process would write through; `chmod go-w {}`",
            real.display(),
            meta.mode() & 0o7777,
            real.display()
        )));
    }
    let mut above: Option<PathBuf> = real.parent().map(Path::to_path_buf);
    while let Some(p) = above {
        let m = std::fs::metadata(&p).map_err(|e| Error::io(p.display().to_string(), e))?;
        let owner_ok = m.uid() == me || m.uid() == 0;
        let sticky = m.mode() & 0o1000 != 0;
        if !owner_ok || (others_write(&m) && !sticky) {
            return Err(Error::RunDir(format!(
                "[run] run_dir: {} lies below {}, which {} (mode {:o}, uid {}): another user could replace the run folder; choose a run_dir below folders only you or root can change",
                real.display(),
                p.display(),
                if owner_ok { "other users may write in" } else { "another user owns" },
                m.mode() & 0o7777,
                m.uid()
            )));
        }
        above = p.parent().map(Path::to_path_buf);
    }
    Ok(())
}

/// Opens `path` for writing (appending when `append`, else truncating; created with
/// mode 0600) without following a symbolic link at its name.
pub fn open_log(path: &Path, append: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            Error::io(
                format!("opening {} (a link there is refused)", path.display()),
                e,
            )
        })
}

/// Writes `text` to `path` readable by this user only, atomically: a new temporary file
/// (never through a link), synced, then renamed over `path`.
pub fn write_private_atomic(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("renaming to {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_new_run_folder_is_private_and_ours() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("runs/a");
        prepare(&run).unwrap();
        let m = std::fs::metadata(&run).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        // Writable by others: refused with the fix.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check(&run).unwrap_err().to_string();
        assert!(
            e.contains("writable by other users") && e.contains("chmod go-w"),
            "{e}"
        );
        // Below a folder others may write in (not sticky): refused.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        let parent = d.path().join("runs");
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check(&run).unwrap_err().to_string();
        assert!(e.contains("other users may write in"), "{e}");
        // Sticky, like /tmp: fine.
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check(&run).unwrap();
        // A file is not a run folder.
        let file = d.path().join("file");
        std::fs::write(&file, "").unwrap();
        let e = check(&file).unwrap_err().to_string();
        assert!(e.contains("is not a folder"), "{e}");
    }

    #[test]
    fn logs_and_private_files_do_not_follow_links() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("victim");
        std::fs::write(&target, "precious").unwrap();
        let log = d.path().join("coordinator.log");
        std::os::unix::fs::symlink(&target, &log).unwrap();
        let e = open_log(&log, true).unwrap_err().to_string();
        assert!(e.contains("link"), "{e}");
        let cfg = d.path().join("config.toml");
        std::os::unix::fs::symlink(&target, d.path().join("config.tmp")).unwrap();
        write_private_atomic(&cfg, "[run]\n").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "[run]\n");
        let m = std::fs::symlink_metadata(&cfg).unwrap();
        assert!(m.is_file() && m.mode() & 0o077 == 0, "{:o}", m.mode());
    }
}
