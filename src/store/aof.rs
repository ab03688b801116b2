//! The append-only file: every applied write, replayed on start.
//!
//! ```text
//! file   := "SWBAOF1\n" record*
//! record := 'S' klen:u32be vlen:u32be key value crc:u32be      store KEY VALUE
//!         | 'D' klen:u32be key crc:u32be                        delete KEY
//! crc    := CRC-32 (IEEE, as zlib's crc32) of the record's bytes before it
//! ```
//!
//! A crash can leave the last record half written; replay stops at the first record that
//! is incomplete or fails its CRC, reports it, and cuts the file back to the last good
//! record so new records follow a clean boundary. It never refuses to start over it.
//!
//! Writers append records to an in-memory buffer under the store's shard lock (so records
//! of one key are in map order) and then commit: `always` writes and fsyncs before the
//! connection processes its next command (one fsync serves every writer waiting at that
//! moment: group commit); `everysec` and `no` write the buffer to the OS at the end of each
//! batch of commands, so a killed process loses nothing, and `everysec` fsyncs once a second.

use crate::log_info;
use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::state::Store;

const MAGIC: &[u8] = b"SWBAOF1\n";

/// When the log is flushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// Before the next command on the writing connection is processed.
    Always,
    /// Once a second (writes reach the OS at the end of each batch).
    #[default]
    EverySec,
    /// Never explicitly (writes reach the OS at the end of each batch).
    No,
}

impl FromStr for Fsync {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Fsync::Always),
            "everysec" => Ok(Fsync::EverySec),
            "no" => Ok(Fsync::No),
            _ => Err(format!(
                "unknown fsync policy {s:?} (expected always, everysec or no)"
            )),
        }
    }
}

/// What replay found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Replay {
    /// Records applied.
    pub records: u64,
    /// Offset and length of a torn or corrupt tail that was cut off, if any.
    pub torn: Option<(u64, u64)>,
}

impl fmt::Display for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} records replayed", self.records)?;
        if let Some((at, len)) = self.torn {
            write!(
                f,
                "; a torn or corrupt record at byte {at} ({len} bytes) was ignored and cut off"
            )?;
        }
        Ok(())
    }
}

struct Pending {
    buf: Vec<u8>,
    /// Sequence number of the last record appended.
    seq: u64,
}

struct Output {
    file: File,
    /// The buffer swapped with `Pending::buf`, kept to reuse its allocation.
    spare: Vec<u8>,
    written: u64,
    synced: u64,
}

