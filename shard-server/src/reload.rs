//! Files the shard re-reads while serving: the token key ring, the revocation list and the
//! device port's TLS certificate and key.
//!
//! Each is read every `RELOAD_INTERVAL_SECS` and applied when its bytes changed. Polling the
//! contents (rather than watching inode events) follows Kubernetes Secret and ConfigMap
//! mounts, which swap a symlink to a new directory, as well as files edited in place. A new
//! version that does not parse is logged and ignored: the shard keeps serving with the last
//! good one.

use std::path::PathBuf;

/// One file and the bytes last applied from it.
#[derive(Debug)]
pub struct Watched {
    path: PathBuf,
    last: Option<Vec<u8>>,
}

impl Watched {
    /// Watches `path`; `initial` is what was applied at start, so only a change is reported.
    pub fn new(path: PathBuf, initial: Option<Vec<u8>>) -> Self {
        Watched { path, last: initial }
    }

    /// The path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The file's bytes when they differ from the last ones taken; `Ok(None)` when unchanged.
    /// Call [`Watched::taken`] once they have been applied.
    pub fn changed(&self) -> std::io::Result<Option<Vec<u8>>> {
        let now = std::fs::read(&self.path)?;
        Ok((self.last.as_deref() != Some(&now[..])).then_some(now))
    }

    /// Records `bytes` as applied.
    pub fn taken(&mut self, bytes: Vec<u8>) {
        self.last = Some(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_a_change_once_it_is_taken() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("f");
        std::fs::write(&p, b"a").expect("write");
        let mut w = Watched::new(p.clone(), Some(b"a".to_vec()));
        assert_eq!(w.changed().expect("read"), None);
        std::fs::write(&p, b"b").expect("write");
        assert_eq!(w.changed().expect("read"), Some(b"b".to_vec()));
        w.taken(b"b".to_vec());
        assert_eq!(w.changed().expect("read"), None);
        std::fs::remove_file(&p).expect("rm");
        assert!(w.changed().is_err());
    }
}
