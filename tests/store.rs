//! The store server, end to end: exact bytes over real sockets, the Python checker and
//! clients against the Rust server, the Rust client against the Python server, limits,
//! bad input, persistence across `kill -9`.

mod common;

use common::{
    connect, python, run_checked, run_python, run_with_input, ChildServer, Finished, LineClient,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard::framing::{encode_frame, FrameReader, Framing};
use switchboard::store::client::StoreClient;

const SERVER: &str = env!("CARGO_BIN_EXE_store-server");
const CLIENT: &str = env!("CARGO_BIN_EXE_store-client");

fn start(extra: &[&str]) -> ChildServer {
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    ChildServer::start(SERVER, &args)
}

fn port(s: &ChildServer) -> String {
    s.addr.port().to_string()
}

fn temp_file(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("switchboard-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Removes a store's log and its lock file.
fn remove_log(aof: &std::path::Path) {
    std::fs::remove_file(aof).unwrap();
    let mut lock = aof.as_os_str().to_owned();
    lock.push(".lock");
    let _ = std::fs::remove_file(lock);
}

#[test]
fn the_python_conformance_checker_passes_in_every_framing() {
    for framing in ["line", "ascii10", "u16", "u32"] {
        let server = start(&["--framing", framing]);
        let out = run_python(
            "store_check.py",
            &["--port", &port(&server), "--framing", framing],
        );
        assert!(out.contains(" passed, 0 failed"), "{framing}: {out}");
    }
}

#[test]
fn classic_exchange_byte_for_byte() {
    let server = start(&[]);
    let mut c = LineClient::connect(server.addr);
    c.send(b"store,ping,{remote_chan,{127,0,0,1},40123}\n");
    assert_eq!(
        c.ask("lookup,ping\n"),
        "{just,{remote_chan,{127,0,0,1},40123}}"
    );
    assert_eq!(c.ask("lookup,pong\n"), "nothing");
    c.send(b"store,k,a, b,,c\t{x}\xc3\xa9\xff\r\n");
    c.send(b"lookup,k\n");
    assert_eq!(c.line().unwrap(), b"{just,a, b,,c\t{x}\xc3\xa9\xff}");
    assert_eq!(c.ask("delete,k\n"), "ok");
    assert_eq!(c.ask("delete,k\n"), "nothing");
    assert_eq!(c.ask("STORE,k,v\n"), "{error,unknown_verb}");
    assert_eq!(c.ask("\n"), "{error,unknown_verb}");
    assert_eq!(c.ask("store,k\n"), "{error,missing_value}");
    assert_eq!(c.ask("lookup\n"), "{error,missing_key}");
    let stats = c.ask("stats\n");
    assert!(stats.starts_with("{stats,[{uptime_secs,"), "{stats}");
    assert!(
        stats.contains("{keys,1}") && stats.contains("{live_connections,1}"),
        "{stats}"
    );
    switchboard::term::parse(&stats).expect("stats is a term");
    // Counted by each connection: a second connection's requests are added in.
    let mut other = LineClient::connect(server.addr);
    other.send(b"store,a,1\nstore,b,2\n");
    assert_eq!(other.ask("lookup,a\n"), "{just,1}");
    assert_eq!(other.ask("delete,b\n"), "ok");
    let stats = other.ask("stats\n");
    assert!(
        stats.contains("{commands,[{store,4},{lookup,4},{delete,3},{stats,1},{error,4}]}"),
        "{stats}"
    );
    // And a connection's counts outlive it.
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = other.ask("stats\n");
        if stats.contains("{live_connections,1}") || std::time::Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(stats.contains("{live_connections,1}"), "{stats}");
    let stats = other.ask("stats\n");
    assert!(
        stats.contains("{store,4},{lookup,4},{delete,3}") && stats.contains("{error,4}]}"),
        "{stats}"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order_with_one_write_per_batch() {
    let server = start(&[]);
    let mut c = LineClient::connect(server.addr);
    let mut batch = Vec::new();
    for i in 0..2000 {
        batch.extend_from_slice(
            format!("store,k{i},v{i}\nlookup,k{i}\nlookup,missing{i}\n").as_bytes(),
        );
    }
    c.send(&batch);
    for i in 0..2000 {
        assert_eq!(c.line().unwrap(), format!("{{just,v{i}}}").as_bytes());
        assert_eq!(c.line().unwrap(), b"nothing");
    }
}

#[test]
fn one_shot_clients_as_the_erlang_course_wrote_them() {
    let server = start(&[]);
    for i in 0..50 {
        // Store: connect, send one line, close without reading.
        let mut s = connect(server.addr);
        s.write_all(format!("store,oneshot,{i}\n").as_bytes())
            .unwrap();
        drop(s);
        // Lookup on a fresh connection right after must see it.
        let mut l = LineClient::connect(server.addr);
        assert_eq!(l.ask("lookup,oneshot\n"), format!("{{just,{i}}}"));
    }
    // And through the Python one-shot client.
    let p = port(&server);
    run_python(
        "store_client.py",
        &["--port", &p, "--oneshot", "store", "py", "x,y"],
    );
    let out = run_python(
        "store_client.py",
        &["--port", &p, "--oneshot", "lookup", "py"],
    );
    assert_eq!(out.trim(), "{just,x,y}");
}

#[test]
fn silent_connections_opened_before_one_shot_clients_do_not_disturb_their_order() {
    let server = start(&[]);
    // Connected and never a byte sent: they hold nobody back, and order still holds.
    let silent: Vec<_> = (0..5).map(|_| connect(server.addr)).collect();
    for i in 0..50 {
        let mut s = connect(server.addr);
        s.write_all(format!("store,quiet,{i}\n").as_bytes())
            .unwrap();
        drop(s);
        let mut l = LineClient::connect(server.addr);
        assert_eq!(l.ask("lookup,quiet\n"), format!("{{just,{i}}}"));
    }
    // A silent connection that speaks at last is served like any other.
    let mut late = &silent[2];
    late.write_all(b"lookup,quiet\n").unwrap();
    let mut reply = [0u8; 10];
    late.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"{just,49}\n");
}

#[test]
fn a_torn_final_line_is_not_applied() {
    let server = start(&[]);
    let mut s = connect(server.addr);
    s.write_all(b"store,whole,1\nstore,torn,2").unwrap();
    drop(s);
    let mut c = LineClient::connect(server.addr);
    assert_eq!(c.ask("lookup,whole\n"), "{just,1}");
    assert_eq!(c.ask("lookup,torn\n"), "nothing");
    common::eventually("the torn write to be logged", || {
        server.log_text().contains("not applied")
    });
}

#[test]
fn overlong_lines_are_answered_and_skipped_and_the_connection_goes_on() {
    let server = start(&[]);
    let mut c = LineClient::connect(server.addr);
    // A 10 MiB line: far over the 1 MiB limit.
    let mut big = b"store,big,".to_vec();
    big.resize(10 << 20, b'x');
    big.extend_from_slice(b"\nlookup,big\n");
    let mut w = c.writer.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&big).unwrap());
    assert_eq!(c.line().unwrap(), b"{error,too_long}");
    assert_eq!(c.line().unwrap(), b"nothing");
    writer.join().unwrap();
    assert_eq!(c.ask("store,a,1\nlookup,a\n"), "{just,1}");
}

#[test]
fn size_prefixed_framings_carry_any_bytes_and_a_bad_header_closes_only_that_connection() {
    let server = start(&["--framing", "ascii10"]);
    let mut client = StoreClient::connect(server.addr, Framing::Ascii10).unwrap();
    let value = b"line one\nline two\x00\xff,{}";
    client.store(b"multi\nline key", value).unwrap();
    assert_eq!(client.lookup(b"multi\nline key").unwrap().unwrap(), value);

    let mut bad = connect(server.addr);
    bad.write_all(b"   -5hello").unwrap();
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "no reply to a bad header, just a close: {rest:?}"
    );

    // Over the 16 MiB frame limit: answered, skipped, connection kept.
    let mut over = connect(server.addr);
    let mut req = b"  16777217".to_vec();
    req.extend(std::iter::repeat_n(b'z', 16_777_217));
    encode_frame(Framing::Ascii10, b"lookup,multi\nline key", &mut req).unwrap();
    let mut w = over.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&req).unwrap());
    let mut r = FrameReader::new(&mut over, Framing::Ascii10);
    assert_eq!(r.read_frame().unwrap().unwrap(), b"{error,too_long}");
    let mut want = b"{just,".to_vec();
    want.extend_from_slice(value);
    want.push(b'}');
    assert_eq!(r.read_frame().unwrap().unwrap(), want);
    writer.join().unwrap();
    assert_eq!(client.lookup(b"multi\nline key").unwrap().unwrap(), value);
}

