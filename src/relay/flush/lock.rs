//! The flush lock: one flush at a time, across processes.

use std::path::{Path, PathBuf};

/// The exclusive flush lock: `<store path>.flush.lock`, flock(2)ed.
pub struct FlushLock(#[allow(dead_code)] std::fs::File);

impl FlushLock {
    pub fn path(store: &Path) -> PathBuf {
        let mut p = store.as_os_str().to_owned();
        p.push(".flush.lock");
        PathBuf::from(p)
    }

    /// Waits until no other flush runs, here or in another process.
    pub async fn acquire(store: &Path) -> Result<FlushLock, String> {
        let store = store.to_path_buf();
        tokio::task::spawn_blocking(move || Self::acquire_blocking(&store, |_| {}))
            .await
            .map_err(|e| e.to_string())?
    }

    /// The same, for a thread that may block; `waiting` is called once
    /// when another flush holds the lock (to tell the user why).
    pub fn acquire_blocking(
        store: &Path,
        waiting: impl FnOnce(&Path),
    ) -> Result<FlushLock, String> {
        let path = Self::path(store);
        let err = |e: std::io::Error| format!("flush lock {}: {e}", path.display());
        // Made like the store (0600, the directory's owner when root makes
        // it); flock needs no write access, so a lock file another user
        // made (root, with an older outpost) does not stop the daemon.
        crate::queue::private_file(&path).map_err(err)?;
        let f = std::fs::File::open(&path).map_err(err)?;
        match f.try_lock() {
            Ok(()) => return Ok(FlushLock(f)),
            Err(std::fs::TryLockError::WouldBlock) => waiting(&path),
            Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
        }
        f.lock().map_err(err)?;
        Ok(FlushLock(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_is_private_and_may_be_someone_elses() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("q.sqlite");
        drop(FlushLock::acquire_blocking(&store, |_| {}).unwrap());
        let path = FlushLock::path(&store);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // One this process may only read (as the daemon finds a lock file
        // root made with an older outpost) still locks.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        drop(FlushLock::acquire_blocking(&store, |_| {}).unwrap());
    }

    #[tokio::test]
    async fn flush_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("q.sqlite");
        let a = FlushLock::acquire(&store).await.unwrap();
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { FlushLock::acquire(&store).await.map(|_| ()) }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a second flush must wait");
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
