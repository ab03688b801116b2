//! The echo binaries against the course's Python programs, in every framing, mode and
//! transform; a client that never reads; shutdown of the pipeline.

mod common;

use common::{connect, python, run_python, run_with_input, ChildServer};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use switchboard::framing::{encode_frame, FrameReader, Framing};

const ECHO_SERVER: &str = env!("CARGO_BIN_EXE_echo-server");
const ECHO_CLIENT: &str = env!("CARGO_BIN_EXE_echo-client");

fn start_echo(framing: Framing, mode: &str, transform: &str, extra: &[&str]) -> ChildServer {
    let framing = framing.name();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--framing",
        framing,
        "--mode",
        mode,
    ];
    args.extend(["--transform", transform]);
    args.extend(extra);
    ChildServer::start(ECHO_SERVER, &args)
}

/// `interop/echo_client.py` in checking mode against `server`: exits 0 only if every echo
/// matched.
fn python_client(server: &ChildServer, framing: Framing, transform: &str, messages: &[&str]) {
    let port = server.addr.port().to_string();
    let mut args = vec!["--port", &port, "--framing", framing.name(), "--count", "3"];
    args.push(if transform == "upper" {
        "--expect-upper"
    } else {
        "--check"
    });
    if framing != Framing::Line {
        // Newlines, NUL, 0xff, the empty payload, 64-70 KiB payloads.
        args.push("--binary");
    }
    args.extend(messages);
    let out = run_python("echo_client.py", &args);
    assert!(out.contains(" 0 failed"), "{out}");
}

fn python_client_in_every_framing_and_transform(mode: &str) {
    for framing in Framing::ALL {
        for transform in ["none", "upper"] {
            let server = start_echo(framing, mode, transform, &[]);
            let messages = ["hello", "Straße ǆ", "mixed Case 123", "\u{1f600} emoji"];
            python_client(&server, framing, transform, &messages);
        }
    }
}

#[test]
fn python_client_against_threaded_mode_in_every_framing_and_transform() {
    python_client_in_every_framing_and_transform("threaded");
}

#[test]
fn python_client_against_pipeline_mode_in_every_framing_and_transform() {
    python_client_in_every_framing_and_transform("pipeline");
}

#[test]
fn the_python_client_prints_replies_unless_asked_to_check_them() {
    let server = start_echo(Framing::Ascii10, "threaded", "upper", &[]);
    let addr = server.addr.to_string();
    let out = run_python("echo_client.py", &["--addr", &addr, "hello", "straße"]);
    assert_eq!(out, "Received > HELLO\nReceived > STRASSE\n");
    let checked = python("echo_client.py", &["--addr", &addr, "--check", "hello"])
        .output()
        .unwrap();
    assert_eq!(checked.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&checked.stdout).contains("0 passed, 1 failed"));
}

