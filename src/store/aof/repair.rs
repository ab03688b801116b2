//! `--aof-check` and `--aof-repair`: what a damaged log holds, and a copy of it that keeps
//! every intact record, before and after the damage.

use super::record::header;
use super::{damaged, not_a_log, MAGIC};
use crate::durable::{self, Damaged, End, Salvage};
use std::fmt;
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// What [`check`] found in a log; it changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The file's size.
    pub bytes: u64,
    /// How its intact records end, as a start would see it: clean, a torn final record
    /// (a start cuts it off), or damage (a start refuses the file).
    pub end: End,
    /// Every intact record, and the damaged spans between them.
    pub salvage: Salvage,
    /// The refusal a start would give, when the file is damaged.
    pub refusal: Option<Damaged>,
}

impl Checked {
    /// Whether a start refuses the file (only [`repair`] makes it usable).
    pub fn is_damaged(&self) -> bool {
        matches!(self.end, End::Damaged(_))
    }
}

impl fmt::Display for Checked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes, {} intact records",
            self.bytes, self.salvage.records
        )?;
        match self.end {
            End::Clean => write!(f, "; clean"),
            End::Torn { at, len } => write!(
                f,
                "; a torn final record at byte {at} ({len} bytes): a start cuts it off"
            ),
            End::Damaged(d) => {
                write!(
                    f,
                    "; DAMAGED: first bad byte at {}, {} intact records before it, {} bytes \
                     from there to the end; ",
                    d.at, d.records_before, d.bytes_after
                )?;
                match d.resync {
                    Some(at) => write!(
                        f,
                        "later records parse: yes, from byte {at} ({} intact records after \
                         the damage)",
                        self.salvage.records_after_damage
                    )?,
                    None => write!(f, "later records parse: no")?,
                }
                write!(
                    f,
                    "; {} damaged span(s), {} bytes; a start refuses the file, a repair keeps \
                     the {} intact records",
                    self.salvage.damaged.len(),
                    self.salvage.damaged_bytes(),
                    self.salvage.records
                )
            }
        }
    }
}

/// What [`repair`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repaired {
    /// The intact records kept, and the spans dropped.
    pub salvage: Salvage,
    /// Where the file as it was is kept, when the repair changed it.
    pub aside: Option<PathBuf>,
}

impl fmt::Display for Repaired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.aside {
            None => write!(
                f,
                "nothing to repair: {} intact records",
                self.salvage.records
            ),
            Some(aside) => {
                write!(
                    f,
                    "kept {} intact records ({} of them after the damage); dropped {} bytes \
                     in {} span(s):",
                    self.salvage.records,
                    self.salvage.records_after_damage,
                    self.salvage.damaged_bytes(),
                    self.salvage.damaged.len()
                )?;
                for span in &self.salvage.damaged {
                    write!(f, " {}..{}", span.start, span.end)?;
                }
                write!(f, "; the file as it was is kept as {}", aside.display())
            }
        }
    }
}

/// Reads the log at `path` and reports what a start would do with it and what a repair
/// would keep; changes nothing.
///
/// # Errors
/// When the file cannot be read or is not a log of this format.
pub fn check(path: &Path) -> io::Result<Checked> {
    let data = read_log(path)?;
    let scan = durable::scan(&data, MAGIC.len().min(data.len()), header, |_| {});
    let salvage = durable::salvage(&data, MAGIC.len().min(data.len()), header, |_| {});
    let refusal = match scan.end {
        End::Damaged(d) => Some(damaged(path, d)),
        _ => None,
    };
    Ok(Checked {
        bytes: data.len() as u64,
        end: scan.end,
        salvage,
        refusal,
    })
}

/// Repairs the log at `path` (with no server running on it): copies it to
/// `PATH.damaged-<unix time>`, then replaces it (atomically) with the magic and every
/// intact record, in order, from both sides of any damage. A file with nothing to drop is
/// left as it is.
///
/// # Errors
/// When the file cannot be read, is not a log of this format, or the copy or the new file
/// cannot be written (`path` is then as it was).
pub fn repair(path: &Path) -> io::Result<Repaired> {
    // Refused while a server has the log open: it would go on appending to the old file.
    let _lock = durable::Lock::beside(path)?;
    let data = read_log(path)?;
    let start = MAGIC.len().min(data.len());
    let mut kept: Vec<Range<usize>> = Vec::new();
    let salvage = durable::salvage(&data, start, header, |r| match kept.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => kept.push(r),
    });
    if salvage.damaged.is_empty() {
        return Ok(Repaired {
            salvage,
            aside: None,
        });
    }
    let aside = durable::copy_aside(path)?;
    let mut temp = path.as_os_str().to_owned();
    temp.push(".repair");
    durable::write_atomically(path, Path::new(&temp), |out| {
        out.write_all(MAGIC)?;
        kept.iter()
            .try_for_each(|r| out.write_all(&data[r.clone()]))
    })?;
    Ok(Repaired {
        salvage,
        aside: Some(aside),
    })
}

