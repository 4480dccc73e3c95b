//! Secrets on this host's disk (a run's tokens, a private key): files readable by their
//! owner only.

use std::io::Write;
use std::path::Path;

/// Writes `text` to `path` readable by this user only (mode 0600), replacing any older
/// file. The old entry is removed and the new file created exclusively, so a link
/// planted at `path` is replaced, never written through.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    o.mode(0o600);
    o.open(path)?.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_secret_is_private_and_replaces_a_planted_link() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("tandem-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let token = dir.join("token");
        std::os::unix::fs::symlink(&victim, &token).unwrap();
        write_private(&token, "s3cret").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let m = std::fs::symlink_metadata(&token).unwrap();
        assert!(m.is_file(), "the link was followed");
        assert_eq!(m.mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&token).unwrap(), "s3cret");
        // Written again: replaced whole.
        write_private(&token, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&token).unwrap(), "new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
