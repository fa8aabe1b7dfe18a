//! Write-ahead log and snapshot files of the embedded store.
//!
//! Files under `DATA_DIR/embedded/`:
//! - `snapshot-N`: the whole state when generation N started (absent for N = 0);
//! - `wal-N`: every change since, in the order it was applied in memory.
//!
//! Both are sequences of frames `[len u32 LE][crc32 u32 LE][protobuf Record]`. A torn frame
//! at the end of the newest log (a crash mid-write: nothing valid after it) ends replay there
//! and is cut off; a bad frame with a valid frame anywhere after it is corruption, and so is
//! anything else that fails its checksum: an error naming the file and offset, never
//! silently skipped ([`next_valid_frame`]).
//!
//! Group commit: callers hand encoded records to one writer thread, which appends everything
//! queued, calls `fdatasync` once, and only then acknowledges each record. A sync is answered
//! after its acknowledgement, so every answered sync is on disk.

use omega_protocol::pb;
use prost::Message;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One logged change (or, in a snapshot, one piece of state).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    /// The change.
    #[prost(oneof = "Kind", tags = "1, 2, 3, 4, 5")]
    pub kind: Option<Kind>,
}

/// Kinds of records.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    /// A device registered.
    #[prost(message, tag = "1")]
    Register(RegisterRec),
    /// A sync was applied.
    #[prost(message, tag = "2")]
    Sync(SyncRec),
    /// A federation round was published.
    #[prost(message, tag = "3")]
    Publish(PublishRec),
    /// Snapshot: one device's state.
    #[prost(message, tag = "4")]
    Device(DeviceRec),
    /// Snapshot: stored patterns of one device.
    #[prost(message, tag = "5")]
    Patterns(PatternsRec),
}

/// A registration.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RegisterRec {
    /// Device id.
    #[prost(string, tag = "1")]
    pub device_id: String,
    /// Region.
    #[prost(string, tag = "2")]
    pub region: String,
    /// Unix ms.
    #[prost(int64, tag = "3")]
    pub at_ms: i64,
}

/// An applied sync.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SyncRec {
    /// Device id.
    #[prost(string, tag = "1")]
    pub device_id: String,
    /// New local version.
    #[prost(uint64, tag = "2")]
    pub local_version: u64,
    /// Added patterns.
    #[prost(message, repeated, tag = "3")]
    pub added: Vec<pb::Pattern>,
    /// Updates.
    #[prost(message, repeated, tag = "4")]
    pub updated: Vec<pb::PatternUpdate>,
    /// Removed ids.
    #[prost(bytes = "vec", repeated, tag = "5")]
    pub removed: Vec<Vec<u8>>,
    /// Interest addition (empty = none).
    #[prost(float, repeated, tag = "6")]
    pub interest_add: Vec<f32>,
    /// Unix ms.
    #[prost(int64, tag = "7")]
    pub at_ms: i64,
}

/// A published round.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PublishRec {
    /// Round id.
    #[prost(string, tag = "1")]
    pub round_id: String,
    /// Version now served.
    #[prost(uint64, tag = "2")]
    pub global_version: u64,
    /// Aggregates.
    #[prost(message, repeated, tag = "3")]
    pub patterns: Vec<pb::AggregatedPattern>,
    /// Trends.
    #[prost(message, repeated, tag = "4")]
    pub trends: Vec<pb::TrendSignal>,
    /// Snapshot only: every round id published so far.
    #[prost(string, repeated, tag = "5")]
    pub published_rounds: Vec<String>,
}

/// A device in a snapshot.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceRec {
    /// Device id.
    #[prost(string, tag = "1")]
    pub device_id: String,
    /// Region.
    #[prost(string, tag = "2")]
    pub region: String,
    /// Stored local version.
    #[prost(uint64, tag = "3")]
    pub local_version: u64,
    /// Interest vector (empty = none).
    #[prost(float, repeated, tag = "4")]
    pub interest: Vec<f32>,
    /// Registration time, unix ms.
    #[prost(int64, tag = "5")]
    pub registered_ms: i64,
    /// Last sync, unix ms.
    #[prost(int64, tag = "6")]
    pub last_sync_ms: i64,
}

/// Patterns of one device in a snapshot.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PatternsRec {
    /// Owner.
    #[prost(string, tag = "1")]
    pub device_id: String,
    /// Patterns.
    #[prost(message, repeated, tag = "2")]
    pub patterns: Vec<pb::Pattern>,
}

/// Largest frame accepted when reading (a snapshot frame holds one device's patterns).
const MAX_FRAME: usize = 64 << 20;

/// Appends one framed record to `buf`.
pub fn frame(rec: &Record, buf: &mut Vec<u8>) {
    let body = rec.encode_to_vec();
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    buf.extend_from_slice(&body);
}

/// How reading a file ended.
#[derive(Debug, PartialEq)]
pub enum Tail {
    /// Clean end of file.
    Clean,
    /// A torn or corrupt frame starts at this offset.
    Torn(u64),
}

