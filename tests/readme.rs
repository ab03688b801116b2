//! README's commands run as written: every ```sh block of README.md is run with
//! `bash -eu -o pipefail`, one after another, each in a fresh temporary directory (with
//! `interop/` linked in, as in a clone) and its own process group, with this build's
//! binaries first on PATH. A block passes when it exits 0 within `BLOCK_TIMEOUT` and leaves
//! no process behind; on failure the block, its stdout and its stderr are printed.
//!
//! Lines beginning with `cargo ` are skipped: they are what CI itself runs (building,
//! testing), building inside a test would recurse, and putting `target/release` on PATH is
//! what this test does for them with its own binaries. Output and prose are fenced
//! ```text and not run; only `sh`, `text` and `rust` fences are allowed, so a command block
//! cannot escape the walk under another name.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Longest a block may run; past it its whole process group is killed.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// One ```sh block: where it starts in README.md and the script to run.
struct Block {
    line: usize,
    script: String,
}

/// The ```sh blocks of `readme`, with `cargo ` lines (and their `\` continuations) skipped.
fn sh_blocks(readme: &str) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, Block)> = None;
    let mut continuing_cargo = false;
    for (i, line) in readme.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut open, fence) {
            (None, Some(info)) => {
                let info = info.trim().to_owned();
                if !["sh", "text", "rust"].contains(&info.as_str()) {
                    return Err(format!(
                        "README.md:{}: fence ```{info}: use sh (run by this test), text or rust",
                        i + 1
                    ));
                }
                let block = Block {
                    line: i + 1,
                    script: String::new(),
                };
                open = Some((info, block));
            }
            (None, None) => {}
            (Some(_), Some(_)) => {
                let (info, block) = open.take().expect("an open block");
                if info == "sh" {
                    blocks.push(block);
                }
            }
            (Some((_, block)), None) => {
                let skip = continuing_cargo || line.trim_start().starts_with("cargo ");
                continuing_cargo = skip && line.trim_end().ends_with('\\');
                if skip {
                    block.script.push_str("# (skipped by the walk) ");
                }
                block.script.push_str(line);
                block.script.push('\n');
            }
        }
    }
    match open {
        Some((_, block)) => Err(format!("README.md:{}: fence never closed", block.line)),
        None => Ok(blocks),
    }
}

/// What one block did.
struct Outcome {
    status: Option<ExitStatus>,
    timed_out: bool,
    left_behind: bool,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn passed(&self) -> bool {
        !self.timed_out && !self.left_behind && self.status.is_some_and(|s| s.success())
    }
}

/// Sends `signal` to every process in group `pgid`; false when the group is empty.
fn signal_group(pgid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args([signal, "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn run_block(block: &Block, dir: &Path, path_var: &str) -> Outcome {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("bash")
        .args(["-eu", "-o", "pipefail", "-c", &block.script])
        .current_dir(dir)
        .env("PATH", path_var)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: the servers a block starts with `&` are killed with it, even when
        // the block fails before stopping them.
        .process_group(0)
        .spawn()
        .expect("run bash");
    let pgid = child.id();
    let stdout = read_all(child.stdout.take().expect("piped stdout"));
    let stderr = read_all(child.stderr.take().expect("piped stderr"));
    let (done, finished) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let _ = done.send(child.wait());
    });
    let (status, timed_out) = match finished.recv_timeout(BLOCK_TIMEOUT) {
        Ok(status) => (status.ok(), false),
        Err(_) => {
            signal_group(pgid, "-KILL");
            (finished.recv().ok().and_then(Result::ok), true)
        }
    };
    let _ = waiter.join();
    // A block stops what it starts; anything still in the group was left running.
    let left_behind = signal_group(pgid, "-KILL");
    Outcome {
        status,
        timed_out,
        left_behind,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

fn fresh_dir(repo: &Path, n: usize) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switchboard-readme-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    std::os::unix::fs::symlink(repo.join("interop"), dir.join("interop")).expect("link interop/");
    dir
}

#[test]
fn every_sh_block_in_readme_runs() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).expect("read README.md");
    let blocks = sh_blocks(&readme).unwrap_or_else(|e| panic!("{e}"));
    assert!(blocks.len() >= 7, "README.md has a quick start per service");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_store-server"))
        .parent()
        .expect("the binaries' directory");
    let path_var = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut failures = Vec::new();
    for (n, block) in blocks.iter().enumerate() {
        let dir = fresh_dir(repo, n);
        let started = Instant::now();
        let outcome = run_block(block, &dir, &path_var);
        let took = started.elapsed();
        if outcome.passed() {
            let _ = std::fs::remove_dir_all(&dir);
            continue;
        }
        let mut why = match (outcome.timed_out, outcome.status) {
            (true, _) => format!("killed after {BLOCK_TIMEOUT:?}"),
            (false, Some(status)) => format!("exit status {}", status.code().unwrap_or(-1)),
            (false, None) => "no exit status".to_owned(),
        };
        if outcome.left_behind && !outcome.timed_out {
            why.push_str("; left processes running (killed now): stop what the block starts");
        }
        failures.push(format!(
            "README.md:{} ({why}, {took:.1?}, in {}):\n{}\n--- stdout ---\n{}--- stderr ---\n{}",
            block.line,
            dir.display(),
            block.script,
            outcome.stdout,
            outcome.stderr
        ));
    }
    assert!(
        failures.is_empty(),
        "{} of {} README blocks failed:\n\n{}",
        failures.len(),
        blocks.len(),
        failures.join("\n")
    );
}

#[test]
fn the_walk_finds_blocks_and_skips_cargo() {
    let readme = "intro\n```sh\ncargo build --release \\\n    --bins\nstore-client stats\n```\n\
                  ```text\nnot run\n```\n```sh\necho hi\n```\n";
    let blocks = sh_blocks(readme).expect("parse");
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].line, 2);
    assert_eq!(
        blocks[0].script,
        "# (skipped by the walk) cargo build --release \\\n\
         # (skipped by the walk)     --bins\nstore-client stats\n"
    );
    assert_eq!(blocks[1].script, "echo hi\n");
    assert!(sh_blocks("```bash\nls\n```\n").is_err());
    assert!(sh_blocks("```sh\nls\n").is_err());
}
