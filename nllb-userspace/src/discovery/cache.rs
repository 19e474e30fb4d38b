//! The last good controller set on disk, for cold starts before the API
//! answers (and for when it never does).

use std::{
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::addr::BackendAddr;

/// File name under the state directory.
pub const CACHE_FILE: &str = "controllers.json";

/// What is written: the set and which API object it came from, so a cache
/// left by another namespace/service is not taken for this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedSet {
    pub namespace: String,
    pub service: String,
    pub controllers: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read controller cache {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("controller cache {path} is not valid ({why}); delete it, the agent rewrites it from the API")]
    Invalid { path: PathBuf, why: String },
    #[error("cannot write controller cache {path}: {source} (is --state-dir writable?)")]
    Write { path: PathBuf, source: std::io::Error },
}

pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CACHE_FILE)
}

/// The cached set for `namespace/service`; `Ok(None)` when there is none
/// (no file, or one for another service).
pub fn load(state_dir: &Path, namespace: &str, service: &str) -> Result<Option<Vec<IpAddr>>, CacheError> {
    let path = cache_path(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CacheError::Read { path, source }),
    };
    let set: CachedSet =
        serde_json::from_str(&text).map_err(|e| CacheError::Invalid { path: path.clone(), why: e.to_string() })?;
    if set.namespace != namespace || set.service != service {
        return Ok(None);
    }
    // The file may have been edited by hand: hold it to the config's rules.
    let mut out = Vec::new();
    for ip in &set.controllers {
        let ip =
            ip.to_string().parse::<BackendAddr>().map_err(|why| CacheError::Invalid { path: path.clone(), why })?.get();
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out.sort();
    Ok((!out.is_empty()).then_some(out))
}

/// Writes the set so that a reader (or a crash) sees the old file or the
/// new one, never a torn one: temp file, fsync, rename, fsync the directory.
pub fn store(state_dir: &Path, set: &CachedSet) -> Result<(), CacheError> {
    let path = cache_path(state_dir);
    let werr = |source| CacheError::Write { path: path.clone(), source };
    std::fs::create_dir_all(state_dir).map_err(werr)?;
    let tmp = state_dir.join(format!(".{CACHE_FILE}.{}.tmp", std::process::id()));
    let body = serde_json::to_vec_pretty(set).expect("a CachedSet always serializes");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(state_dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        werr(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ips: &[&str]) -> CachedSet {
        CachedSet {
            namespace: "default".into(),
            service: "kubernetes".into(),
            controllers: ips.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn round_trip_and_other_service_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), "default", "kubernetes").unwrap(), None);
        store(dir.path(), &set(&["198.18.2.2", "198.18.1.2"])).unwrap();
        let got = load(dir.path(), "default", "kubernetes").unwrap().unwrap();
        assert_eq!(got, vec!["198.18.1.2".parse::<IpAddr>().unwrap(), "198.18.2.2".parse().unwrap()]);
        assert_eq!(load(dir.path(), "kube-system", "kubernetes").unwrap(), None);
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(CACHE_FILE)]);
    }

    #[test]
    fn garbage_or_loopback_cache_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(cache_path(dir.path()), "{not json").unwrap();
        assert!(matches!(load(dir.path(), "default", "kubernetes"), Err(CacheError::Invalid { .. })));
        store(dir.path(), &set(&["127.0.0.1"])).unwrap();
        assert!(matches!(load(dir.path(), "default", "kubernetes"), Err(CacheError::Invalid { .. })));
    }
}
