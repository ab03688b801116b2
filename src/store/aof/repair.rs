//! `--aof-check` and `--aof-repair`: what a damaged log holds, and a copy of it that keeps
//! every intact record, before and after the damage.

use super::record::frame;
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
    let scan = durable::scan(&data, MAGIC.len().min(data.len()), frame, |_| {});
    let salvage = durable::salvage(&data, MAGIC.len().min(data.len()), frame, |_| {});
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
    let data = read_log(path)?;
    let start = MAGIC.len().min(data.len());
    let mut kept: Vec<Range<usize>> = Vec::new();
    let salvage = durable::salvage(&data, start, frame, |r| match kept.last_mut() {
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
    match result {
        Ok((text, damaged)) => {
            println!("{shown}: {text}");
            ExitCode::from(u8::from(damaged))
        }
        Err(e) => {
            eprintln!("{shown}: {e}");
            ExitCode::from(2)
        }
    }
}

fn read_log(path: &Path) -> io::Result<Vec<u8>> {
    let data = std::fs::read(path)?;
    let header_torn = data.len() < MAGIC.len() && MAGIC.starts_with(&data);
    if !data.starts_with(MAGIC) && !header_torn {
        return Err(not_a_log(path));
    }
    Ok(data)
}
