//! Free space on the store's file system, for `store.min_free`.

use std::io;
use std::path::Path;

/// Bytes an unprivileged writer may still use on the file system that
/// holds `path` (statvfs: available blocks × fragment size).
pub fn available(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_directory_has_some_space_and_a_missing_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(super::available(dir.path()).unwrap() > 0);
        assert!(super::available(&dir.path().join("missing")).is_err());
    }
}
