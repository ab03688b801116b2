//! `messenger-server --check` and `--repair`: what a data directory a start refuses holds,
//! and a repair that keeps every record a start can still replay.
//!
//! A replica applies changes in sequence, so a record after a lost one cannot be replayed:
//! repair keeps the intact records that continue the snapshot, up to the first gap, and
//! the server catches up on the rest from the primary. A damaged snapshot cannot be
//! rebuilt from the log (the log holds only the changes after it): repair sets both aside
//! and the server starts empty, catching up from its peers. The files as they were are
//! kept beside the new ones as `*.damaged-<unix time>`.

use super::log::{
    continuing, header, read_log, read_snapshot, Pos, SnapshotDamaged, LOCK, LOG, LOG_MAGIC,
    SNAPSHOT,
};
use crate::durable::{self, End, Salvage};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The snapshot, as a check found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snapshot {
    /// None yet: the log starts from an empty state.
    Missing,
    /// Sound, at this position.
    At(Pos),
    /// Fails its checks.
    Damaged(SnapshotDamaged),
}

/// What [`check`] found in a data directory; it changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// The change log's size.
    pub log_bytes: u64,
    /// How its intact records end, as a start would see it.
    pub end: End,
    /// Every intact record of the log, and the damaged spans between them.
    pub salvage: Salvage,
    /// Of those, the records a start would replay or skip (those that continue the snapshot,
    /// up to the first that does not), when the snapshot is sound.
    pub replayable: u64,
}

impl Checked {
    /// Whether a start refuses the directory (only [`repair`] makes it usable).
    pub fn is_damaged(&self) -> bool {
        matches!(self.snapshot, Snapshot::Damaged(_)) || matches!(self.end, End::Damaged(_))
    }
}

impl fmt::Display for Checked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.snapshot {
            Snapshot::Missing => write!(f, "{SNAPSHOT}: none")?,
            Snapshot::At(pos) => write!(f, "{SNAPSHOT}: sound, at {pos}")?,
            Snapshot::Damaged(d) => write!(f, "{SNAPSHOT}: DAMAGED ({})", d.why)?,
        }
        write!(
            f,
            "; {LOG}: {} bytes, {} intact records ({} replayable)",
            self.log_bytes, self.salvage.records, self.replayable
        )?;
        match self.end {
            End::Clean => write!(f, ", clean"),
            End::Torn { at, len } => write!(
                f,
                ", a torn final record at byte {at} ({len} bytes): a start cuts it off"
            ),
            End::Damaged(d) => {
                write!(
                    f,
                    ", DAMAGED: first bad byte at {}, {} intact records before it, {} bytes \
                     from there to the end, later records parse: ",
                    d.at, d.records_before, d.bytes_after
                )?;
                match d.resync {
                    Some(at) => write!(
                        f,
                        "yes, from byte {at} ({} intact records after the damage)",
                        self.salvage.records_after_damage
                    ),
                    None => write!(f, "no"),
                }
            }
        }
    }
}

/// Reads the data directory `dir` and reports what a start would do with it and what a
/// repair would keep; changes nothing.
///
/// # Errors
/// When a file cannot be read, or the log is not a messenger log.
pub fn check(dir: &Path) -> io::Result<Checked> {
    let snapshot = snapshot_in(dir)?;
    let data = read_log(&dir.join(LOG))?;
    let start = LOG_MAGIC.len().min(data.len());
    let end = durable::scan(&data, start, header, |_| {}).end;
    let mut intact = Vec::new();
    let salvage = durable::salvage(&data, start, header, |r| intact.push(r));
    let replayable = match &snapshot {
        Snapshot::Damaged(_) => 0,
        Snapshot::Missing => replayable(&data, &intact, Pos::default()).len() as u64,
        Snapshot::At(base) => replayable(&data, &intact, *base).len() as u64,
    };
    Ok(Checked {
        snapshot,
        log_bytes: data.len() as u64,
        end,
        salvage,
        replayable,
    })
}

