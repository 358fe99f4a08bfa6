//! The disk spool: where batches go while PostgreSQL is unreachable.
//!
//! Append-only segment files (`NNNNNNNNNN.seg`) of records
//! `magic | length | crc32 | sealed batch`, each appended with `fdatasync`
//! before the batch's messages are acknowledged. One record is one batch, so
//! a sync covers thousands of messages (group commit). Records are replayed
//! oldest first; a segment file is deleted once all its records are
//! committed. A record that fails its length or checksum (a torn write at a
//! crash, or corruption) is never replayed: the rest of that segment is moved
//! to a `.corrupt` file and reported. The messages of a torn record were never
//! acknowledged (the ack follows the sync), so the broker still has them.
//!
//! The spool is bounded: [`Spool::append`] refuses a batch that would pass
//! `max_bytes`, and the writer then keeps the batch (and so stops intake)
//! until the database takes it.
//!
//! A spool belongs to one database: [`claim`] records the database's
//! identity in the directory (`OWNER`), and a spool found with another
//! owner is moved aside whole and reported, never replayed into the wrong
//! database (a gateway re-pointed at a new database, a disk moved between
//! hosts).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::batch::SealedBatch;

mod record;

const MAGIC: [u8; 4] = *b"EGS1";
const RECORD_HEADER: u64 = 12;

/// The file in a spool directory naming the database it belongs to.
const OWNER_FILE: &str = "OWNER";

/// What [`claim`] found in a spool directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Empty or new: now recorded as `owner`'s.
    Fresh,
    /// Already `owner`'s.
    Same,
    /// Batches from before spools recorded their owner: adopted.
    Legacy,
    /// Batches of another database, moved to `moved_to` untouched.
    Foreign { owner: String, moved_to: PathBuf },
}

/// Makes `dir` the spool of the database identified by `owner` (see
/// `schema::identity`). A spool holding batches of another database is
/// renamed to `<dir>.foreign-<unix seconds>` and a fresh one started.
///
/// # Errors
/// When the directory or its owner file cannot be read or written.
pub fn claim(dir: &Path, owner: &str) -> Result<Claim, SpoolError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(OWNER_FILE);
    let recorded = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&path)(e)),
    };
    if recorded.as_deref() == Some(owner) {
        return Ok(Claim::Same);
    }
    let has_batches = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".seg"));
    let claim = match (recorded, has_batches) {
        (_, false) => Claim::Fresh,
        (None, true) => Claim::Legacy,
        (Some(other), true) => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut name = dir.as_os_str().to_owned();
            name.push(format!(".foreign-{secs}"));
            let moved_to = PathBuf::from(name);
            std::fs::rename(dir, &moved_to).map_err(io(dir))?;
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            Claim::Foreign {
                owner: other,
                moved_to,
            }
        }
    };
    let mut file = File::create(&path).map_err(io(&path))?;
    file.write_all(format!("{owner}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(&path))?;
    Ok(claim)
}

/// Spool failures.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("spool is full ({bytes} of {max} bytes)")]
    Full { bytes: u64, max: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug)]
struct Segment {
    index: u64,
    path: PathBuf,
    size: u64,
    records: u64,
}

/// What [`Spool::open`] found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recovery {
    /// Valid records waiting for replay.
    pub records: u64,
    /// Files holding corrupt or torn data that was set aside.
    pub corrupt: Vec<String>,
}

/// One spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    /// Open append handle of the last segment.
    writer: Option<File>,
    /// Read offset in the first segment.
    read_offset: u64,
    pending: u64,
}