#[test]
fn a_value_with_a_newline_is_an_error_reply_on_a_line_server_that_replayed_it() {
    // Stored through a size-prefixed framing, then served by a line server from the same
    // log: its lookup cannot be one line, so it gets an error reply and the stream stays
    // in sync; other values are served as usual.
    let aof = temp_file("newline.aof");
    let path = aof.to_str().unwrap();
    let server = start(&["--aof", path, "--fsync", "always", "--framing", "u32"]);
    let mut c = StoreClient::connect(server.addr, Framing::U32).unwrap();
    c.store(b"two", b"line one\nline two").unwrap();
    c.store(b"one", b"a single line").unwrap();
    assert_eq!(c.lookup(b"two").unwrap().unwrap(), b"line one\nline two");
    drop((c, server));

    let server = start(&["--aof", path]);
    let mut c = LineClient::connect(server.addr);
    assert_eq!(c.ask("lookup,two\n"), "{error,unencodable}");
    assert_eq!(c.ask("lookup,one\n"), "{just,a single line}");
    // Again, with room in the connection's reply buffer now (the general path's lookup
    // then answers at once): the same replies, and each lookup counted once.
    assert_eq!(c.ask("lookup,two\n"), "{error,unencodable}");
    assert_eq!(c.ask("lookup,one\n"), "{just,a single line}");
    let stats = c.ask("stats\n");
    assert!(
        stats.contains("{lookup,4}") && stats.contains("{error,2}"),
        "{stats}"
    );
    let mut out = Vec::new();
    assert!(encode_frame(Framing::Line, b"{just,a\nb}", &mut out).is_err());
    drop(server);
    remove_log(&aof);
}

