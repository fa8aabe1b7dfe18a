//! A round's progress on disk, so a crashed or partial round resumes instead of starting
//! over: per shard the export cursor and the batches received (spooled, length-delimited
//! protobuf), then the computed publish request, then which shards received it.
//!
//! Layout under `--state-dir`: `<round>/checkpoint.json`, `<round>/shard-<n>.spool`,
//! `<round>/publish.bin`. The JSON is replaced atomically (write + rename) after every batch.

use omega_protocol::pb;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// File system.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Corrupt JSON.
    #[error("checkpoint {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// Corrupt spool.
    #[error("checkpoint {path}: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: prost::DecodeError,
    },
}

/// Progress with one shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardProgress {
    /// Admin endpoint.
    pub endpoint: String,
    /// Cursor of the last batch spooled (hex).
    pub cursor: String,
    /// Batches spooled.
    pub batches: u64,
    /// The export finished.
    pub exported: bool,
    /// The round's result was published to it.
    pub published: bool,
}

/// Counts of the computed round, kept with the publish request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutputCounts {
    /// Patterns read.
    pub patterns_in: u64,
    /// Groups formed.
    pub groups: u64,
    /// Groups withheld.
    pub suppressed: u64,
    /// A DP round's accounting as charged when the output was computed (a resumed round
    /// publishes that output and is not charged again).
    #[serde(default)]
    pub privacy: Option<omega_protocol::admin::PrivacyAccounting>,
}

/// The whole state of one round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundState {
    /// Round id.
    pub round_id: String,
    /// Per shard, in `--shards` order.
    pub shards: Vec<ShardProgress>,
    /// Set once `publish.bin` holds the round's result.
    pub output: Option<OutputCounts>,
}

/// Where a round keeps its state; `None` dir keeps nothing (a round then restarts whole).
#[derive(Debug, Clone)]
pub struct Store {
    dir: Option<PathBuf>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// A file-system-safe folder name for a round id.
fn folder(round_id: &str) -> String {
    let safe = round_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !round_id.starts_with('.')
        && !round_id.is_empty();
    if safe { round_id.to_owned() } else { round_id.bytes().map(|b| format!("{b:02x}")).collect() }
}

/// Hex of bytes.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes of hex (empty on malformed input: the export then restarts from the beginning).
pub fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

impl Store {
    /// State under `state_dir/<round>` when a dir is given.
    pub fn new(state_dir: Option<&Path>, round_id: &str) -> Self {
        Store { dir: state_dir.map(|d| d.join(folder(round_id))) }
    }

    /// True when state is kept.
    pub fn persistent(&self) -> bool {
        self.dir.is_some()
    }

    /// The saved state, or a fresh one for these endpoints. Progress of an endpoint no longer
    /// listed is dropped.
    pub fn load(
        &self,
        round_id: &str,
        endpoints: &[String],
    ) -> Result<RoundState, CheckpointError> {
        let fresh = RoundState {
            round_id: round_id.into(),
            shards: endpoints
                .iter()
                .map(|e| ShardProgress { endpoint: e.clone(), ..Default::default() })
                .collect(),
            output: None,
        };
        let Some(dir) = &self.dir else { return Ok(fresh) };
        let path = dir.join("checkpoint.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(fresh),
            Err(e) => return Err(io(&path)(e)),
        };
        let saved: RoundState =
            serde_json::from_str(&text).map_err(|source| CheckpointError::Json { path, source })?;
        let shards = endpoints
            .iter()
            .map(|e| {
                saved
                    .shards
                    .iter()
                    .find(|s| &s.endpoint == e)
                    .cloned()
                    .unwrap_or(ShardProgress { endpoint: e.clone(), ..Default::default() })
            })
            .collect();
        let same_shards = saved.shards.iter().map(|s| &s.endpoint).eq(endpoints.iter());
        Ok(RoundState {
            round_id: round_id.into(),
            shards,
            // The computed result stays valid as long as it was computed for these shards.
            output: saved.output.filter(|_| same_shards || saved.shards.iter().all(|s| s.exported)),
        })
    }