#[test]
fn concurrent_python_clients_in_both_modes() {
    for mode in ["threaded", "pipeline"] {
        let server = start_echo(Framing::Ascii10, mode, "upper", &["--workers", "3"]);
        let port = server.addr.port().to_string();
        let clients: Vec<_> = (0..8)
            .map(|i| {
                let tag = format!("client {i} says hi");
                let args = ["--port", &port, "--expect-upper", "--count", "40", &tag];
                let mut cmd = python("echo_client.py", &args);
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                cmd.spawn()
                    .expect("python3 is required for the interop tests")
            })
            .collect();
        for client in clients {
            let out = client.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains("40 passed, 0 failed"),
                "{mode}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Runs the Rust `echo-client` with `input` on its stdin; returns its stdout.
fn rust_client(addr: std::net::SocketAddr, framing: Framing, input: &str) -> String {
    let mut child = Command::new(ECHO_CLIENT)
        .args(["--addr", &addr.to_string(), "--framing", framing.name()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "echo-client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn rust_client_against_the_python_pipeline_server() {
    for framing in Framing::ALL {
        let server = ChildServer::start_python(
            "echo_server.py",
            &[
                "--port",
                "0",
                "--framing",
                framing.name(),
                "--transform",
                "upper",
            ],
        );
        // An empty line ends the client: "never sent" must not be sent.
        let out = rust_client(server.addr, framing, "hello\r\nstraße ǆ\n\nnever sent\n");
        assert_eq!(out, "Received > HELLO\nReceived > STRASSE Ǆ\n", "{framing}");
        // End of input ends it too.
        let out = rust_client(server.addr, framing, "last");
        assert_eq!(out, "Received > LAST\n", "{framing}");
    }
}

#[test]
fn rust_client_with_the_wrong_framing_names_it_instead_of_an_os_error() {
    let server = start_echo(Framing::Line, "threaded", "none", &[]);
    let addr = server.addr.to_string();
    let mut cmd = Command::new(ECHO_CLIENT);
    cmd.args(["--addr", &addr, "--framing", "ascii10", "--timeout", "1"]);
    let run = run_with_input(cmd, b"hello\n");
    assert!(!run.status.success());
    assert_eq!(
        run.stderr.trim(),
        format!(
            "echo-client: no reply within 1 s from {addr}; is the server using --framing ascii10?"
        )
    );
    assert!(
        run.took < std::time::Duration::from_secs(3),
        "{:?}",
        run.took
    );
}

#[test]
fn rust_client_against_the_rust_server_with_the_seed_defaults() {
    let server = start_echo(Framing::Ascii10, "pipeline", "none", &[]);
    assert_eq!(
        rust_client(server.addr, Framing::Ascii10, "Hi there\n"),
        "Received > Hi there\n"
    );
}

#[test]
fn exact_bytes_in_ascii10_including_a_batch_in_one_write() {
    for mode in ["threaded", "pipeline"] {
        let server = start_echo(Framing::Ascii10, mode, "upper", &[]);
        let mut s = connect(server.addr);
        // Three frames in one write, the last split across two writes.
        s.write_all(b"         2hi         0         7stra\xc3")
            .unwrap();
        s.write_all(b"\x9fe").unwrap();
        let mut got = vec![0u8; 10 + 2 + 10 + 10 + 7];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, b"         2HI         0         7STRASSE", "{mode}");
    }
}

#[test]
fn refusals_are_framed_like_the_echo() {
    let server = start_echo(
        Framing::U16,
        "threaded",
        "none",
        &["--max-connections", "1"],
    );
    let mut first = connect(server.addr);
    let mut reader = FrameReader::new(connect(server.addr), Framing::U16);
    assert_eq!(
        reader.read_frame().unwrap(),
        Some(&b"{error,too_many_connections}"[..])
    );
    first.write_all(b"\x00\x02ok").unwrap();
    let mut got = [0u8; 4];
    first.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"\x00\x02ok");
}

#[test]
fn a_client_that_never_reads_is_dropped_and_others_keep_their_round_trips() {
    let server = start_echo(Framing::U32, "pipeline", "none", &["--workers", "2"]);
    let addr = server.addr;
    let mut prober = connect(addr);
    let mut probe_replies = FrameReader::new(prober.try_clone().unwrap(), Framing::U32);
    let mut round_trip = |i: usize| {
        let msg = format!("probe {i}");
        let mut wire = Vec::new();
        encode_frame(Framing::U32, msg.as_bytes(), &mut wire).unwrap();
        prober.write_all(&wire).unwrap();
        let reply = probe_replies.read_frame().unwrap().expect("an echo");
        assert_eq!(reply, msg.as_bytes());
    };
    round_trip(0);

    let dropped = || server.log_text().contains("the client is not reading");
    let mut flood = connect(addr);
    let flood_control = flood.try_clone().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let flooder = {
        let sent = Arc::clone(&sent);
        thread::spawn(move || {
            let mut frame = Vec::new();
            encode_frame(Framing::U32, &[b'f'; 4096], &mut frame).unwrap();
            // Never reads: its replies pile up until the server gives up on it.
            while flood.write_all(&frame).is_ok() {
                sent.fetch_add(1, Ordering::SeqCst);
            }
            // What it finally reads ends in end of stream (or a reset), not a timeout.
            std::io::copy(&mut flood, &mut std::io::sink())
        })
    };
    common::eventually("the flood to start", || sent.load(Ordering::SeqCst) > 0);
    let mut during = 0;
    loop {
        round_trip(1 + during);
        during += 1;
        if dropped() {
            break;
        }
    }
    // The server has let go; stop a write the flooder's kernel may still be holding.
    let _ = flood_control.shutdown(std::net::Shutdown::Write);
    match flooder.join().unwrap() {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    round_trip(1 + during);
    eprintln!(
        "{during} probe round trips while the flooder sent {} frames",
        sent.load(Ordering::SeqCst)
    );
}

#[test]
fn sigterm_stops_the_server_then_joins_every_pipeline_stage() {
    let extra = ["--workers", "3", "--senders", "2"];
    let mut server = start_echo(Framing::Line, "pipeline", "upper", &extra);
    let mut client = common::LineClient::connect(server.addr);
    assert_eq!(client.ask("one\n"), "ONE");
    assert!(server.terminate(), "echo-server should exit 0 on SIGTERM");
    client.expect_closed();
    let log = server.log_text();
    assert!(log.contains("1 threads joined, 0 abandoned"), "{log}");
    assert!(
        log.contains("pipeline stopped (5 stage threads joined)"),
        "{log}"
    );
}