#[test]
fn the_rust_client_works_against_the_python_reference_server() {
    for framing in [Framing::Line, Framing::U16] {
        let server = ChildServer::start_python(
            "store_server.py",
            &["--port", "0", "--framing", framing.name()],
        );
        let mut c = StoreClient::connect(server.addr, framing).unwrap();
        c.store(b"k", b"v,with,commas {}").unwrap();
        assert_eq!(c.lookup(b"k").unwrap().unwrap(), b"v,with,commas {}");
        assert_eq!(c.lookup(b"nope").unwrap(), None);
        assert!(c.delete(b"k").unwrap());
        assert!(!c.delete(b"k").unwrap());
        // Pipelined.
        for i in 0..100 {
            c.queue(&switchboard::store::protocol::Request::Store {
                key: format!("p{i}").as_bytes(),
                value: format!("{i}").as_bytes(),
            })
            .unwrap();
        }
        for i in 0..100 {
            c.queue(&switchboard::store::protocol::Request::Lookup {
                key: format!("p{i}").as_bytes(),
            })
            .unwrap();
        }
        for i in 0..100 {
            assert_eq!(c.recv().unwrap(), format!("{{just,{i}}}").as_bytes());
        }
        // The store-client binary too.
        let addr = server.addr.to_string();
        let mut cmd = std::process::Command::new(CLIENT);
        cmd.args([
            "--addr",
            &addr,
            "--framing",
            framing.name(),
            "store",
            "bin",
            "a b c",
        ]);
        run_checked(cmd);
        let mut cmd = std::process::Command::new(CLIENT);
        cmd.args([
            "--addr",
            &addr,
            "--framing",
            framing.name(),
            "lookup",
            "bin",
        ]);
        assert_eq!(run_checked(cmd).trim(), "{just,a b c}");
    }
}

#[test]
fn the_python_client_styles_work_against_the_rust_server() {
    let server = start(&["--framing", "u32"]);
    let p = port(&server);
    run_python(
        "store_client.py",
        &["--port", &p, "--framing", "u32", "store", "k", "v"],
    );
    let out = run_python(
        "store_client.py",
        &["--port", &p, "--framing", "u32", "lookup", "k"],
    );
    assert_eq!(out.trim(), "{just,v}");
    let line = start(&[]);
    let p = port(&line);
    run_python(
        "store_client.py",
        &["--port", &p, "store", "seed", "bytewise"],
    );
    let out = run_python(
        "store_client.py",
        &["--port", &p, "--bytewise", "lookup", "seed"],
    );
    assert_eq!(out.trim(), "{just,bytewise}");
}

#[test]
fn the_store_client_binary_reads_commands_from_a_prompt() {
    let server = start(&[]);
    let addr = server.addr.to_string();
    let mut child = std::process::Command::new(CLIENT)
        .args(["--addr", &addr])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"store k hello world\nlookup k\nlookup,k\ndelete k\nlookup k\nbogus\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let without_prompts = text.replace(&format!("{addr}> "), "");
    let replies: Vec<&str> = without_prompts.lines().collect();
    assert_eq!(
        replies,
        [
            "{just,hello world}",
            "{just,hello world}",
            "ok",
            "nothing",
            "{error,unknown_verb}"
        ],
        "{text}"
    );
}

#[test]
fn connections_over_the_limit_are_refused_with_an_error_reply() {
    let server = start(&["--max-connections", "1"]);
    let mut first = LineClient::connect(server.addr);
    assert_eq!(first.ask("lookup,x\n"), "nothing");
    let mut second = LineClient::connect(server.addr);
    assert_eq!(second.line().unwrap(), b"{error,too_many_connections}");
    second.expect_closed();
    assert!(first.ask("stats\n").contains("{refused_connections,1}"));
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let mut server = start(&[]);
    let mut c = LineClient::connect(server.addr);
    assert_eq!(c.ask("lookup,a\n"), "nothing");
    assert!(server.terminate(), "exit status 0 after SIGTERM");
    c.expect_closed();
    assert!(server.log_text().contains("stopped"));
}

