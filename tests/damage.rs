//! Damaged logs, end to end through the real binaries: a store AOF or a messenger change log
//! damaged in the middle (a flipped byte, a corrupted length, a zeroed 4 KiB page) or with
//! garbage appended is refused at start with a message that says where and what to run;
//! `--aof-check` / `--check` report it and change nothing; `--aof-repair` / `--repair` keep
//! every intact record, keep the original beside it, and the server then starts. A torn
//! tail is still cut back and the server starts.

mod common;

use common::{output_within, ChildServer, LineClient};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use switchboard::messenger::log::{encode_record, Pos};
use switchboard::messenger::state::Change;

const STORE: &str = env!("CARGO_BIN_EXE_store-server");
const MESSENGER: &str = env!("CARGO_BIN_EXE_messenger-server");

/// Records written by [`store_log`]: `key000`..`key099`, each = 100 bytes.
const RECORDS: usize = 100;
/// Bytes of the magic line, and of each of those records ('S', two lengths, key, value, CRC).
const MAGIC_LEN: usize = 8;
const RECORD_LEN: usize = 1 + 8 + 6 + 100 + 4;

/// A fresh path of its own: tests run in parallel, so each call gets a new number.
fn temp(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = std::env::temp_dir().join(format!(
        "switchboard-damage-{}-{n}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&p);
    let _ = std::fs::remove_dir_all(&p);
    p
}

fn value(i: usize) -> String {
    char::from(b'a' + (i % 26) as u8).to_string().repeat(100)
}

/// A store AOF of [`RECORDS`] records, written by a real server over the wire.
fn store_log() -> Vec<u8> {
    let path = temp("source.aof");
    let mut server = ChildServer::start(
        STORE,
        &["--listen", "127.0.0.1:0", "--aof", path.to_str().unwrap()],
    );
    let mut c = LineClient::connect(server.addr);
    let mut batch = String::new();
    for i in 0..RECORDS {
        batch.push_str(&format!("store,key{i:03},{}\n", value(i)));
    }
    batch.push_str("lookup,key099\n");
    assert_eq!(c.ask(&batch), format!("{{just,{}}}", value(99)));
    assert!(server.terminate());
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data.len(), MAGIC_LEN + RECORDS * RECORD_LEN);
    std::fs::remove_file(&path).unwrap();
    data
}

fn record_at(i: usize) -> usize {
    MAGIC_LEN + i * RECORD_LEN
}

fn store(args: &[&str]) -> Output {
    let mut cmd = Command::new(STORE);
    cmd.args(args);
    output_within(cmd)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `PATH.damaged-*` copies beside `path`.
fn copies_beside(path: &Path) -> Vec<PathBuf> {
    let name = format!("{}.damaged-", path.file_name().unwrap().to_str().unwrap());
    std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&name))
        .collect()
}