    /// Saves `state` atomically.
    pub fn save(&self, state: &RoundState) -> Result<(), CheckpointError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("checkpoint.json");
        let tmp = dir.join("checkpoint.json.tmp");
        let text = serde_json::to_string_pretty(state)
            .map_err(|source| CheckpointError::Json { path: path.clone(), source })?;
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    fn spool_path(&self, shard: usize) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("shard-{shard}.spool")))
    }

    /// Appends a batch to shard `shard`'s spool.
    pub fn append(&self, shard: usize, batch: &pb::ExportBatch) -> Result<(), CheckpointError> {
        let Some(path) = self.spool_path(shard) else { return Ok(()) };
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let mut f =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        f.write_all(&batch.encode_length_delimited_to_vec()).map_err(io(&path))?;
        f.sync_data().map_err(io(&path))
    }

    /// The first `count` spooled batches of shard `shard` (a torn tail beyond them is cut).
    pub fn spooled(
        &self,
        shard: usize,
        count: u64,
    ) -> Result<Vec<pb::ExportBatch>, CheckpointError> {
        let Some(path) = self.spool_path(shard) else { return Ok(Vec::new()) };
        let mut bytes = Vec::new();
        match std::fs::File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut bytes).map_err(io(&path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut buf = &bytes[..];
        let mut out = Vec::new();
        let mut used = 0usize;
        while (out.len() as u64) < count && !buf.is_empty() {
            let before = buf.len();
            let b = pb::ExportBatch::decode_length_delimited(&mut buf)
                .map_err(|source| CheckpointError::Decode { path: path.clone(), source })?;
            used += before - buf.len();
            out.push(b);
        }
        if used < bytes.len() {
            let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
            f.set_len(used as u64).map_err(io(&path))?;
        }
        Ok(out)
    }

    /// Forgets shard `shard`'s spool (its export restarts).
    pub fn reset_spool(&self, shard: usize) -> Result<(), CheckpointError> {
        match self.spool_path(shard).map(std::fs::remove_file) {
            Some(Err(e)) if e.kind() != std::io::ErrorKind::NotFound => Err(CheckpointError::Io {
                path: self.spool_path(shard).unwrap_or_default(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Saves the computed publish request.
    pub fn save_output(&self, req: &pb::PublishGlobalRequest) -> Result<(), CheckpointError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("publish.bin");
        let tmp = dir.join("publish.bin.tmp");
        std::fs::write(&tmp, req.encode_to_vec()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// The saved publish request, if any.
    pub fn load_output(&self) -> Result<Option<pb::PublishGlobalRequest>, CheckpointError> {
        let Some(dir) = &self.dir else { return Ok(None) };
        let path = dir.join("publish.bin");
        match std::fs::read(&path) {
            Ok(b) => pb::PublishGlobalRequest::decode(&b[..])
                .map(Some)
                .map_err(|source| CheckpointError::Decode { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_spool_survives_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::new(Some(dir.path()), "round/1");
        let eps = vec!["http://a".to_string(), "http://b".to_string()];
        let mut st = store.load("round/1", &eps).expect("fresh");
        assert_eq!(st.shards.len(), 2);
        st.shards[0].cursor = to_hex(&[1, 2, 255]);
        st.shards[0].batches = 2;
        store.save(&st).expect("save");
        let b = |n: u32| pb::ExportBatch { shard_id: n, ..Default::default() };
        store.append(0, &b(1)).expect("append");
        store.append(0, &b(2)).expect("append");
        store.append(0, &b(3)).expect("append"); // written but never checkpointed
        let back = store.load("round/1", &eps).expect("load");
        assert_eq!(back, st);
        assert_eq!(from_hex(&back.shards[0].cursor), vec![1, 2, 255]);
        let spooled = store.spooled(0, back.shards[0].batches).expect("spool");
        assert_eq!(spooled.iter().map(|b| b.shard_id).collect::<Vec<_>>(), vec![1, 2]);
        store.append(0, &b(4)).expect("append");
        assert_eq!(store.spooled(0, 3).expect("spool").last().map(|b| b.shard_id), Some(4));
        // The folder name of an unsafe id is its hex.
        assert!(dir.path().join(to_hex(b"round/1")).join("checkpoint.json").exists());
    }

    #[test]
    fn no_state_dir_keeps_nothing() {
        let store = Store::new(None, "r");
        assert!(!store.persistent());
        store.append(0, &pb::ExportBatch::default()).expect("no-op");
        assert!(store.spooled(0, 5).expect("empty").is_empty());
        assert_eq!(store.load_output().expect("none"), None);
    }
}