/// An open append-only file.
pub struct Aof {
    path: PathBuf,
    policy: Fsync,
    pending: Mutex<Pending>,
    output: Mutex<Output>,
    /// Dropping it stops the `everysec` syncer.
    stop_syncer: Mutex<Option<Sender<()>>>,
    syncer: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent before it can panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Aof {
    /// Opens (or creates) the log at `path`, replays it into `store`, and cuts off a torn
    /// tail.
    ///
    /// # Errors
    /// When the file cannot be read, created or written, or exists and is not a log of
    /// this format (it is then left untouched).
    pub fn open(path: &Path, policy: Fsync, store: &Store) -> io::Result<(Arc<Aof>, Replay)> {
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut replay = Replay::default();
        let good_end = if data.len() < MAGIC.len() && MAGIC.starts_with(&data) {
            // Empty, or torn while the header itself was written.
            0
        } else if !data.starts_with(MAGIC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a switchboard append-only file", path.display()),
            ));
        } else {
            let mut at = MAGIC.len();
            while at < data.len() {
                match decode_record(&data[at..]) {
                    Some((record, len)) => {
                        match record {
                            Record::Store(k, v) => store.set(k, v),
                            Record::Delete(k) => {
                                store.delete(k);
                            }
                        }
                        replay.records += 1;
                        at += len;
                    }
                    None => {
                        replay.torn = Some((at as u64, (data.len() - at) as u64));
                        break;
                    }
                }
            }
            at
        };
        let file = open_for_append(path, MAGIC, good_end, data.len())?;
        let aof = Arc::new(Aof {
            path: path.to_owned(),
            policy,
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                seq: 0,
            }),
            output: Mutex::new(Output {
                file,
                spare: Vec::new(),
                written: 0,
                synced: 0,
            }),
            stop_syncer: Mutex::new(None),
            syncer: Mutex::new(None),
        });
        if policy == Fsync::EverySec {
            aof.start_syncer()?;
        }
        Ok((aof, replay))
    }

    fn start_syncer(self: &Arc<Self>) -> io::Result<()> {
        let (stop, stopped) = bounded::<()>(0);
        let aof = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("aof-fsync".into())
            .spawn(move || loop {
                match stopped.recv_timeout(Duration::from_secs(1)) {
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = aof.sync_to(u64::MAX) {
                            log_info!("aof {}: fsync failed: {e}", aof.path.display());
                        }
                    }
                    _ => return,
                }
            })?;
        *lock(&self.stop_syncer) = Some(stop);
        *lock(&self.syncer) = Some(thread);
        Ok(())
    }

    /// The fsync policy.
    pub fn policy(&self) -> Fsync {
        self.policy
    }

    /// Appends a `store` record to the buffer; returns its sequence number. Call it under
    /// the key's shard lock (see [`Store::set_logged`]).
    pub fn log_store(&self, key: &[u8], value: &[u8]) -> u64 {
        self.append(|buf| encode_store(key, value, buf))
    }

    /// Appends a `delete` record to the buffer; returns its sequence number.
    pub fn log_delete(&self, key: &[u8]) -> u64 {
        self.append(|buf| encode_delete(key, buf))
    }

    fn append(&self, encode: impl FnOnce(&mut Vec<u8>)) -> u64 {
        let mut p = lock(&self.pending);
        encode(&mut p.buf);
        p.seq += 1;
        p.seq
    }

    /// Makes record `seq` (and all before it) as durable as the policy promises: fsynced
    /// for `always`, handed to the OS otherwise.
    ///
    /// # Errors
    /// When writing or syncing the file fails; the records stay in memory only.
    pub fn commit(&self, seq: u64) -> io::Result<()> {
        match self.policy {
            Fsync::Always => self.sync_to(seq),
            Fsync::EverySec | Fsync::No => self.write_to(seq, false),
        }
    }

    fn sync_to(&self, seq: u64) -> io::Result<()> {
        self.write_to(seq, true)
    }

    /// Writes out pending records up to at least `seq`, and fsyncs if asked. Whoever holds
    /// `output` writes everything pending at that moment, so writers that queue behind an
    /// fsync usually find their record already written and synced when they get the lock.
    fn write_to(&self, seq: u64, sync: bool) -> io::Result<()> {
        let mut out = lock(&self.output);
        let done = if sync { out.synced } else { out.written };
        if done >= seq && seq != u64::MAX {
            return Ok(());
        }
        let upto = {
            let mut p = lock(&self.pending);
            let out = &mut *out;
            std::mem::swap(&mut p.buf, &mut out.spare);
            p.seq
        };
        let out = &mut *out;
        let result = out.file.write_all(&out.spare);
        out.spare.clear();
        result?;
        out.written = upto;
        if sync && out.synced < upto {
            out.file.sync_data()?;
            out.synced = upto;
        }
        Ok(())
    }

    /// Writes and fsyncs everything, and stops the `everysec` syncer.
    ///
    /// # Errors
    /// When the final write or fsync fails.
    pub fn close(&self) -> io::Result<()> {
        lock(&self.stop_syncer).take();
        if let Some(t) = lock(&self.syncer).take() {
            let _ = t.join();
        }
        self.sync_to(u64::MAX)
    }
}

/// Opens a log for appending after replay read `len` bytes of it and found them good up to
/// `good_end`: a log with no good header is started afresh with `magic`, a torn tail is
/// cut off, and the cut is synced before anything new is appended after it.
///
/// # Errors
/// When the file cannot be opened, cut, written or synced.
pub(crate) fn open_for_append(
    path: &Path,
    magic: &[u8],
    good_end: usize,
    len: usize,
) -> io::Result<File> {
    use std::io::Seek;
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    if good_end == 0 {
        file.set_len(0)?;
        file.write_all(magic)?;
    } else if good_end < len {
        file.set_len(good_end as u64)?;
    }
    // Appends go to the end; O_APPEND is not needed with one writer at a time.
    file.seek(io::SeekFrom::End(0))?;
    file.sync_all()?;
    Ok(file)
}

enum Record<'a> {
    Store(&'a [u8], &'a [u8]),
    Delete(&'a [u8]),
}