/// `store-server --aof PATH --aof-check`, or `--aof-repair` with `repair`: prints what
/// [`check`] or [`repair`] found to stdout. Exits 0 when the file is usable (a start uses it
/// as it is, or the repair succeeded), 1 when a check finds it damaged, 2 when it cannot be
/// read, is not a log, or cannot be repaired.
pub fn check_or_repair(path: &Path, repair: bool) -> ExitCode {
    let shown = path.display();
    let result = if repair {
        self::repair(path).map(|done| (done.to_string(), false))
    } else {
        check(path).map(|checked| {
            let mut text = checked.to_string();
            if let Some(refusal) = &checked.refusal {
                text.push_str(&format!("\nrepair: {}", refusal.repair));
            }
            (text, checked.is_damaged())
        })
    };
    crate::cli::report_check(shown, result)
}

fn read_log(path: &Path) -> io::Result<Vec<u8>> {
    let data = std::fs::read(path)?;
    let header_torn = data.len() < MAGIC.len() && MAGIC.starts_with(&data);
    if !data.starts_with(MAGIC) && !header_torn {
        return Err(not_a_log(path));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::super::record::encode_store;
    use super::super::{remove_log, temp_path, Aof, Fsync};
    use super::*;
    use crate::store::state::Store;

    /// A log of `n` records `key{i:03}` = 100 bytes, and each record's offset.
    fn log(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut data = MAGIC.to_vec();
        let mut starts = Vec::new();
        for i in 0..n {
            starts.push(data.len());
            encode_store(
                format!("key{i:03}").as_bytes(),
                &[b'a' + (i % 26) as u8; 100],
                &mut data,
            );
        }
        (data, starts)
    }

    /// Records (by index) whose bytes differ between `a` and `b`.
    fn changed(starts: &[usize], a: &[u8], b: &[u8]) -> Vec<usize> {
        let ends = starts.iter().skip(1).copied().chain([a.len()]);
        (starts.iter().zip(ends).enumerate())
            .filter(|(_, (&s, e))| a[s..*e] != b[s..*e])
            .map(|(i, _)| i)
            .collect()
    }

    fn open(path: &Path) -> io::Result<(Store, u64)> {
        let store = Store::new();
        let (aof, replay) = Aof::open_after_a_crash(path, Fsync::No, &store)?;
        aof.close()?;
        Ok((store, replay.records))
    }

    /// Writes `data` to a fresh log, and checks that a start refuses it without changing
    /// it, that a check says so, and that a repair keeps every record but `lost` (and the
    /// original beside it), after which a start replays them all.
    fn refused_then_repaired(name: &str, data: &[u8], at: usize, lost: &[usize], n: usize) {
        let path = temp_path(name);
        std::fs::write(&path, data).unwrap();
        let err = open(&path).err().expect("a damaged log is refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let damaged = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<Damaged>())
            .expect("the error says where the damage is");
        assert_eq!(damaged.damage.at, at as u64, "{damaged}");
        assert_eq!(damaged.damage.bytes_after, (data.len() - at) as u64);
        assert!(damaged.to_string().contains("--aof-repair"), "{damaged}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            data,
            "a refusal changes nothing"
        );

        let checked = check(&path).unwrap();
        assert!(checked.is_damaged(), "{checked}");
        assert_eq!(
            checked.salvage.records,
            (n - lost.len()) as u64,
            "{checked}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            data,
            "a check changes nothing"
        );

        let repaired = repair(&path).unwrap();
        assert_eq!(
            repaired.salvage.records,
            (n - lost.len()) as u64,
            "{repaired}"
        );
        let aside = repaired.aside.clone().expect("the original is kept");
        assert_eq!(std::fs::read(&aside).unwrap(), data);
        assert!(!check(&path).unwrap().is_damaged());
        let (store, records) = open(&path).unwrap();
        assert_eq!(records, (n - lost.len()) as u64);
        for i in 0..n {
            let found = store.get(format!("key{i:03}").as_bytes()).is_some();
            assert_eq!(found, !lost.contains(&i), "key{i:03}");
        }
        remove_log(&path);
        std::fs::remove_file(&aside).unwrap();
    }

    #[test]
    fn a_flipped_byte_in_the_middle_is_refused_and_repair_keeps_the_other_99() {
        let (mut data, starts) = log(100);
        data[starts[50] + 40] ^= 0x01; // in record 50's value
        refused_then_repaired("flip", &data, starts[50], &[50], 100);
    }

    #[test]
    fn a_corrupted_length_in_the_middle_is_refused_and_repair_keeps_the_other_99() {
        // A value length that runs far past the end of the file, and one that stays in it.
        for (name, vlen) in [("len-long", 0x00ff_0000u32), ("len-short", 7)] {
            let (mut data, starts) = log(100);
            data[starts[40] + 5..starts[40] + 9].copy_from_slice(&vlen.to_be_bytes());
            refused_then_repaired(name, &data, starts[40], &[40], 100);
        }
    }

    #[test]
    fn a_zeroed_page_in_the_middle_is_refused_and_repair_keeps_every_record_outside_it() {
        let (mut data, starts) = log(100);
        let whole = data.clone();
        data[4096..8192].fill(0);
        let lost = changed(&starts, &data, &whole);
        assert!(lost.len() >= 34 && lost.len() <= 36, "{lost:?}");
        refused_then_repaired("zeroed", &data, starts[lost[0]], &lost, 100);
    }

    #[test]
    fn garbage_after_the_last_record_is_refused_and_repair_keeps_all_100() {
        for (name, tail) in [
            ("garbage", b"\x00\x01 this is not a record".to_vec()),
            ("zeros", vec![0; 4096]),
        ] {
            let (mut data, _) = log(100);
            let end = data.len();
            data.extend_from_slice(&tail);
            refused_then_repaired(name, &data, end, &[], 100);
            let path = temp_path(name);
            std::fs::write(&path, &data).unwrap();
            let checked = check(&path).unwrap();
            assert!(
                checked.to_string().contains("later records parse: no"),
                "{checked}"
            );
            remove_log(&path);
        }
    }

    #[test]
    fn a_truncated_tail_starts_cut_back_and_checks_clean() {
        let (data, starts) = log(100);
        let cut = &data[..starts[99] + 50];
        let path = temp_path("truncated");
        std::fs::write(&path, cut).unwrap();
        let checked = check(&path).unwrap();
        assert!(!checked.is_damaged(), "{checked}");
        assert!(
            checked.to_string().contains("torn final record"),
            "{checked}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), cut);
        let (store, records) = open(&path).unwrap();
        assert_eq!(records, 99);
        assert!(store.get(b"key098").is_some() && store.get(b"key099").is_none());
        assert_eq!(std::fs::read(&path).unwrap(), &data[..starts[99]]);
        // Clean now: a repair has nothing to do and makes no copy.
        let repaired = repair(&path).unwrap();
        assert_eq!((repaired.salvage.records, repaired.aside), (99, None));
        remove_log(&path);
    }

    #[test]
    fn big_records_after_damage_are_found_again() {
        // Records over 64 KiB are checked for a plausible header after them before their
        // CRC (see `durable`): one followed by another record, and one by the end, are kept.
        let mut data = MAGIC.to_vec();
        let mut starts = Vec::new();
        for i in 0..4u8 {
            starts.push(data.len());
            encode_store(&[b'k', b'0' + i], &vec![i; 100 << 10], &mut data);
        }
        data[starts[1] + 500] ^= 0x01;
        let path = temp_path("big");
        std::fs::write(&path, &data).unwrap();
        let checked = check(&path).unwrap();
        assert!(checked.is_damaged());
        assert_eq!(checked.salvage.records, 3, "{checked}");
        assert_eq!(
            checked.salvage.damaged,
            vec![starts[1] as u64..starts[2] as u64]
        );
        remove_log(&path);
    }

    #[test]
    fn check_and_repair_refuse_a_file_that_is_not_a_log() {
        let path = temp_path("not-a-log");
        std::fs::write(&path, b"precious, not a log").unwrap();
        assert_eq!(check(&path).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            repair(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"precious, not a log");
        remove_log(&path);
    }
}