#[test]
fn every_acknowledged_write_survives_kill_9_with_fsync_always() {
    let aof = temp_file("kill9.aof");
    let path = aof.to_str().unwrap();
    let mut server = start(&["--aof", path, "--fsync", "always"]);
    let mut c = LineClient::connect(server.addr);
    let mut batch = Vec::new();
    for i in 0..500 {
        batch.extend_from_slice(format!("store,k{i},value {i}\n").as_bytes());
    }
    batch.extend_from_slice(b"delete,k7\n");
    c.send(&batch);
    // The reply to the delete is the barrier: every write before it is on disk.
    assert_eq!(c.line().unwrap(), b"ok");
    assert_eq!(c.ask("lookup,k499\n"), "{just,value 499}");
    server.kill9();

    let server = start(&["--aof", path, "--fsync", "always"]);
    assert!(
        server.log_text().contains("501 records replayed"),
        "{}",
        server.log_text()
    );
    let mut c = LineClient::connect(server.addr);
    for i in [0, 1, 250, 499] {
        assert_eq!(
            c.ask(&format!("lookup,k{i}\n")),
            format!("{{just,value {i}}}")
        );
    }
    assert_eq!(c.ask("lookup,k7\n"), "nothing");
    drop(server);
    remove_log(&aof);
}

#[test]
fn a_torn_log_record_is_reported_and_the_server_still_starts() {
    let aof = temp_file("torn.aof");
    let path = aof.to_str().unwrap();
    let mut server = start(&["--aof", path, "--fsync", "always"]);
    let mut c = LineClient::connect(server.addr);
    assert_eq!(c.ask("store,a,1\nstore,b,2\nlookup,b\n"), "{just,2}");
    assert!(server.terminate());
    // A crash in the middle of the next record.
    let mut f = std::fs::OpenOptions::new().append(true).open(&aof).unwrap();
    f.write_all(b"S\x00\x00\x00\x01\x00\x00\x00\x05cval")
        .unwrap();
    drop(f);

    let server = start(&["--aof", path]);
    let log = server.log_text();
    assert!(
        log.contains("2 records replayed") && log.contains("torn"),
        "{log}"
    );
    let mut c = LineClient::connect(server.addr);
    assert_eq!(c.ask("lookup,a\n"), "{just,1}");
    assert_eq!(c.ask("lookup,c\n"), "nothing");
    drop(server);
    remove_log(&aof);
}

