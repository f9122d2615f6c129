//! The persistent cache of tuning winners: one versioned JSON file per key in the user's
//! cache directory (`$ATTNC_CACHE_DIR`, else the platform cache dir + `attnc`).
//!
//! Writes are atomic (a temporary file in the same directory, then a rename), so a reader
//! never sees half a file even with concurrent tuners; the last writer wins. A corrupt,
//! unreadable or older-version file is ignored with a warning (returned to the caller to
//! print), never a crash.

use crate::tuner::{Outcome, Trial};
use crate::TuneKey;
use attnc_codegen::BackendOptions;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bumped when the entry format or its meaning changes; older entries are ignored.
pub const CACHE_VERSION: u32 = 2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, bound = "O: BackendOptions")]
pub struct TrialRecord<O> {
    pub name: String,
    pub predicted_s: f64,
    /// Median seconds when timed.
    pub median_s: Option<f64>,
    /// Fastest sample in seconds when timed (what the winner is chosen by).
    pub best_s: Option<f64>,
    /// `timed`, `untimed`, `disqualified: …`, `failed: …`, `stopped after …`.
    pub status: String,
    pub options: O,
}

impl<O: BackendOptions> Default for TrialRecord<O> {
    fn default() -> Self {
        TrialRecord { name: String::new(), predicted_s: 0.0, median_s: None, best_s: None, status: String::new(), options: O::default() }
    }
}

impl<O: BackendOptions> TrialRecord<O> {
    pub fn from_trial(t: &Trial<O>) -> TrialRecord<O> {
        let (median_s, status) = match &t.outcome {
            Outcome::Timed { median, .. } => (Some(*median), "timed".to_string()),
            Outcome::Untimed => (None, "untimed (only survivor)".to_string()),
            Outcome::Disqualified(why) => (None, format!("disqualified: {why}")),
            Outcome::Failed(why) => (None, format!("failed: {why}")),
            Outcome::Stopped(s) => (None, format!("stopped after a {:.1} ms sample", s * 1e3)),
        };
        let best_s = t.outcome.best();
        TrialRecord { name: t.candidate.name.clone(), predicted_s: t.candidate.predicted, median_s, best_s, status, options: t.candidate.options.clone() }
    }
}

/// A tuned winner: the backend's options (`O`) and the record of every trial.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, bound = "O: BackendOptions")]
pub struct CacheEntry<O> {
    pub version: u32,
    /// The key in readable form (for people looking at the file).
    pub key: String,
    pub winner: String,
    pub options: O,
    /// Passes the winner switches off on top of the configuration it was tuned under.
    #[serde(default)]
    pub passes_off: Vec<String>,
    pub trials: Vec<TrialRecord<O>>,
}

pub struct TuneCache {
    pub dir: PathBuf,
}

impl TuneCache {
    /// `$ATTNC_CACHE_DIR`, else `<user cache dir>/attnc`, else `./.attnc-cache`.
    pub fn open_default() -> TuneCache {
        let dir = match std::env::var_os("ATTNC_CACHE_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => dirs::cache_dir().map(|d| d.join("attnc")).unwrap_or_else(|| PathBuf::from(".attnc-cache")),
        };
        TuneCache { dir }
    }

    pub fn at(dir: &Path) -> TuneCache {
        TuneCache { dir: dir.to_path_buf() }
    }

    fn path(&self, key: &TuneKey) -> PathBuf {
        self.dir.join(format!("{}-{}.json", key.backend, key.id()))
    }

    /// The entry for `key`: `Ok(None)` when there is none, `Err(warning)` when a file is
    /// there but unusable (corrupt, unreadable, another version).
    pub fn get<O: BackendOptions>(&self, key: &TuneKey) -> Result<Option<CacheEntry<O>>, String> {
        let p = self.path(key);
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("ignoring the tuning cache entry {}: {e}", p.display())),
        };
        let entry: CacheEntry<O> = serde_json::from_str(&text).map_err(|e| format!("ignoring the corrupt tuning cache entry {}: {e}", p.display()))?;
        if entry.version != CACHE_VERSION {
            return Err(format!("ignoring the tuning cache entry {} (format version {}, this attnc writes {CACHE_VERSION})", p.display(), entry.version));
        }
        Ok(Some(entry))
    }

    /// Stores `entry` for `key` atomically.
    pub fn put<O: BackendOptions>(&self, key: &TuneKey, entry: &CacheEntry<O>) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let p = self.path(key);
        // Unique per writer (process and call), so concurrent writers never share a file.
        static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!(".{}.{}.{n}.tmp", key.id(), std::process::id()));
        let text = serde_json::to_string_pretty(entry).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &p)?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attnc_codegen::cpu::CpuOptions;
    use attnc_codegen::schedule::ScheduleOptions;
    type CacheEntry = super::CacheEntry<CpuOptions>;

    fn key(candidates: &[&str]) -> TuneKey {
        TuneKey {
            kernel_hash: "abc".into(),
            bucket: vec![("N".into(), 1024)],
            dtypes: vec![("q".into(), "f32".into())],
            backend: "cpu".into(),
            device: "cpu:x86_64+avx2".into(),
            compiler: "attnc test".into(),
            candidates: crate::checksum(&candidates.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
        }
    }

    fn entry() -> CacheEntry {
        CacheEntry {
            version: CACHE_VERSION,
            key: "k".into(),
            winner: "tiled 64x64".into(),
            options: CpuOptions::with_schedule(ScheduleOptions { block_q: 32, ..ScheduleOptions::default() }),
            passes_off: vec!["lowrank".into()],
            trials: vec![],
        }
    }

    #[test]
    fn round_trip_and_miss() {
        let dir = tempfile::tempdir().unwrap();
        let c = TuneCache::at(dir.path());
        assert_eq!(c.get::<CpuOptions>(&key(&["a"])), Ok(None));
        c.put(&key(&["a"]), &entry()).unwrap();
        assert_eq!(c.get(&key(&["a"])), Ok(Some(entry())));
        // Another candidate set is another key.
        assert_eq!(c.get::<CpuOptions>(&key(&["a", "b"])), Ok(None));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn corrupt_and_stale_entries_are_ignored_with_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let c = TuneCache::at(dir.path());
        let k = key(&["a"]);
        let p = c.put(&k, &entry()).unwrap();
        std::fs::write(&p, "{ not json").unwrap();
        let w = c.get::<CpuOptions>(&k).unwrap_err();
        assert!(w.contains("corrupt"), "{w}");
        let old = CacheEntry { version: CACHE_VERSION + 1, ..entry() };
        std::fs::write(&p, serde_json::to_string(&old).unwrap()).unwrap();
        let w = c.get::<CpuOptions>(&k).unwrap_err();
        assert!(w.contains("version"), "{w}");
        // A later tune simply overwrites the bad file.
        c.put(&k, &entry()).unwrap();
        assert_eq!(c.get(&k), Ok(Some(entry())));
    }

    #[test]
    fn concurrent_writers_leave_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(&["a"]);
        std::thread::scope(|s| {
            for n in 0..8 {
                let (d, k) = (dir.path().to_path_buf(), k.clone());
                s.spawn(move || {
                    let e = CacheEntry { winner: format!("w{n}"), ..entry() };
                    for _ in 0..20 {
                        TuneCache::at(&d).put(&k, &e).unwrap();
                    }
                });
            }
        });
        let got = TuneCache::at(dir.path()).get::<CpuOptions>(&k).unwrap().expect("an entry");
        assert!(got.winner.starts_with('w'));
    }
}