/// Damages nothing itself: writes `data` as an AOF and checks that a start refuses it
/// (exit non-zero, the file, the offset, the records before, the bytes after, the repair
/// command, and the file unchanged), that `--aof-check` reports it and exits 1, and that
/// `--aof-repair` keeps every record but `lost` (the original beside it), after which the
/// server starts and serves exactly those.
fn refused_checked_repaired(name: &str, data: &[u8], at: usize, before: usize, lost: &[usize]) {
    let path = temp(name);
    let p = path.to_str().unwrap();
    std::fs::write(&path, data).unwrap();

    let out = store(&["--listen", "127.0.0.1:0", "--aof", p]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    for part in [
        p.to_string(),
        format!("damaged at byte {at}"),
        format!("{before} intact records before it"),
        format!("{} bytes from there to the end", data.len() - at),
        format!("store-server --aof {p} --aof-repair"),
    ] {
        assert!(said.contains(&part), "{part:?} not in: {said}");
    }
    assert!(!said.contains("listening"), "{said}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        data,
        "a refused start changed the file"
    );

    let out = store(&["--aof", p, "--aof-check"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let intact = RECORDS - lost.len();
    assert!(
        report.contains(&format!("{intact} intact records")),
        "{report}"
    );
    assert!(
        report.contains(&format!("first bad byte at {at}")),
        "{report}"
    );
    assert!(report.contains("--aof-repair"), "{report}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        data,
        "a check changed the file"
    );

    let out = store(&["--aof", p, "--aof-repair"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(
        report.contains(&format!("kept {intact} intact records")),
        "{report}"
    );
    let copies = copies_beside(&path);
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(std::fs::read(&copies[0]).unwrap(), data);
    assert_eq!(store(&["--aof", p, "--aof-check"]).status.code(), Some(0));

    let server = ChildServer::start(STORE, &["--listen", "127.0.0.1:0", "--aof", p]);
    assert!(server
        .log_text()
        .contains(&format!("{intact} records replayed")));
    let mut c = LineClient::connect(server.addr);
    for i in 0..RECORDS {
        let want = match lost.contains(&i) {
            true => "nothing".to_string(),
            false => format!("{{just,{}}}", value(i)),
        };
        assert_eq!(c.ask(&format!("lookup,key{i:03}\n")), want, "key{i:03}");
    }
    drop(server);
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&copies[0]).unwrap();
}

#[test]
fn store_logs_damaged_in_the_middle_or_after_the_end_are_refused_and_repaired() {
    let log = store_log();

    // One byte flipped in record 50's value: 99 of 100 kept.
    let mut flipped = log.clone();
    flipped[record_at(50) + 60] ^= 0x08;
    refused_checked_repaired("flip.aof", &flipped, record_at(50), 50, &[50]);

    // Record 40's value length corrupted (it now runs past the end of the file).
    let mut length = log.clone();
    length[record_at(40) + 5] = 0x10;
    refused_checked_repaired("length.aof", &length, record_at(40), 40, &[40]);

    // A zeroed 4 KiB page: the records it touches are lost, no other.
    let mut zeroed = log.clone();
    zeroed[4096..8192].fill(0);
    let lost: Vec<usize> = (0..RECORDS)
        .filter(|&i| record_at(i) < 8192 && record_at(i + 1) > 4096)
        .collect();
    refused_checked_repaired("zeroed.aof", &zeroed, record_at(lost[0]), lost[0], &lost);

    // Garbage after the last record: all 100 kept.
    let mut garbage = log.clone();
    garbage.extend_from_slice(b"\x00\x00 not a record, whatever it is \xff");
    refused_checked_repaired("garbage.aof", &garbage, log.len(), RECORDS, &[]);
}

#[test]
fn a_store_log_with_a_truncated_tail_checks_clean_and_starts_cut_back() {
    let log = store_log();
    let path = temp("truncated.aof");
    let p = path.to_str().unwrap();
    let cut = &log[..record_at(99) + 30];
    std::fs::write(&path, cut).unwrap();
    let out = store(&["--aof", p, "--aof-check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("torn final record"), "{}", text(&out));
    assert_eq!(std::fs::read(&path).unwrap(), cut);
    let server = ChildServer::start(STORE, &["--listen", "127.0.0.1:0", "--aof", p]);
    let log_text = server.log_text();
    assert!(log_text.contains("99 records replayed") && log_text.contains("torn"));
    let mut c = LineClient::connect(server.addr);
    assert_eq!(c.ask("lookup,key098\n"), format!("{{just,{}}}", value(98)));
    assert_eq!(c.ask("lookup,key099\n"), "nothing");
    drop(server);
    assert_eq!(std::fs::read(&path).unwrap(), &log[..record_at(99)]);
    // Cut, but never without a copy: the torn bytes are kept beside the log, and named.
    let name = format!("{}.torn-", path.file_name().unwrap().to_str().unwrap());
    let copies: Vec<PathBuf> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&name))
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(std::fs::read(&copies[0]).unwrap(), &cut[record_at(99)..]);
    assert!(
        log_text.contains("torn final record's 30 bytes are kept as"),
        "{log_text}"
    );
    std::fs::remove_file(&copies[0]).unwrap();
    std::fs::remove_file(&path).unwrap();
    let _ = std::fs::remove_file(format!("{p}.lock"));
}

#[test]
fn check_and_repair_without_a_log_or_on_a_foreign_file_fail_and_change_nothing() {
    let out = store(&["--aof-check"]);
    assert!(
        !out.status.success() && text(&out).contains("--aof"),
        "{}",
        text(&out)
    );
    let path = temp("foreign.aof");
    std::fs::write(&path, b"precious, not a log").unwrap();
    for flag in ["--aof-check", "--aof-repair"] {
        let out = store(&["--aof", path.to_str().unwrap(), flag]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"precious, not a log");
    assert!(copies_beside(&path).is_empty());
    std::fs::remove_file(&path).unwrap();
}

/// A messenger change log of `n` registrations (`user000`..), and each record's offset.
fn messenger_log(n: usize) -> (Vec<u8>, Vec<usize>) {
    let mut data = b"SWBMLOG1\n".to_vec();
    let mut starts = Vec::new();
    for i in 0..n {
        starts.push(data.len());
        let change = Change::Register {
            name: format!("user{i:03}"),
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

fn messenger(dir: &Path, extra: &[&str]) -> Output {
    let mut cmd = Command::new(MESSENGER);
    cmd.args(["--data-dir", dir.to_str().unwrap()]).args(extra);
    output_within(cmd)
}

#[test]
fn a_messenger_log_damaged_in_the_middle_is_refused_checked_and_repaired() {
    let (mut data, starts) = messenger_log(100);
    data[starts[50] + 25] ^= 0x08;
    let dir = temp("messenger");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("changes.log");
    std::fs::write(&log, &data).unwrap();
    let d = dir.to_str().unwrap();

    // Refused before it binds: the peers' address is never used.
    let out = messenger(&dir, &["--id", "0", "--peers", "127.0.0.1:9"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    for part in [
        format!("{}", log.display()),
        format!("damaged at byte {}", starts[50]),
        "50 intact records before it".to_string(),
        format!("messenger-server --data-dir {d} --repair"),
    ] {
        assert!(said.contains(&part), "{part:?} not in: {said}");
    }
    assert_eq!(std::fs::read(&log).unwrap(), data);

    let out = messenger(&dir, &["--check"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("99 intact records (50 replayable)"),
        "{report}"
    );
    assert!(
        report.contains(&format!("first bad byte at {}", starts[50])),
        "{report}"
    );
    assert_eq!(std::fs::read(&log).unwrap(), data);

    let out = messenger(&dir, &["--repair"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert!(
        report.contains("kept 50 records; dropped 49 intact"),
        "{report}"
    );
    let copies = copies_beside(&log);
    assert_eq!(copies.len(), 1);
    assert_eq!(std::fs::read(&copies[0]).unwrap(), data);
    assert_eq!(std::fs::read(&log).unwrap(), &data[..starts[50]]);
    let out = messenger(&dir, &["--check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_repaired_messenger_data_dir_starts_and_replays_what_was_kept() {
    let (mut data, starts) = messenger_log(10);
    data.truncate(starts[9] + 5); // a torn tail: forgiven
    data.extend_from_slice(&[0; 64]); // and zeros after it: not a torn record
    let dir = temp("messenger-start");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("changes.log"), &data).unwrap();
    let addr = switchboard::bench::free_addrs(1).unwrap()[0].to_string();
    let serve = ["--id", "0", "--peers", &addr];
    assert!(!messenger(&dir, &serve).status.success());
    assert_eq!(messenger(&dir, &["--repair"]).status.code(), Some(0));
    let mut args = vec!["--data-dir", dir.to_str().unwrap()];
    args.extend(serve);
    let mut server = ChildServer::start(MESSENGER, &args);
    assert!(
        server.log_text().contains("9 records replayed"),
        "{}",
        server.log_text()
    );
    assert!(server.terminate());
    std::fs::remove_dir_all(&dir).unwrap();
}