/// The count in a server's `N records replayed` log line.
fn records_replayed(log: &str) -> u64 {
    let at = log.find(" records replayed").expect("a replay line");
    let start = log[..at].rfind(' ').map_or(0, |i| i + 1);
    log[start..at].parse().unwrap()
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

#[test]
fn overwrites_are_compacted_and_the_latest_values_survive_kill_9() {
    let aof = temp_file("rewrite.aof");
    let path = aof.to_str().unwrap();
    let flags = [
        "--aof",
        path,
        "--fsync",
        "always",
        "--aof-rewrite-min",
        "4k",
    ];
    let mut server = start(&flags);
    let mut c = LineClient::connect(server.addr);
    // 500 records of 72 bytes over 5 keys: 36 KB written, 368 bytes live.
    let value = |round: u32| format!("value {round:03} of a key overwritten again and again");
    for round in 0..100 {
        let mut batch = String::new();
        for k in 0..5 {
            batch.push_str(&format!("store,key{k},{}\n", value(round)));
        }
        batch.push_str("lookup,key4\n");
        assert_eq!(c.ask(&batch), format!("{{just,{}}}", value(round)));
    }
    // Once a rewrite has run with no writes in flight the log is one record per key plus
    // the few written since. Each try writes one record, so the log grows to the 4k
    // threshold and is rewritten if it is not small already.
    common::eventually("the log to shrink to about one record per key", || {
        assert_eq!(c.ask("store,key0,latest\nlookup,key0\n"), "{just,latest}");
        file_len(&aof) < 1024
    });
    assert!(server.log_text().contains("rewritten: "));
    server.kill9();

    let server = start(&flags);
    let log = server.log_text();
    assert!(records_replayed(&log) < 40, "{log}");
    let mut c = LineClient::connect(server.addr);
    assert_eq!(c.ask("lookup,key0\n"), "{just,latest}");
    for k in 1..5 {
        assert_eq!(
            c.ask(&format!("lookup,key{k}\n")),
            format!("{{just,{}}}", value(99))
        );
    }
    drop(server);
    remove_log(&aof);
}

#[test]
fn writes_racing_log_rewrites_all_survive_kill_9() {
    let aof = temp_file("rewrite-race.aof");
    let path = aof.to_str().unwrap();
    let flags = ["--aof", path, "--aof-rewrite-min", "16k"];
    let mut server = start(&flags);
    let addr = server.addr;
    // 8 connections, each over 10 keys of its own: rounds of stores and deletes, each
    // round closed by a lookup that proves the round applied and logged. 150 rounds are
    // about 300 KB of records over 2 KB of live data, so rewrites run again and again while
    // writes go on; the writers go on past that until two rewrites have finished (a loaded
    // machine may take longer over them), within a cap.
    let enough = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let enough = Arc::clone(&enough);
            std::thread::spawn(move || {
                let mut c = LineClient::connect(addr);
                let mut want: HashMap<String, String> = HashMap::new();
                let expect = |want: &HashMap<String, String>, key: &str| match want.get(key) {
                    Some(v) => format!("{{just,{v}}}"),
                    None => "nothing".to_string(),
                };
                for round in 0..5_000 {
                    if round >= 150 && enough.load(Ordering::Relaxed) {
                        break;
                    }
                    let (mut batch, mut replies) = (String::new(), Vec::new());
                    for k in 0..10 {
                        let key = format!("w{t}k{k}");
                        if (round * 3 + k) % 7 == 0 {
                            batch.push_str(&format!("delete,{key}\n"));
                            let had = want.remove(&key).is_some();
                            replies.push(if had { "ok" } else { "nothing" }.to_string());
                        } else {
                            let v = format!("{t}.{round}.{k}");
                            batch.push_str(&format!("store,{key},{v}\n"));
                            want.insert(key, v);
                        }
                    }
                    let barrier = format!("w{t}k{}", round % 10);
                    batch.push_str(&format!("lookup,{barrier}\n"));
                    replies.push(expect(&want, &barrier));
                    c.send(batch.as_bytes());
                    for reply in replies {
                        assert_eq!(String::from_utf8(c.line().unwrap()).unwrap(), reply);
                    }
                }
                (0..10)
                    .map(|k| {
                        let key = format!("w{t}k{k}");
                        let reply = expect(&want, &key);
                        (key, reply)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.log_text().matches("rewritten: ").count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    enough.store(true, Ordering::Relaxed);
    let want: Vec<(String, String)> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let log = server.log_text();
    assert!(log.matches("rewritten: ").count() >= 2, "{log}");
    assert!(!log.contains("rewrite failed"), "{log}");
    server.kill9();

    let server = start(&flags);
    let mut c = LineClient::connect(server.addr);
    for (key, reply) in want {
        assert_eq!(c.ask(&format!("lookup,{key}\n")), reply, "{key}");
    }
    drop(server);
    let _ = std::fs::remove_file(format!("{path}.rewrite"));
    remove_log(&aof);
}

#[test]
fn a_rewrite_left_unfinished_is_deleted_at_start_and_the_log_replayed() {
    let aof = temp_file("leftover.aof");
    let path = aof.to_str().unwrap();
    let leftover = PathBuf::from(format!("{path}.rewrite"));
    let mut server = start(&["--aof", path]);
    let mut c = LineClient::connect(server.addr);
    assert_eq!(c.ask("store,a,1\nstore,a,2\nlookup,a\n"), "{just,2}");
    assert!(server.terminate());
    // A crash while a rewrite was writing its new file.
    std::fs::write(
        &leftover,
        b"SWBAOF1\nS\x00\x00\x00\x01\x00\x00\x00\x05avalu",
    )
    .unwrap();

    let server = start(&["--aof", path]);
    let log = server.log_text();
    assert!(
        log.contains("left by a rewrite that did not finish") && log.contains("2 records replayed"),
        "{log}"
    );
    assert!(!leftover.exists());
    let mut c = LineClient::connect(server.addr);
    assert_eq!(c.ask("lookup,a\n"), "{just,2}");
    drop(server);
    remove_log(&aof);
}

#[test]
fn an_unusable_aof_path_is_a_clear_startup_error() {
    let out = std::process::Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0", "--aof", "/proc/version"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("append-only file"), "{err}");
}

#[test]
fn help_and_bad_flags() {
    let out = std::process::Command::new(SERVER)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--fsync") && help.contains("--aof-rewrite-min"));
    let out = std::process::Command::new(SERVER)
        .args(["--aof-rewrite-min", "64q"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("64q"));
    let out = std::process::Command::new(SERVER)
        .args(["--framing", "packet9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("packet9"));
    let _ = python("store_client.py", &["--help"]).output().unwrap();
}

#[test]
fn running_out_of_file_descriptors_is_survived() {
    // 40 descriptors: the server starts with a handful open, so the rest run out first.
    let server = ChildServer::start(
        "prlimit",
        &[
            "--nofile=40",
            SERVER,
            "--listen",
            "127.0.0.1:0",
            "--max-connections",
            "1000",
        ],
    );
    assert!(
        server.log_text().contains("open-file limit is 40"),
        "{}",
        server.log_text()
    );
    let mut held: Vec<LineClient> = Vec::new();
    for i in 0..60 {
        let mut c = LineClient::connect(server.addr);
        c.send(format!("store,k{i},v\n").as_bytes());
        held.push(c);
    }
    common::eventually("accept to fail with EMFILE and be logged", || {
        server.log_text().contains("accept failed")
    });
    // Freeing descriptors lets the backlog drain: the connections that waited in it are
    // served once the server can accept them again.
    let mut waited = held.split_off(55);
    drop(held);
    for c in &mut waited {
        assert_eq!(c.ask("lookup,k0\n"), "{just,v}");
    }
    let mut fresh = LineClient::connect(server.addr);
    assert_eq!(fresh.ask("lookup,k59\n"), "{just,v}");
}

#[test]
fn the_floor_answers_what_the_store_would_and_the_bench_accepts_it() {
    const BENCH: &str = env!("CARGO_BIN_EXE_store-bench");
    // The floor calibrated with work of its own answers the same.
    for work in [
        &[][..],
        &[
            "--floor-spin",
            "50",
            "--floor-hash",
            "--floor-share",
            "--floor-code",
            "64",
        ],
    ] {
        let floor = ChildServer::start(
            BENCH,
            &[&["--floor", "127.0.0.1:0", "--keys", "20"], work].concat(),
        );
        let mut c = LineClient::connect(floor.addr);
        c.send(b"store,key:00000003,ignored\n");
        c.send(b"store\n,,\n\nstore,key:abcdefgh,v\n");
        let long = format!("lookup,key:{}\n", "9".repeat(40));
        assert_eq!(c.ask(&long), "{error,unknown}");
        assert_eq!(c.ask("lookup,key:abcdefgh\n"), "{error,unknown}");
        assert_eq!(
            c.ask("lookup,key:00000003\n"),
            "{just,3-vvvvvvvvvvvvvvvvvvvvvvvvvvvvvv}"
        );
        assert_eq!(c.ask("lookup,key:00000020\n"), "{error,unknown}");
    }
    for (args, why) in [
        (&["--floor-spin", "5"][..], "need --floor"),
        (
            &["--floor", "127.0.0.1:0", "--floor-code", "65"],
            "more than the 64 functions",
        ),
    ] {
        let refused = std::process::Command::new(BENCH).args(args).output();
        let refused = refused.unwrap();
        assert!(!refused.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
    let floor = ChildServer::start(BENCH, &["--floor", "127.0.0.1:0", "--keys", "20"]);
    let addr = floor.addr.to_string();
    let args = [
        "--addr",
        &addr,
        "--keys",
        "20",
        "--conns",
        "2",
        "--pipeline",
        "4",
    ];
    let mut cmd = std::process::Command::new(BENCH);
    cmd.args(args).args(["--duration", "0.3", "--warmup", "0"]);
    let out = run_checked(cmd);
    assert!(out.contains("RESULT "), "{out}");
}

#[test]
fn store_bench_compares_servers_in_turn_and_reports_each_against_the_first() {
    const BENCH: &str = env!("CARGO_BIN_EXE_store-bench");
    let floor = ChildServer::start(BENCH, &["--floor", "127.0.0.1:0", "--keys", "20"]);
    let store = start(&[]);
    let addrs = format!("{},{}", floor.addr, store.addr);
    let pids = format!("{},{}", floor.child.id(), store.child.id());
    let compare = |pids: &str| {
        let mut cmd = std::process::Command::new(BENCH);
        cmd.args([
            "--addr",
            &addrs,
            "--compare",
            pids,
            "--keys",
            "20",
            "--conns",
            "2",
        ])
        .args(["--slice", "0.1", "--rounds", "3"]);
        cmd
    };
    let out = run_checked(compare(&pids));
    let rounds: Vec<&str> = out.lines().filter(|l| l.starts_with("ROUND ")).collect();
    assert_eq!(rounds.len(), 6, "{out}");
    for (i, line) in rounds.iter().enumerate() {
        assert!(
            line.starts_with(&format!("ROUND round={} target={} ops=", i / 2 + 1, i % 2)),
            "{out}"
        );
        // Every slice served lookups (checked replies) and the server spent CPU on them.
        let ops: u64 = line
            .split("ops=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(ops > 0 && !line.ends_with("cpu_us_per_op=-"), "{out}");
    }
    assert!(
        out.contains("COMPARE target=0 ") && out.contains(" vs_first=1.000 "),
        "{out}"
    );
    assert!(out.contains("COMPARE target=1 "), "{out}");
    // One process id per address, or nothing is run.
    let out = compare(&floor.child.id().to_string()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("one process id per --addr address"));
}

#[test]
fn store_bench_reports_server_cpu_only_for_a_given_server_pid() {
    const BENCH: &str = env!("CARGO_BIN_EXE_store-bench");
    let server = start(&[]);
    let addr = server.addr.to_string();
    let field = |line: &str, name: &str| -> String {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .to_string()
    };
    let pid = server.child.id().to_string();
    let common = [
        "--addr",
        &addr,
        "--conns",
        "2",
        "--duration",
        "0.3",
        "--warmup",
        "0",
    ];
    for with_pid in [false, true] {
        let mut cmd = std::process::Command::new(BENCH);
        cmd.args(common);
        if with_pid {
            cmd.args(["--server-pid", &pid]);
        }
        let out = run_checked(cmd);
        let line = out
            .lines()
            .find(|l| l.starts_with("RESULT "))
            .unwrap_or_else(|| panic!("no RESULT line in {out}"));
        assert!(
            field(line, "ops_per_sec").parse::<u64>().unwrap() > 0,
            "{line}"
        );
        assert_eq!(field(line, "conns"), "2");
        let server_cpu = field(line, "server_cpu_us_per_op");
        let server_user = field(line, "server_user_us_per_op");
        if with_pid {
            let (cpu, user) = (server_cpu.parse::<f64>(), server_user.parse::<f64>());
            assert!(
                matches!((cpu, user), (Ok(c), Ok(u)) if u <= c + 0.002),
                "the user part of the server's CPU is at most all of it (to the printed 0.001): {line}"
            );
        } else {
            assert_eq!(server_cpu, "-", "without --server-pid: {line}");
            assert_eq!(server_user, "-", "without --server-pid: {line}");
        }
        assert!(
            field(line, "bench_cpu_us_per_op").parse::<f64>().is_ok(),
            "{line}"
        );
    }
    let mut idle = std::process::Command::new(BENCH);
    idle.args(["--addr", &addr, "--idle", "20", "--server-pid", &pid]);
    let out = run_checked(idle);
    assert!(out.contains("20 idle connections: server RSS "), "{out}");
    assert!(
        out.contains(" MiB held; new client connect+lookup median "),
        "{out}"
    );
}

/// Runs `store-client --addr ADDR ARGS...` with `input` on stdin.
fn client(addr: &str, args: &[&str], input: &[u8]) -> Finished {
    let mut cmd = std::process::Command::new(CLIENT);
    cmd.args(["--addr", addr]).args(args);
    run_with_input(cmd, input)
}

#[test]
fn the_store_client_names_the_framing_when_no_reply_comes() {
    let server = start(&[]);
    let addr = server.addr.to_string();
    let run = client(
        &addr,
        &["--framing", "ascii10", "--timeout", "0.5", "lookup", "k"],
        b"",
    );
    assert!(!run.status.success());
    assert_eq!(
        run.stderr.trim(),
        format!("store-client: no reply within 0.5 s from {addr}; is the server using --framing ascii10?")
    );
    assert!(
        run.took < std::time::Duration::from_secs(2),
        "{:?}",
        run.took
    );
    let run = client(&addr, &["--timeout", "0", "stats"], b"");
    assert!(!run.status.success());
    assert!(
        run.stderr.contains("--timeout") && run.stderr.contains("more than 0"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_store_client_takes_arguments_as_given_and_refuses_mistakes_locally() {
    let server = start(&[]);
    let addr = server.addr.to_string();
    let run = client(&addr, &["store", "a b", "v"], b"");
    assert!(run.status.success(), "{}", run.stderr);
    let run = client(&addr, &["lookup", "a b"], b"");
    assert_eq!(run.stdout.trim(), "{just,v}");
    // The server never saw key `a` (the old client sent `store,a,b v`).
    let run = client(&addr, &["lookup", "a"], b"");
    assert_eq!(run.stdout.trim(), "nothing");
    let run = client(&addr, &["store", "a,b", "v"], b"");
    assert!(!run.status.success());
    assert!(
        run.stderr
            .starts_with("store-client: the key \"a,b\" contains a comma"),
        "{}",
        run.stderr
    );
    let run = client(&addr, &["store", "k"], b"");
    assert!(!run.status.success());
    assert_eq!(run.stderr.trim(), "store-client: usage: store KEY VALUE");
    // `help` is answered without a server.
    let run = client("127.0.0.1:1", &["help"], b"");
    assert!(run.status.success() && run.stdout.contains("lookup KEY"));
    // An `{error,...}` reply is printed, and the exit status says so.
    let run = client(&addr, &["bogus"], b"");
    assert_eq!(run.stdout.trim(), "{error,unknown_verb}");
    assert_eq!(run.status.code(), Some(1));
}

#[test]
fn the_store_client_prompt_understands_quotes_and_help() {
    let server = start(&[]);
    let addr = server.addr.to_string();
    let run = client(
        &addr,
        &[],
        b"store \"quoted key\" x y\nlookup 'quoted key'\nlookup \"quoted\nstore\nstore a,b v\nhelp\nstats\n",
    );
    assert!(run.status.success(), "{}", run.stderr);
    let text = run.stdout.replace(&format!("{addr}> "), "");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "{just,x y}", "{text}");
    assert_eq!(lines[1], "a quote is not closed", "{text}");
    assert_eq!(lines[2], "usage: store KEY VALUE", "{text}");
    assert!(lines[3].contains("comma"), "{text}");
    assert_eq!(lines[4], "commands:", "{text}");
    // `help` never reached the server: its error counter is still 0.
    let stats = lines.last().unwrap();
    assert!(stats.contains("{error,0}"), "{stats}");
}

/// A raw `store,` line the server answers (`store,k`: `{error,missing_value}`) is waited
/// for: taken for silent, its answer used to be printed for the next command, and every
/// answer after it was one off.
#[test]
fn the_store_client_prompt_waits_for_the_answer_to_a_raw_store_that_is_refused() {
    let server = start(&[]);
    let addr = server.addr.to_string();
    let run = client(&addr, &[], b"store,k\nstore,k,v\nlookup k\nlookup nokey\n");
    let text = run.stdout.replace(&format!("{addr}> "), "");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        ["{error,missing_value}", "{just,v}", "nothing"],
        "{text}"
    );
}

/// The library client refuses, unsent, a request the server would read as another: a
/// stored key with a comma (`store,a,b,v` sets `a` to `b,v`), or an empty key.
#[test]
fn the_client_library_refuses_a_key_the_wire_cannot_carry() {
    use switchboard::store::client::ClientError;
    let server = start(&[]);
    let mut c = StoreClient::connect(server.addr, Framing::Line).unwrap();
    assert!(matches!(
        c.store(b"a,b", b"v"),
        Err(ClientError::Unsendable(_))
    ));
    // A lookup's key runs to the end of the line: `lookup,a,b` asks for `a,b`, unambiguous.
    assert_eq!(c.lookup(b"a,b").unwrap(), None);
    assert!(matches!(c.delete(b""), Err(ClientError::Unsendable(_))));
    // On line framing a final `\r` would be dropped by the server's reader.
    assert!(matches!(
        c.store(b"k", b"v\r"),
        Err(ClientError::Unsendable(_))
    ));
    // Nothing went: the connection is in step, and `a` was never set.
    c.store(b"k", b"v,w").unwrap();
    assert_eq!(c.lookup(b"k").unwrap().as_deref(), Some(&b"v,w"[..]));
    assert_eq!(c.lookup(b"a").unwrap(), None);
}

#[test]
fn idle_timeout_takes_fractions_on_every_server_that_has_it() {
    for server in [
        SERVER,
        env!("CARGO_BIN_EXE_echo-server"),
        env!("CARGO_BIN_EXE_chat-server"),
    ] {
        let s = ChildServer::start(
            server,
            &["--listen", "127.0.0.1:0", "--idle-timeout", "0.3"],
        );
        let mut idle = connect(s.addr);
        let started = std::time::Instant::now();
        // Whatever it says on the way out, the connection ends (end of stream or a reset).
        let _ = idle.read_to_end(&mut Vec::new());
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(2),
            "{server}: {took:?}"
        );
    }
}

/// Two servers appending to one log would interleave their records: the second is refused,
/// naming the first, and so is a repair while a server runs; once the first is killed, the
/// kernel has let go of its lock and a new server starts on the log.
#[test]
fn a_second_server_on_a_log_in_use_is_refused_and_the_first_goes_on() {
    let aof = temp_file("locked.aof");
    let path = aof.to_str().unwrap();
    let mut first = start(&["--aof", path]);
    let mut c = LineClient::connect(first.addr);
    assert_eq!(c.ask("store,k,1\nlookup,k\n"), "{just,1}");
    let pid = first.child.id();
    for extra in [&["--listen", "127.0.0.1:0"][..], &["--aof-repair"]] {
        let out = std::process::Command::new(SERVER)
            .args(["--aof", path])
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?}: {err}");
        assert!(
            err.contains(&format!("in use by process {pid}")),
            "{extra:?}: {err}"
        );
    }
    assert_eq!(c.ask("store,k,2\nlookup,k\n"), "{just,2}");
    first.kill9();
    let second = start(&["--aof", path]);
    let mut c = LineClient::connect(second.addr);
    assert_eq!(c.ask("lookup,k\n"), "{just,2}");
    drop(second);
    remove_log(&aof);
}

/// A flood of connections at the cap costs the log a line a second, not a line each
/// (written on the accepting thread): each refusal is still counted, and the next line
/// says how many went unlogged.
#[test]
fn refusals_at_the_connection_cap_are_logged_at_most_once_a_second() {
    let server = start(&["--max-connections", "1"]);
    let _held = LineClient::connect(server.addr);
    let refused = |n: usize| {
        for _ in 0..n {
            let mut c = LineClient::connect(server.addr);
            assert_eq!(c.line().unwrap(), b"{error,too_many_connections}");
        }
    };
    refused(50);
    let lines = |log: &str| log.matches("refused connection from").count();
    // A line a second at most: a few, however slow the machine, not 50.
    assert!(lines(&server.log_text()) < 10, "{}", server.log_text());
    std::thread::sleep(Duration::from_millis(1100));
    refused(1);
    common::eventually("the next refusal's line", || {
        server.log_text().contains("not logged since the last line")
    });
}

/// `--idle-timeout` bounds a write blocked on a client that never reads, not only a read:
/// such a client was kept for good, its thread and its replies with it.
#[test]
fn the_idle_timeout_closes_a_client_that_never_reads_its_replies() {
    let server = start(&["--idle-timeout", "1"]);
    let mut setter = LineClient::connect(server.addr);
    let value = "v".repeat(64 << 10);
    assert_eq!(
        setter.ask(&format!("store,k,{value}\nlookup,k\n")),
        format!("{{just,{value}}}")
    );
    drop(setter);
    // One connection asks throughout (busy, so never idle itself).
    let mut asker = StoreClient::connect(server.addr, Framing::Line).unwrap();
    let mut live = || {
        let stats = asker.stats().unwrap();
        let at = stats.find("{live_connections,").unwrap() + "{live_connections,".len();
        stats[at..]
            .split('}')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    common::eventually("the setter to be gone", || live() == 1);
    let mut hog = connect(server.addr);
    hog.write_all("lookup,k\n".repeat(300).as_bytes()).unwrap();
    common::eventually("the hog to be served", || live() == 2);
    common::eventually("the hog to be closed", || live() == 1);
    drop(hog);
}