/// What [`repair`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Repaired {
    /// Records kept in the log.
    pub kept: u64,
    /// Intact records dropped because they follow a gap (or the snapshot was set aside).
    pub dropped_records: u64,
    /// Bytes dropped that held no intact record.
    pub dropped_bytes: u64,
    /// Copies of the files as they were, when the repair changed them.
    pub aside: Vec<PathBuf>,
}

impl fmt::Display for Repaired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.aside.is_empty() {
            return write!(f, "nothing to repair: {} records", self.kept);
        }
        write!(
            f,
            "kept {} records; dropped {} intact records that cannot be replayed (after a gap, \
             or after a damaged snapshot) and {} damaged bytes; the server catches up on \
             what it lacks from its peers; the files as they were are kept as",
            self.kept, self.dropped_records, self.dropped_bytes
        )?;
        for path in &self.aside {
            write!(f, " {}", path.display())?;
        }
        Ok(())
    }
}

/// Repairs the data directory `dir` (with no server running on it). A damaged snapshot is
/// copied aside and removed together with the log (the server starts empty). A damaged or
/// torn log is copied aside and replaced, atomically, by its intact records that continue
/// the snapshot, up to the first that does not. A directory with nothing to drop is left
/// as it is.
///
/// # Errors
/// When a file cannot be read, copied or written, or the log is not a messenger log.
pub fn repair(dir: &Path) -> io::Result<Repaired> {
    // Refused while a server has the directory open: it would go on using the old files.
    let _lock = durable::Lock::take(&dir.join(LOCK), dir)?;
    let log_path = dir.join(LOG);
    let data = read_log(&log_path)?;
    let start = LOG_MAGIC.len().min(data.len());
    let mut intact = Vec::new();
    let salvage = durable::salvage(&data, start, header, |r| intact.push(r));
    let mut repaired = Repaired {
        dropped_bytes: salvage.damaged_bytes(),
        ..Repaired::default()
    };
    let base = match snapshot_in(dir)? {
        Snapshot::Damaged(_) => {
            let snapshot = dir.join(SNAPSHOT);
            repaired.aside.push(durable::copy_aside(&snapshot)?);
            if log_path.exists() {
                repaired.aside.push(durable::copy_aside(&log_path)?);
            }
            repaired.dropped_records = salvage.records;
            // The log first: a crash in between leaves a damaged snapshot (refused again,
            // repaired again), never a log without the snapshot it continues.
            remove_if_present(&log_path)?;
            fs::remove_file(&snapshot)?;
            durable::sync_dir(&snapshot)?;
            return Ok(repaired);
        }
        Snapshot::Missing => Pos::default(),
        Snapshot::At(base) => base,
    };
    let keep = replayable(&data, &intact, base);
    repaired.kept = keep.len() as u64;
    repaired.dropped_records = salvage.records - repaired.kept;
    if salvage.damaged.is_empty() && repaired.dropped_records == 0 {
        return Ok(repaired);
    }
    repaired.aside.push(durable::copy_aside(&log_path)?);
    let temp = dir.join(format!("{LOG}.repair"));
    durable::write_atomically(&log_path, &temp, |out| {
        out.write_all(LOG_MAGIC)?;
        keep.iter()
            .try_for_each(|r| out.write_all(&data[r.clone()]))
    })?;
    Ok(repaired)
}

/// `messenger-server --data-dir DIR --check`, or `--repair` with `repair`: prints what
/// [`check`] or [`repair`] found to stdout. Exits 0 when the directory is usable (a start
/// uses it as it is, or the repair succeeded), 1 when a check finds it damaged, 2 when it
/// cannot be read or repaired.
pub fn check_or_repair(dir: &Path, repair: bool) -> ExitCode {
    let shown = dir.display();
    let result = if repair {
        self::repair(dir).map(|done| (done.to_string(), false))
    } else {
        check(dir).map(|checked| {
            let mut text = checked.to_string();
            if checked.is_damaged() {
                text.push_str(&format!(
                    "\nrepair: messenger-server --data-dir {shown} --repair"
                ));
            }
            (text, checked.is_damaged())
        })
    };
    crate::cli::report_check(shown, result)
}

