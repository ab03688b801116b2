//! Files that must survive a crash: CRC-32, opening a log to append after replay, fsync of a
//! file replaced by an atomic rename and of its directory, and the scan of CRC-framed records
//! that tells a torn tail (forgiven) from damage (refused until repaired).
//!
//! Both logs of the project (the store's AOF, the messenger's change log) are a magic line
//! then records whose header gives their length and whose last 4 bytes are the CRC-32
//! (big-endian) of the bytes before them. A log's codec reads a header ([`Header`]);
//! [`frame`], [`scan`] and [`salvage`] do the rest.
//!
//! **The rule.** Replay reads intact records from the start. At the first offset `P` where
//! no intact record begins, the bytes from `P` to the end are a *torn tail* (a crash cut the
//! last write short; cut back and logged) only when both hold:
//! 1. they have the shape of one record cut short: a prefix of a plausible record (its
//!    header is cut, or its lengths are within the log's limits and its record runs past
//!    the end of the file: [`Frame::Cut`]), or exactly one plausible record whose CRC fails
//!    and that ends at the end of the file (its length reached the disk, not all its bytes);
//! 2. no intact record begins at any offset after `P`.
//!
//! Anything else is *damage* and the log is refused: a bad record followed by an intact one
//! (a flipped byte, a corrupted length, a zeroed page in the middle), and bytes that cannot
//! begin a record at all (garbage or zeros appended after the last record). Nothing is cut
//! then; [`salvage`] keeps every intact record on both sides, and is only run on request.
//!
//! Resynchronising after damage means finding the next offset where a record's lengths are
//! within limits, its bytes are all present and its CRC matches: for bytes that are not a
//! record that happens with probability 2⁻³² per plausible offset, and the length limits make
//! plausible offsets rare. A candidate longer than 64 KiB must also be followed by a
//! plausible header or the end of the file before its CRC is computed: in random bytes a
//! wild but plausible length would otherwise cost a CRC over up to the limit at one offset
//! in a few hundred. (So a record over 64 KiB found right after damage and itself followed
//! at once by more damage is dropped with that damage; the original keeps it.) A record stored *inside* a value (a client can write any bytes)
//! is a record too: after damage just before it, repair keeps it; `--aof-check` and its
//! offsets show what repair would keep before it is run.
//!
//! **Every file the project writes**, and how the rule applies:
//! - the store's AOF (`--aof PATH`) and the messenger's `changes.log`: the rule above;
//! - the messenger's `snapshot`: written whole to `snapshot.tmp`, fsynced and renamed
//!   ([`write_atomically`]), so it is never torn: any failed check refuses the start;
//! - `PATH.rewrite` and `snapshot.tmp`: never the only copy of anything (the file they
//!   replace is whole until the rename), so one found at start is deleted, not checked;
//! - `PATH.repair`, `changes.log.repair`: a repair's new file before its rename, never the
//!   only copy either; one left by an interrupted repair is overwritten by the next repair
//!   and may be deleted;
//! - `*.damaged-<unix time>`: copies kept for the operator, never read;
//! - `*.torn-<unix time>-at-<offset>`: a torn final record's bytes, copied aside before
//!   the cut, for the operator, never read;
//! - `PATH.lock` beside the store's AOF, `lock` in the messenger's and Raft's data
//!   directories: [`Lock`], the process id of the server (or repair) using the data; read
//!   only for that id, in the error that refuses a second one.
//!
//! ```
//! use switchboard::durable::{crc32, scan, End, Header};
//!
//! // A toy log: records of `len:u8 body crc:u32be`, at most 16 body bytes.
//! fn header(data: &[u8]) -> Header {
//!     match data.first() {
//!         None => Header::Cut,
//!         Some(&len) if len > 16 => Header::Bad,
//!         Some(&len) => Header::Len(1 + usize::from(len) + 4),
//!     }
//! }
//! fn record(body: &[u8], out: &mut Vec<u8>) {
//!     let start = out.len();
//!     out.push(body.len() as u8);
//!     out.extend_from_slice(body);
//!     let crc = crc32(&out[start..]);
//!     out.extend_from_slice(&crc.to_be_bytes());
//! }
//! let mut log = Vec::new();
//! for body in [&b"one"[..], b"two", b"three"] {
//!     record(body, &mut log);
//! }
//! // Whole: three records, clean.
//! let whole = scan(&log, 0, header, |_| {});
//! assert_eq!((whole.records, whole.end), (3, End::Clean));
//! // The last record cut short by a crash: a torn tail, forgiven.
//! let torn = scan(&log[..log.len() - 2], 0, header, |_| {});
//! assert!(matches!(torn.end, End::Torn { at: 16, .. }));
//! // A byte flipped in the second record: an intact one follows, so it is damage.
//! log[10] ^= 1;
//! let damaged = scan(&log, 0, header, |_| {});
//! match damaged.end {
//!     End::Damaged(d) => assert_eq!((d.at, d.records_before, d.resync), (8, 1, Some(16))),
//!     other => panic!("{other:?}"),
//! }
//! ```

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Seek, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The CRC-32 table of the reflected IEEE polynomial.
const CRC_TABLE: [u32; 256] = {
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

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`), table-driven.
pub fn crc32(bytes: &[u8]) -> u32 {
    !crc32_feed(!0, bytes)
}

/// [`crc32`] of the parts one after the other, as if joined (with no copy).
pub fn crc32_parts(parts: &[&[u8]]) -> u32 {
    !parts.iter().fold(!0, |c, part| crc32_feed(c, part))
}

fn crc32_feed(c: u32, bytes: &[u8]) -> u32 {
    bytes.iter().fold(c, |c, &b| {
        CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8)
    })
}

/// Above this many bytes, a resynchronising candidate must be followed by a plausible header
/// (or the end of the file) before its CRC is computed; see the module's docs.
const CHAIN_ABOVE: usize = 64 << 10;

/// What a log's codec reads in the header of a record at the start of a slice of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A plausible header (a known tag, lengths within the log's limits) of a record of this
    /// many bytes in all, its 4-byte CRC last; they may run past the end of the slice.
    Len(usize),
    /// The slice ends inside the header.
    Cut,
    /// Not a record's header: an unknown tag, or a length over the limit.
    Bad,
}

/// What the bytes at the start of `data` are, for a log whose records' headers `header`
/// reads and whose records end in the CRC-32 (big-endian) of their bytes before it.
pub fn frame(data: &[u8], header: impl Fn(&[u8]) -> Header) -> Frame {
    match header(data) {
        Header::Bad => Frame::Bad(None),
        Header::Cut => Frame::Cut,
        Header::Len(len) if len < 4 => Frame::Bad(None),
        Header::Len(len) if len > data.len() => Frame::Cut,
        Header::Len(len) => {
            let (body, crc) = data[..len].split_at(len - 4);
            if crc32(body).to_be_bytes() == crc {
                Frame::Intact(len)
            } else {
                Frame::Bad(Some(len))
            }
        }
    }
}

/// What the bytes at the start of a slice of a log are (the slice runs to the end of the
/// file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// An intact record of this many bytes: lengths within limits, all bytes present, CRC
    /// right.
    Intact(usize),
    /// The start of a plausible record that the file ends inside: the header is cut, or the
    /// lengths are within limits and the record runs past the end.
    Cut,
    /// Not a record: an unknown tag or a length over the limit (`None`), or a plausible
    /// record of this many bytes, all present, whose CRC does not match.
    Bad(Option<usize>),
}

/// Where the first damage of a log is, and what follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Damage {
    /// Offset in the file of the first byte that is not an intact record.
    pub at: u64,
    /// Intact records before it.
    pub records_before: u64,
    /// Bytes from `at` to the end of the file.
    pub bytes_after: u64,
    /// Offset of the first intact record after `at`, if any (where a repair resumes).
    pub resync: Option<u64>,
}

/// How the intact records of a scanned log end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// At the end of the file.
    Clean,
    /// At a torn final record (see the module's rule): cut it back to `at`.
    Torn {
        /// Offset of the torn record.
        at: u64,
        /// Its bytes, to the end of the file.
        len: u64,
    },
    /// At damage: refuse to use the log until it is repaired.
    Damaged(Damage),
}

/// What [`scan`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// Intact records from the start up to the end or the first bad byte.
    pub records: u64,
    /// Offset just past them.
    pub good_end: usize,
    /// What follows them.
    pub end: End,
}

/// Reads the intact records of `data` from offset `start` (just past the magic), calling
/// `each` with every record's range in `data`, in order, up to the first offset where no intact record
/// begins; then tells a torn tail from damage by the module's rule.
pub fn scan(
    data: &[u8],
    start: usize,
    header: impl Fn(&[u8]) -> Header,
    mut each: impl FnMut(Range<usize>),
) -> Scan {
    let mut at = start;
    let mut records = 0;
    while at < data.len() {
        match frame(&data[at..], &header) {
            Frame::Intact(len) => {
                each(at..at + len);
                records += 1;
                at += len;
            }
            shape => {
                let resync = resync(data, at, &header);
                let one_torn_record = match shape {
                    Frame::Cut => true,
                    Frame::Bad(Some(len)) => at + len == data.len(),
                    _ => false,
                };
                let end = if one_torn_record && resync.is_none() {
                    End::Torn {
                        at: at as u64,
                        len: (data.len() - at) as u64,
                    }
                } else {
                    End::Damaged(Damage {
                        at: at as u64,
                        records_before: records,
                        bytes_after: (data.len() - at) as u64,
                        resync: resync.map(|r| r as u64),
                    })
                };
                return Scan {
                    records,
                    good_end: at,
                    end,
                };
            }
        }
    }
    Scan {
        records,
        good_end: at,
        end: End::Clean,
    }
}

/// The first offset after `bad` where an intact record begins.
fn resync(data: &[u8], bad: usize, header: &impl Fn(&[u8]) -> Header) -> Option<usize> {
    (bad + 1..data.len()).find(|&at| {
        let rest = &data[at..];
        let chained = match header(rest) {
            Header::Len(len) if len > CHAIN_ABOVE && len < rest.len() => {
                header(&rest[len..]) != Header::Bad
            }
            _ => true,
        };
        chained && matches!(frame(rest, header), Frame::Intact(_))
    })
}

/// What [`salvage`] found in a whole log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Salvage {
    /// Intact records, on both sides of any damage.
    pub records: u64,
    /// Intact records after the first damage.
    pub records_after_damage: u64,
    /// The spans that hold no intact record, in order: each from a bad byte to the next
    /// intact record or the end of the file.
    pub damaged: Vec<Range<u64>>,
}

impl Salvage {
    /// Bytes in the damaged spans.
    pub fn damaged_bytes(&self) -> u64 {
        self.damaged.iter().map(|r| r.end - r.start).sum()
    }
}

/// Walks the whole of `data` from `start`, calling `keep` with the range of every intact
/// record, before and after any damage: past a bad byte it resumes at the next offset where
/// an intact record begins.
pub fn salvage(
    data: &[u8],
    start: usize,
    header: impl Fn(&[u8]) -> Header,
    mut keep: impl FnMut(Range<usize>),
) -> Salvage {
    let mut found = Salvage::default();
    let mut at = start;
    while at < data.len() {
        match frame(&data[at..], &header) {
            Frame::Intact(len) => {
                keep(at..at + len);
                found.records += 1;
                if !found.damaged.is_empty() {
                    found.records_after_damage += 1;
                }
                at += len;
            }
            _ => {
                let next = resync(data, at, &header).unwrap_or(data.len());
                found.damaged.push(at as u64..next as u64);
                at = next;
            }
        }
    }
    found
}

/// A log refused at start because of damage; says where, and the commands that check and
/// repair it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    /// The damaged file.
    pub path: PathBuf,
    /// Where, and what follows.
    pub damage: Damage,
    /// The command that reports on the file and changes nothing.
    pub check: String,
    /// The command that repairs it.
    pub repair: String,
}

impl fmt::Display for Damaged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.damage;
        write!(
            f,
            "{} is damaged at byte {}: {} intact records before it, {} bytes from there to the \
             end, ",
            self.path.display(),
            d.at,
            d.records_before,
            d.bytes_after
        )?;
        match d.resync {
            Some(at) => write!(f, "intact records again from byte {at}")?,
            None => write!(f, "no intact record after it")?,
        }
        write!(
            f,
            "; more than a torn final record, so nothing was cut and the server does not \
             start. Report: `{}`. Repair (keeps every intact record, and the file as it is \
             now beside it as {}.damaged-<unix time>): `{}`",
            self.check,
            self.path.display(),
            self.repair
        )
    }
}

impl std::error::Error for Damaged {}

impl From<Damaged> for io::Error {
    fn from(d: Damaged) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, d)
    }
}

/// An exclusive lock on some data (a log, a data directory) for as long as it is held: a
/// lock file (`flock`, released by the kernel when the process ends, `kill -9` included)
/// holding the holder's process id. Two servers appending to one log would interleave
/// their records, and one's start would delete the other's files in flight; the second is
/// refused instead. The lock file is never renamed or replaced, unlike a log a rewrite
/// renames a new file over (a lock on the log itself would then guard an unlinked file).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Takes the lock file `lock` (created if need be) for `data`, without waiting.
    ///
    /// # Errors
    /// [`io::ErrorKind::ResourceBusy`] naming the holder's process id when another holds
    /// it (another process, or another open of it in this one); otherwise why the lock
    /// file cannot be created, locked or written.
    pub fn take(lock: &Path, data: &Path) -> io::Result<Lock> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = io::Read::read_to_string(&mut file, &mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_owned(),
                    pid => format!("process {pid}"),
                };
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "{} is in use by {holder} (it holds the lock {}); one server at a time",
                        data.display(),
                        lock.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Lock { _file: file })
    }

    /// [`Lock::take`] with the lock file beside the file `data`: `DATA.lock`.
    ///
    /// # Errors
    /// As [`Lock::take`].
    pub fn beside(data: &Path) -> io::Result<Lock> {
        let mut name = data.as_os_str().to_owned();
        name.push(".lock");
        Lock::take(Path::new(&name), data)
    }
}

/// Fsyncs the directory holding `path`, so a rename or creation in it survives a machine
/// crash.
///
/// # Errors
/// When the directory cannot be opened or synced.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// Replaces `path` with what `write` writes: to `temp` (which must be in the same
/// directory, so the rename is atomic), fsynced, renamed over `path`, and the directory
/// fsynced. A crash at any moment leaves `path` old or new, never half written.
///
/// # Errors
/// When `temp` cannot be created, written, synced or renamed (it is then removed), or the
/// directory cannot be synced (`path` is new then, and may be old again after a machine
/// crash).
pub fn write_atomically(
    path: &Path,
    temp: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let written = File::create(temp).and_then(|file| {
        let mut out = BufWriter::with_capacity(1 << 20, file);
        write(&mut out)?;
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        std::fs::rename(temp, path)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(temp);
    }
    written?;
    sync_dir(path)
}

/// Copies `path` to `PATH.damaged-<unix time>` (never over an existing file), fsynced, before
/// a repair changes it; returns the copy's path.
///
/// # Errors
/// When the copy exists already (a repair in the same second) or cannot be written.
pub fn copy_aside(path: &Path) -> io::Result<PathBuf> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".damaged-{secs}"));
    let aside = PathBuf::from(name);
    let mut from = File::open(path)?;
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&aside)?;
    io::copy(&mut from, &mut to)?;
    to.sync_all()?;
    sync_dir(&aside)?;
    Ok(aside)
}

/// Copies the bytes of `file` (at `path`) from `at` to its end to
/// `PATH.torn-<unix time>-at-<at>` (`-1`, `-2`... after it rather than over an existing
/// file), fsynced; returns the copy's path.
fn keep_torn_tail(path: &Path, file: &mut File, at: u64) -> io::Result<PathBuf> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (aside, mut to) = (0..)
        .map(|n| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".torn-{secs}-at-{at}"));
            if n > 0 {
                name.push(format!("-{n}"));
            }
            let aside = PathBuf::from(name);
            let to = OpenOptions::new().write(true).create_new(true).open(&aside);
            (aside, to)
        })
        .find(|(_, to)| !matches!(to, Err(e) if e.kind() == io::ErrorKind::AlreadyExists))
        .map(|(aside, to)| to.map(|to| (aside, to)))
        .expect("an unbounded range")?;
    file.seek(io::SeekFrom::Start(at))?;
    io::copy(file, &mut to)?;
    to.sync_all()?;
    sync_dir(&aside)?;
    Ok(aside)
}

/// Opens a log for appending after replay read `len` bytes of it and found them good up to
/// `good_end`: a log with no good header is started afresh with `magic`, a torn tail is
/// copied aside (`PATH.torn-<unix time>-at-<offset>`) and cut off, and the cut is synced
/// before anything new is appended after it.
///
/// # Errors
/// When the file cannot be opened, cut, written or synced.
pub fn open_for_append(path: &Path, magic: &[u8], good_end: usize, len: usize) -> io::Result<File> {
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
        // Never cut without a copy: the torn bytes go aside first, for whoever wants to
        // look at what the crash left.
        let aside = keep_torn_tail(path, &mut file, good_end as u64)?;
        crate::log_info!(
            "{}: the torn final record's {} bytes are kept as {}",
            path.display(),
            len - good_end,
            aside.display()
        );
        file.set_len(good_end as u64)?;
    }
    // Appends go to the end; O_APPEND is not needed with one writer at a time.
    file.seek(io::SeekFrom::End(0))?;
    file.sync_all()?;
    if good_end == 0 {
        // Perhaps just created: its name must be as durable as what is acknowledged in it.
        sync_dir(path)?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_held_refuses_a_second_taker_naming_the_holder_until_it_is_dropped() {
        let data = std::env::temp_dir().join(format!("switchboard-lock-{}", std::process::id()));
        let first = Lock::beside(&data).unwrap();
        // Another open of the lock file, as another process's would be.
        let err = Lock::beside(&data).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        let me = format!("in use by process {}", std::process::id());
        assert!(err.to_string().contains(&me), "{err}");
        drop(first);
        let again = Lock::beside(&data).unwrap();
        drop(again);
        let mut lock = data.into_os_string();
        lock.push(".lock");
        std::fs::remove_file(lock).unwrap();
    }

    /// Records of `len:u16be body crc:u32be`, bodies of at most 64 bytes.
    fn header(data: &[u8]) -> Header {
        match data.get(..2) {
            None => Header::Cut,
            Some(len) => match usize::from(u16::from_be_bytes([len[0], len[1]])) {
                len if len > 64 => Header::Bad,
                len => Header::Len(2 + len + 4),
            },
        }
    }

    fn log(n: usize) -> (Vec<u8>, Vec<usize>) {
        let (mut out, mut starts) = (Vec::new(), Vec::new());
        for i in 0..n {
            starts.push(out.len());
            let body = format!("record number {i}");
            let start = out.len();
            out.extend_from_slice(&(body.len() as u16).to_be_bytes());
            out.extend_from_slice(body.as_bytes());
            let crc = crc32(&out[start..]);
            out.extend_from_slice(&crc.to_be_bytes());
        }
        (out, starts)
    }

    fn kept(data: &[u8]) -> (Vec<Vec<u8>>, Salvage) {
        let mut records = Vec::new();
        let found = salvage(data, 0, header, |r| records.push(data[r].to_vec()));
        (records, found)
    }

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn an_intact_log_is_clean_and_every_cut_of_its_last_record_is_torn() {
        let (data, starts) = log(5);
        let whole = scan(&data, 0, header, |_| {});
        assert_eq!(
            (whole.records, whole.good_end, whole.end),
            (5, data.len(), End::Clean)
        );
        let last = starts[4];
        for cut in last + 1..data.len() {
            let s = scan(&data[..cut], 0, header, |_| {});
            assert_eq!(s.records, 4, "cut at {cut}");
            assert_eq!(
                s.end,
                End::Torn {
                    at: last as u64,
                    len: (cut - last) as u64
                }
            );
        }
    }

    #[test]
    fn a_bad_crc_in_the_last_record_is_torn_and_in_any_other_is_damage() {
        let (mut data, starts) = log(5);
        let n = data.len();
        data[n - 6] ^= 0x40;
        assert!(matches!(
            scan(&data, 0, header, |_| {}).end,
            End::Torn { .. }
        ));
        let (mut data, _) = log(5);
        data[starts[2] + 4] ^= 0x40;
        let s = scan(&data, 0, header, |_| {});
        let expect = Damage {
            at: starts[2] as u64,
            records_before: 2,
            bytes_after: (data.len() - starts[2]) as u64,
            resync: Some(starts[3] as u64),
        };
        assert_eq!((s.records, s.end), (2, End::Damaged(expect)));
        let (records, found) = kept(&data);
        assert_eq!((records.len(), found.records_after_damage), (4, 2));
        assert_eq!(found.damaged, vec![starts[2] as u64..starts[3] as u64]);
    }

    #[test]
    fn a_length_that_runs_past_the_end_is_damage_when_intact_records_follow() {
        let (mut data, starts) = log(5);
        data[starts[1]] = 0; // 0x00NN -> still in limits but wrong
        data[starts[1] + 1] = 60;
        let s = scan(&data, 0, header, |_| {});
        assert!(matches!(s.end, End::Damaged(d) if d.resync == Some(starts[2] as u64)));
        // A length over the limit, followed by intact records.
        let (mut data, starts) = log(5);
        data[starts[1]] = 0xff;
        assert!(matches!(
            scan(&data, 0, header, |_| {}).end,
            End::Damaged(_)
        ));
        assert_eq!(kept(&data).0.len(), 4);
    }

    #[test]
    fn garbage_or_zeros_after_the_last_record_are_damage_and_salvage_drops_only_them() {
        for tail in [vec![0u8; 4096], b"\xff\xfe garbage appended".to_vec()] {
            let (mut data, _) = log(5);
            let end = data.len();
            data.extend_from_slice(&tail);
            let s = scan(&data, 0, header, |_| {});
            assert!(
                matches!(s.end, End::Damaged(d) if d.at == end as u64 && d.resync.is_none()),
                "{s:?}"
            );
            let (records, found) = kept(&data);
            assert_eq!(records.len(), 5);
            assert_eq!(found.damaged, vec![end as u64..data.len() as u64]);
        }
    }

    #[test]
    fn a_zeroed_page_in_the_middle_loses_only_the_records_it_covers() {
        let (mut data, starts) = log(400);
        let page = 4096..8192;
        data[page.clone()].fill(0);
        let (records, found) = kept(&data);
        let covered = starts
            .iter()
            .zip(starts.iter().skip(1).chain([&data.len()]))
            .filter(|(&s, &e)| s < page.end && e > page.start)
            .count();
        assert_eq!(records.len(), 400 - covered);
        assert_eq!(found.damaged.len(), 1);
        let s = scan(&data, 0, header, |_| {});
        assert!(matches!(s.end, End::Damaged(d) if d.resync.is_some()));
    }

    #[test]
    fn the_damaged_message_names_file_offset_counts_and_commands() {
        let d = Damaged {
            path: "x.aof".into(),
            damage: Damage {
                at: 120,
                records_before: 7,
                bytes_after: 300,
                resync: Some(140),
            },
            check: "check-it".into(),
            repair: "repair-it".into(),
        };
        let text = d.to_string();
        for part in [
            "x.aof",
            "byte 120",
            "7 intact",
            "300 bytes",
            "byte 140",
            "repair-it",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert_eq!(io::Error::from(d).kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_a_copy_aside_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("switchboard-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"old").unwrap();
        let aside = copy_aside(&path).unwrap();
        // Again in the same second: refused, the first copy stays as it was.
        match copy_aside(&path) {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::AlreadyExists),
            Ok(other) => assert_ne!(other, aside),
        }
        write_atomically(&path, &dir.join("f.tmp"), |w| w.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read(&aside).unwrap(), b"old");
        assert!(!dir.join("f.tmp").exists());
        let failed = write_atomically(&path, &dir.join("f.tmp"), |_| Err(io::Error::other("no")));
        assert!(failed.is_err() && !dir.join("f.tmp").exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