fn encode_store(key: &[u8], value: &[u8], buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.push(b'S');
    buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
    buf.extend_from_slice(&(value.len() as u32).to_be_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    let crc = crc32(&buf[start..]);
    buf.extend_from_slice(&crc.to_be_bytes());
}

fn encode_delete(key: &[u8], buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.push(b'D');
    buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
    buf.extend_from_slice(key);
    let crc = crc32(&buf[start..]);
    buf.extend_from_slice(&crc.to_be_bytes());
}

/// Decodes the record at the start of `data`: the record and its length, or `None` if it
/// is incomplete or corrupt.
fn decode_record(data: &[u8]) -> Option<(Record<'_>, usize)> {
    let u32_at = |at: usize| -> Option<usize> {
        let b = data.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let (record, body_end) = match data.first()? {
        b'S' => {
            let (klen, vlen) = (u32_at(1)?, u32_at(5)?);
            let key = data.get(9..9 + klen)?;
            let value = data.get(9 + klen..9 + klen + vlen)?;
            (Record::Store(key, value), 9 + klen + vlen)
        }
        b'D' => {
            let klen = u32_at(1)?;
            (Record::Delete(data.get(5..5 + klen)?), 5 + klen)
        }
        _ => return None,
    };
    let crc = u32_at(body_end)? as u32;
    (crc32(&data[..body_end]) == crc).then_some((record, body_end + 4))
}

/// CRC-32 (IEEE 802.3, reflected, as zlib), table-driven.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !bytes.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("switchboard-aof-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn records_replay_in_order() {
        for policy in [Fsync::Always, Fsync::EverySec, Fsync::No] {
            let path = temp_path(&format!("replay-{policy:?}"));
            let store = Store::new();
            let (aof, replay) = Aof::open(&path, policy, &store).unwrap();
            assert_eq!(replay, Replay::default());
            let writes: [(&[u8], Option<&[u8]>); 4] = [
                (b"a", Some(b"1")),
                (b"b", Some(b"x,\ny\xff")),
                (b"a", None),
                (b"c", Some(b"")),
            ];
            let mut last = 0;
            for (k, v) in writes {
                last = match v {
                    Some(v) => aof.log_store(k, v),
                    None => aof.log_delete(k),
                };
            }
            aof.commit(last).unwrap();
            aof.close().unwrap();
            let again = Store::new();
            let (_aof, replay) = Aof::open(&path, policy, &again).unwrap();
            assert_eq!(replay.records, 4);
            assert_eq!(replay.torn, None);
            assert_eq!(again.get(b"a"), None);
            assert_eq!(again.get(b"b").unwrap(), b"x,\ny\xff");
            assert_eq!(again.get(b"c").unwrap(), b"");
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn a_torn_tail_at_every_cut_is_reported_and_cut_off() {
        let path = temp_path("torn");
        let mut whole = MAGIC.to_vec();
        encode_store(b"k1", b"v1", &mut whole);
        let first_end = whole.len();
        encode_store(b"k2", b"v2", &mut whole);
        for cut in first_end + 1..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let store = Store::new();
            let (aof, replay) = Aof::open(&path, Fsync::No, &store).unwrap();
            assert_eq!(replay.records, 1, "cut at {cut}");
            assert_eq!(
                replay.torn,
                Some((first_end as u64, (cut - first_end) as u64))
            );
            assert_eq!(store.get(b"k1").unwrap(), b"v1");
            assert_eq!(store.get(b"k2"), None);
            // New records land after the last good one.
            let seq = aof.log_store(b"k3", b"v3");
            aof.commit(seq).unwrap();
            aof.close().unwrap();
            let store = Store::new();
            let (_aof, replay) = Aof::open(&path, Fsync::No, &store).unwrap();
            assert_eq!((replay.records, replay.torn), (2, None));
            assert_eq!(store.get(b"k3").unwrap(), b"v3");
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_corrupt_record_is_caught_by_its_crc() {
        let path = temp_path("corrupt");
        let mut data = MAGIC.to_vec();
        encode_store(b"k", b"value", &mut data);
        let flip = data.len() - 6;
        data[flip] ^= 0x20;
        std::fs::write(&path, &data).unwrap();
        let store = Store::new();
        let (_aof, replay) = Aof::open(&path, Fsync::No, &store).unwrap();
        assert_eq!(replay.records, 0);
        assert!(replay.torn.is_some());
        assert!(replay.to_string().contains("ignored"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused_and_left_alone() {
        let path = temp_path("foreign");
        std::fs::write(&path, b"precious data, not a log").unwrap();
        let err = Aof::open(&path, Fsync::No, &Store::new()).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(std::fs::read(&path).unwrap(), b"precious data, not a log");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn fsync_words() {
        assert_eq!("always".parse::<Fsync>().unwrap(), Fsync::Always);
        assert_eq!("everysec".parse::<Fsync>().unwrap(), Fsync::EverySec);
        assert_eq!("no".parse::<Fsync>().unwrap(), Fsync::No);
        assert!("sometimes".parse::<Fsync>().is_err());
    }
}