fn snapshot_in(dir: &Path) -> io::Result<Snapshot> {
    if !dir.join(SNAPSHOT).exists() {
        return Ok(Snapshot::Missing);
    }
    match read_snapshot(dir) {
        Ok((pos, _)) => Ok(Snapshot::At(pos)),
        Err(e) => match e
            .into_inner()
            .map(|inner| inner.downcast::<SnapshotDamaged>())
        {
            Some(Ok(damaged)) => Ok(Snapshot::Damaged(*damaged)),
            Some(Err(other)) => Err(io::Error::other(other)),
            None => Err(io::Error::other("cannot read the snapshot")),
        },
    }
}

/// The intact records (`intact`, ranges of `data`) a start would replay or skip after a
/// snapshot at `base`: up to the first that does not continue the log.
fn replayable(data: &[u8], intact: &[Range<usize>], base: Pos) -> Vec<Range<usize>> {
    let mut last = base;
    let mut keep = Vec::new();
    for r in intact {
        let Some((record, change)) = continuing(&data[r.clone()], base, last) else {
            break;
        };
        if change.is_some() {
            last = record.pos;
        }
        keep.push(r.clone());
    }
    keep
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::log::{encode_record, encode_snapshot, Disk};
    use super::super::state::{Change, State};
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("switchboard-msgfix-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn name(i: usize) -> String {
        format!("user{i:03}{}", "x".repeat(100))
    }

    /// A log of `n` registrations at seq 1..=n, and each record's offset.
    fn log(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut data = LOG_MAGIC.to_vec();
        let mut starts = Vec::new();
        for i in 0..n {
            starts.push(data.len());
            let change = Change::Register {
                name: name(i),
                nonce: 0,
            };
            let pos = Pos {
                epoch: 1,
                seq: i as u64 + 1,
            };
            encode_record(pos, &change.to_bytes(), &mut data);
        }
        (data, starts)
    }

    /// Writes `data` as the change log, and checks that a start refuses it unchanged, that a
    /// check says so, and that a repair keeps the first `kept` records (and the original
    /// beside it), after which a start replays them.
    fn refused_then_repaired(name_: &str, data: &[u8], at: usize, intact: u64, kept: u64) {
        let dir = temp_dir(name_);
        let log_path = dir.join(LOG);
        fs::write(&log_path, data).unwrap();
        let err = Disk::open(&dir, false)
            .err()
            .expect("a damaged log is refused");
        let damaged = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<durable::Damaged>())
            .expect("the error says where the damage is");
        assert_eq!(damaged.damage.at, at as u64, "{damaged}");
        assert!(damaged.to_string().contains("--repair"), "{damaged}");
        assert_eq!(
            fs::read(&log_path).unwrap(),
            data,
            "a refusal changes nothing"
        );

        let checked = check(&dir).unwrap();
        assert!(checked.is_damaged(), "{checked}");
        assert_eq!(
            (checked.salvage.records, checked.replayable),
            (intact, kept)
        );
        assert_eq!(
            fs::read(&log_path).unwrap(),
            data,
            "a check changes nothing"
        );

        let repaired = repair(&dir).unwrap();
        assert_eq!(repaired.kept, kept, "{repaired}");
        assert_eq!(repaired.dropped_records, intact - kept, "{repaired}");
        assert_eq!(repaired.aside.len(), 1);
        assert_eq!(fs::read(&repaired.aside[0]).unwrap(), data);
        assert!(!check(&dir).unwrap().is_damaged());
        let (_disk, loaded) = Disk::open(&dir, false).unwrap();
        assert_eq!((loaded.records.len() as u64, loaded.torn), (kept, None));
        for i in 0..kept as usize {
            assert!(loaded.state.exists(&name(i)));
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_flipped_byte_is_refused_and_repair_keeps_what_continues_the_log() {
        let (mut data, starts) = log(100);
        data[starts[50] + 40] ^= 0x01;
        // Records 51..99 are intact but follow the lost 50: kept aside, not replayed.
        refused_then_repaired("flip", &data, starts[50], 99, 50);
    }

    #[test]
    fn a_corrupted_length_is_refused() {
        let (mut data, starts) = log(100);
        data[starts[40] + 16..starts[40] + 20].copy_from_slice(&0xfff0u32.to_be_bytes());
        refused_then_repaired("len", &data, starts[40], 99, 40);
    }

    #[test]
    fn a_zeroed_page_is_refused_and_zeros_never_pass_for_a_record() {
        let (mut data, starts) = log(100);
        let whole = data.clone();
        data[4096..8192].fill(0);
        // Lost: the records whose bytes changed (a record starting just before the page end
        // may keep its bytes: the high bytes of its seq are zeros already).
        let ends = starts.iter().skip(1).copied().chain([data.len()]);
        let lost: Vec<usize> = (starts.iter().zip(ends).enumerate())
            .filter(|(_, (&s, e))| data[s..*e] != whole[s..*e])
            .map(|(i, _)| i)
            .collect();
        assert!(lost.len() >= 29, "{lost:?}");
        let (first, n) = (lost[0], lost.len() as u64);
        refused_then_repaired("zeroed", &data, starts[first], 100 - n, first as u64);
    }

    #[test]
    fn garbage_after_the_last_record_is_refused_and_repair_keeps_all() {
        let (mut data, _) = log(100);
        let end = data.len();
        data.extend_from_slice(b"garbage, not a record at all");
        refused_then_repaired("garbage", &data, end, 100, 100);
    }

    #[test]
    fn a_truncated_tail_starts_cut_back() {
        let (data, starts) = log(100);
        let dir = temp_dir("truncated");
        fs::write(dir.join(LOG), &data[..starts[99] + 30]).unwrap();
        assert!(!check(&dir).unwrap().is_damaged());
        let (_disk, loaded) = Disk::open(&dir, false).unwrap();
        assert_eq!(loaded.records.len(), 99);
        assert_eq!(loaded.torn, Some((starts[99] as u64, 30)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_snapshot_is_refused_and_repair_sets_it_and_the_log_aside() {
        let dir = temp_dir("snapshot");
        let mut state = State::new();
        state.apply(
            Pos { epoch: 1, seq: 1 }.into(),
            &Change::Register {
                name: "ann".into(),
                nonce: 0,
            },
        );
        let mut snap = encode_snapshot(Pos { epoch: 1, seq: 1 }, &state);
        let n = snap.len();
        snap[n - 6] ^= 1;
        fs::write(dir.join(SNAPSHOT), &snap).unwrap();
        let (data, _) = log(3);
        fs::write(dir.join(LOG), &data).unwrap();
        let err = Disk::open(&dir, false).err().unwrap();
        let text = err.to_string();
        assert!(
            text.contains("snapshot") && text.contains("--repair"),
            "{text}"
        );
        assert!(check(&dir).unwrap().is_damaged());
        let repaired = repair(&dir).unwrap();
        assert_eq!(repaired.aside.len(), 2, "{repaired}");
        assert_eq!(fs::read(&repaired.aside[0]).unwrap(), snap);
        assert_eq!(fs::read(&repaired.aside[1]).unwrap(), data);
        let (_disk, loaded) = Disk::open(&dir, false).unwrap();
        assert_eq!((loaded.base, loaded.records.len()), (Pos::default(), 0));
        fs::remove_dir_all(&dir).unwrap();
    }
}