/// Reads every frame of `path`, calling `each` per record. Stops at the first bad frame.
pub fn read_frames(
    path: &Path,
    mut each: impl FnMut(Record) -> std::io::Result<()>,
) -> std::io::Result<Tail> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut offset = 0u64;
    let mut head = [0u8; 8];
    let mut body = Vec::new();
    loop {
        match read_full(&mut r, &mut head)? {
            0 => return Ok(Tail::Clean),
            8 => {}
            _ => return Ok(Tail::Torn(offset)),
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_FRAME {
            return Ok(Tail::Torn(offset));
        }
        body.resize(len, 0);
        if read_full(&mut r, &mut body)? != len || crc32fast::hash(&body) != crc {
            return Ok(Tail::Torn(offset));
        }
        let Ok(rec) = Record::decode(body.as_slice()) else { return Ok(Tail::Torn(offset)) };
        each(rec)?;
        offset += 8 + len as u64;
    }
}

/// The offset of the first valid frame (non-empty, checksum right, a record that decodes
/// with a kind) that starts after `bad` in `path`, if any. A crash can only tear the last
/// write, so a valid frame past a bad one means the bad one is damage, not a torn tail.
pub fn next_valid_frame(path: &Path, bad: u64) -> std::io::Result<Option<u64>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(bad + 1))?;
    let mut rest = Vec::new();
    f.read_to_end(&mut rest)?;
    for pos in 0..rest.len().saturating_sub(8) {
        let head = &rest[pos..pos + 8];
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let Some(body) = rest.get(pos + 8..pos + 8 + len) else { continue };
        if len == 0 || len > MAX_FRAME || crc32fast::hash(body) != crc {
            continue;
        }
        if Record::decode(body).is_ok_and(|r| r.kind.is_some()) {
            return Ok(Some(bad + 1 + pos as u64));
        }
    }
    Ok(None)
}

/// Copies `path` to `<path>.corrupt-<at>` (synced) before a repair truncates it there.
pub fn backup(path: &Path, at: u64) -> std::io::Result<PathBuf> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let copy = path.with_file_name(format!("{name}.corrupt-{at}"));
    std::fs::copy(path, &copy)?;
    File::open(&copy)?.sync_all()?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(copy)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Paths of generation `n`.
pub fn wal_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("wal-{n:010}"))
}

/// Snapshot path of generation `n`.
pub fn snapshot_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("snapshot-{n:010}"))
}

/// Generations present in `dir`: (snapshots, wals), each sorted.
pub fn generations(dir: &Path) -> std::io::Result<(Vec<u64>, Vec<u64>)> {
    let (mut snaps, mut wals) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_prefix("snapshot-").and_then(|n| n.parse().ok()) {
            snaps.push(n);
        } else if let Some(n) = name.strip_prefix("wal-").and_then(|n| n.parse().ok()) {
            wals.push(n);
        }
    }
    snaps.sort_unstable();
    wals.sort_unstable();
    Ok((snaps, wals))
}

/// Cuts a torn tail off the log.
pub fn truncate(path: &Path, len: u64) -> std::io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_all()
}

/// An open log file for appending.
#[derive(Debug)]
pub struct LogFile {
    file: File,
    len: u64,
}

impl LogFile {
    /// Opens (creating) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut file =
            private(OpenOptions::new().create(true).append(true).read(true)).open(path)?;
        let len = file.seek(SeekFrom::End(0))?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(LogFile { file, len })
    }

    /// Appends bytes and makes them durable.
    pub fn append_durable(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.file.sync_data()?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Bytes in the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = private(OpenOptions::new().write(true).create(true).truncate(true)).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Store files hold device data: readable by the server's user only.
fn private(opts: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(opts, 0o600);
    opts
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: &str) -> Record {
        Record {
            kind: Some(Kind::Register(RegisterRec {
                device_id: id.into(),
                region: "eu".into(),
                at_ms: 1,
            })),
        }
    }

    #[test]
    fn frames_round_trip_and_a_torn_tail_is_detected() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = wal_path(dir.path(), 0);
        let mut log = LogFile::open(&path).expect("open");
        let mut buf = Vec::new();
        frame(&reg("a"), &mut buf);
        frame(&reg("b"), &mut buf);
        log.append_durable(&buf).expect("append");
        let good = log.len();
        // A crash in the middle of the third frame.
        let mut third = Vec::new();
        frame(&reg("c"), &mut third);
        log.append_durable(&third[..third.len() - 3]).expect("append");
        let mut seen = Vec::new();
        let tail = read_frames(&path, |r| {
            seen.push(r);
            Ok(())
        })
        .expect("read");
        assert_eq!(seen, vec![reg("a"), reg("b")]);
        assert_eq!(tail, Tail::Torn(good));
        truncate(&path, good).expect("truncate");
        let mut n = 0;
        assert_eq!(
            read_frames(&path, |_| {
                n += 1;
                Ok(())
            })
            .expect("read"),
            Tail::Clean
        );
        assert_eq!(n, 2);
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f");
        let mut buf = Vec::new();
        frame(&reg("a"), &mut buf);
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        std::fs::write(&path, &buf).expect("write");
        assert_eq!(read_frames(&path, |_| Ok(())).expect("read"), Tail::Torn(0));
    }
}