impl Spool {
    /// Opens (creating) `dir`, validating every segment.
    ///
    /// # Errors
    /// When the directory or a segment cannot be read or written.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Spool, Recovery), SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut indexes: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        indexes.sort_unstable();
        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        for index in indexes {
            let path = dir.join(format!("{index:010}.seg"));
            let (valid, records, size) = scan(&path)?;
            if valid < size {
                let corrupt = dir.join(format!("{index:010}.seg.corrupt"));
                set_aside(&path, valid, &corrupt)?;
                recovery.corrupt.push(corrupt.display().to_string());
            }
            if records == 0 {
                std::fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            recovery.records += records;
            segments.push_back(Segment {
                index,
                path,
                size: valid,
                records,
            });
        }
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            segments,
            writer: None,
            read_offset: 0,
            pending: recovery.records,
        };
        Ok((spool, recovery))
    }

    /// True when nothing waits for replay.
    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Batches waiting for replay.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }

    /// Segment files on disk.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Appends `batch` and syncs it to disk.
    ///
    /// # Errors
    /// [`SpoolError::Full`] when it would pass the bound; I/O errors.
    pub fn append(&mut self, batch: &SealedBatch) -> Result<(), SpoolError> {
        let body = batch.encode();
        let size = RECORD_HEADER + body.len() as u64;
        let bytes = self.bytes();
        if bytes + size > self.max_bytes && !self.is_empty() {
            return Err(SpoolError::Full {
                bytes,
                max: self.max_bytes,
            });
        }
        let rotate = self
            .segments
            .back()
            .is_none_or(|s| s.size >= self.segment_bytes)
            || self.writer.is_none();
        if rotate {
            let index = self.segments.back().map_or(1, |s| s.index + 1);
            let path = self.dir.join(format!("{index:010}.seg"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io(&path))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.dir))?;
            self.segments.push_back(Segment {
                index,
                path,
                size: 0,
                records: 0,
            });
            self.writer = Some(file);
        }
        let (Some(file), Some(segment)) = (self.writer.as_mut(), self.segments.back_mut()) else {
            return Ok(());
        };
        let mut record = Vec::with_capacity(size as usize);
        record.extend_from_slice(&MAGIC);
        record.extend_from_slice(&(body.len() as u32).to_be_bytes());
        record.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        record.extend_from_slice(&body);
        file.write_all(&record).map_err(io(&segment.path))?;
        file.sync_data().map_err(io(&segment.path))?;
        // A segment unlinked behind our back (its directory removed) still
        // takes writes, into nothing that survives: refuse, so the batch is
        // not acknowledged, and start a new segment next time.
        use std::os::unix::fs::MetadataExt;
        if file.metadata().map_err(io(&segment.path))?.nlink() == 0 {
            self.writer = None;
            return Err(io(&segment.path)(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the spool segment was removed while in use",
            )));
        }
        segment.size += size;
        segment.records += 1;
        self.pending += 1;
        Ok(())
    }

    /// The oldest batch not yet replayed.
    ///
    /// # Errors
    /// I/O errors, or a record that no longer validates.
    pub fn peek(&mut self) -> Result<Option<SealedBatch>, SpoolError> {
        let Some(segment) = self.segments.front() else {
            return Ok(None);
        };
        if self.read_offset >= segment.size {
            return Ok(None);
        }
        let mut file = File::open(&segment.path).map_err(io(&segment.path))?;
        file.seek(SeekFrom::Start(self.read_offset))
            .map_err(io(&segment.path))?;
        match read_record(&mut file) {
            Some((body, _)) => Ok(SealedBatch::decode(&body)),
            None => Err(SpoolError::Io {
                path: segment.path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "record changed on disk",
                ),
            }),
        }
    }

    /// Marks the oldest batch replayed; deletes its segment when done with it.
    ///
    /// # Errors
    /// I/O errors deleting a finished segment.
    pub fn advance(&mut self) -> Result<(), SpoolError> {
        let Some(segment) = self.segments.front() else {
            return Ok(());
        };
        let mut file = File::open(&segment.path).map_err(io(&segment.path))?;
        file.seek(SeekFrom::Start(self.read_offset))
            .map_err(io(&segment.path))?;
        if let Some((_, size)) = read_record(&mut file) {
            self.read_offset += size;
            self.pending = self.pending.saturating_sub(1);
        }
        if self.read_offset >= segment.size {
            let path = segment.path.clone();
            if self.segments.len() == 1 {
                self.writer = None;
            }
            self.segments.pop_front();
            self.read_offset = 0;
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Every batch waiting for replay, oldest first (to restore dedup state).
    ///
    /// # Errors
    /// I/O errors.
    pub fn pending_batches(&self) -> Result<Vec<SealedBatch>, SpoolError> {
        let mut out = Vec::new();
        for (i, segment) in self.segments.iter().enumerate() {
            let mut file = File::open(&segment.path).map_err(io(&segment.path))?;
            if i == 0 {
                file.seek(SeekFrom::Start(self.read_offset))
                    .map_err(io(&segment.path))?;
            }
            while let Some((body, _)) = read_record(&mut file) {
                out.extend(SealedBatch::decode(&body));
            }
        }
        Ok(out)
    }
}

/// Reads one record; `None` at the end or at anything invalid.
fn read_record(file: &mut impl Read) -> Option<(Vec<u8>, u64)> {
    let mut header = [0u8; RECORD_HEADER as usize];
    file.read_exact(&mut header).ok()?;
    if header[..4] != MAGIC {
        return None;
    }
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let crc = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    if len > 1 << 30 {
        return None;
    }
    let mut body = vec![0u8; len];
    file.read_exact(&mut body).ok()?;
    if crc32fast::hash(&body) != crc || SealedBatch::decode(&body).is_none() {
        return None;
    }
    Some((body, RECORD_HEADER + len as u64))
}

/// (bytes of valid records, valid records, file size)
fn scan(path: &Path) -> Result<(u64, u64, u64), SpoolError> {
    let mut file = std::io::BufReader::new(File::open(path).map_err(io(path))?);
    let size = std::fs::metadata(path).map_err(io(path))?.len();
    let (mut valid, mut records) = (0, 0);
    while let Some((_, n)) = read_record(&mut file) {
        valid += n;
        records += 1;
    }
    Ok((valid, records, size))
}

/// Copies `path[valid..]` to `corrupt` and truncates `path` to `valid`.
fn set_aside(path: &Path, valid: u64, corrupt: &Path) -> Result<(), SpoolError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io(path))?;
    file.seek(SeekFrom::Start(valid)).map_err(io(path))?;
    let mut rest = Vec::new();
    file.read_to_end(&mut rest).map_err(io(path))?;
    std::fs::write(corrupt, &rest).map_err(io(corrupt))?;
    file.set_len(valid).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::seq_window::SeqWindow;
    use crate::sink::batch::MessageEntry;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// Appends into a segment whose directory was removed are refused (the
    /// data would vanish with the last handle), never reported durable.
    #[test]
    fn a_removed_segment_is_not_taken_for_durable() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = root.path().join("writer-0");
        let (mut spool, _) = Spool::open(&dir, 1 << 20, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        spool.append(&batch(1, 2)).unwrap_or_else(|e| panic!("{e}"));
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            spool.append(&batch(2, 2)).is_err(),
            "written into an unlinked file"
        );
        assert!(spool.append(&batch(3, 2)).is_err(), "the directory is gone");
    }

    #[test]
    fn a_spool_of_another_database_is_set_aside() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = root.path().join("writer-0");
        assert_eq!(claim(&dir, "db-a").ok(), Some(Claim::Fresh));
        assert_eq!(claim(&dir, "db-a").ok(), Some(Claim::Same));
        {
            let (mut spool, _) =
                Spool::open(&dir, 1 << 20, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
            spool.append(&batch(1, 2)).unwrap_or_else(|e| panic!("{e}"));
        }
        let Ok(Claim::Foreign { owner, moved_to }) = claim(&dir, "db-b") else {
            panic!("expected the spool to be set aside");
        };
        assert_eq!(owner, "db-a");
        let (moved, _) = Spool::open(&moved_to, 1 << 20, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(moved.pending(), 1, "set aside whole");
        let (fresh, _) = Spool::open(&dir, 1 << 20, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        assert!(fresh.is_empty(), "never replayed into db-b");
        assert_eq!(claim(&dir, "db-b").ok(), Some(Claim::Same));
    }

    fn batch(n: i64, rows: usize) -> SealedBatch {
        let readings = Bytes::from(vec![7u8; rows * 10]);
        SealedBatch {
            id: crate::sink::batch::BatchId { run: 1, seq: n },
            readings: readings.clone(),
            reading_rows: rows,
            dead_letters: Bytes::from_static(b"dl"),
            dead_letter_rows: 1,
            messages: vec![MessageEntry {
                id: n as u64,
                received: 5,
                topic: Arc::from("devices/d/telemetry"),
                device: Some(Arc::from("d")),
                payload: Bytes::from_static(b"{}"),
                rows: 0..readings.len(),
                row_count: rows as u32,
                newest: 7,
                identity: Some(u128::MAX - n as u128),
                repeat_ok: n % 2 == 0,
                verify: None,
            }],
            watermarks: vec![(Arc::from("d"), SeqWindow::starting_at(n as u64))],
            partitions: vec![20_000, 20_001],
            oldest_received: 5,
            alerts: Bytes::from_static(b"al"),
            alert_rows: 1,
            rollups: Bytes::new(),
            rollup_rows: 0,
            notifications: vec![crate::alerts::AlertNotice {
                device: Arc::from("d"),
                json: "{\"a\":1}".into(),
            }],
        }
    }

    fn drain(spool: &mut Spool) -> Vec<i64> {
        let mut ids = Vec::new();
        while let Ok(Some(b)) = spool.peek() {
            ids.push(b.id.seq);
            spool.advance().unwrap_or_else(|e| panic!("{e}"));
        }
        ids
    }

    #[test]
    fn appends_replays_in_order_and_deletes_segments() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (mut spool, rec) =
            Spool::open(dir.path(), 1 << 20, 300).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rec, Recovery::default());
        for n in 0..10 {
            spool.append(&batch(n, 3)).unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(spool.segments() > 1);
        assert_eq!(spool.peek().ok().flatten(), Some(batch(0, 3)));
        drop(spool);
        // Survives a restart.
        let (mut spool, rec) =
            Spool::open(dir.path(), 1 << 20, 300).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rec.records, 10);
        assert_eq!(spool.pending_batches().map(|b| b.len()).ok(), Some(10));
        assert_eq!(drain(&mut spool), (0..10).collect::<Vec<_>>());
        assert!(spool.is_empty());
        assert_eq!(spool.segments(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path()).map(|d| d.count()).ok(),
            Some(0)
        );
        spool
            .append(&batch(99, 1))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(drain(&mut spool), vec![99]);
    }

    #[test]
    fn refuses_past_its_bound() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (mut spool, _) =
            Spool::open(dir.path(), 600, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
        let mut n = 0;
        while spool.append(&batch(n, 2)).is_ok() {
            n += 1;
        }
        assert!(n > 0 && spool.bytes() <= 600);
        assert!(matches!(
            spool.append(&batch(n, 2)),
            Err(SpoolError::Full { .. })
        ));
        spool.peek().ok();
        spool.advance().unwrap_or_else(|e| panic!("{e}"));
    }

    proptest! {
        /// Whatever tail damage a crash leaves (a cut anywhere, or flipped
        /// bytes), recovery replays exactly the intact records before it,
        /// sets the rest aside, and never yields a damaged batch.
        #[test]
        fn torn_or_corrupt_tails_are_set_aside(count in 1i64..8, cut in 0.0f64..1.0, flip in any::<bool>()) {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let (mut spool, _) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
            let mut ends = Vec::new();
            for n in 0..count {
                spool.append(&batch(n, 4)).unwrap_or_else(|e| panic!("{e}"));
                ends.push(spool.bytes());
            }
            drop(spool);
            let path = dir.path().join("0000000001.seg");
            let mut data = std::fs::read(&path).unwrap_or_default();
            let at = (((data.len() as f64) * cut) as usize).min(data.len() - 1);
            if flip {
                data[at] ^= 0x5a;
            } else {
                data.truncate(at);
            }
            std::fs::write(&path, &data).unwrap_or_else(|e| panic!("{e}"));
            // Records that end at or before the damage are intact.
            let intact = ends.iter().filter(|&&e| e as usize <= at).count() as i64;
            let on_boundary = at == 0 || ends.contains(&(at as u64));
            let (mut spool, rec) = Spool::open(dir.path(), 1 << 20, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
            prop_assert_eq!(rec.corrupt.len(), usize::from(flip || !on_boundary));
            prop_assert_eq!(drain(&mut spool), (0..intact).collect::<Vec<_>>());
        }
    }
}
