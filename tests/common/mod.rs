//! Helpers shared by the integration tests: sockets with timeouts, and servers (in-process
//! or as child processes) that are stopped when the test drops them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use switchboard::framing::{FrameReader, FrameWriter, Framing};
use switchboard::server::{Connection, HandlerError, RunningServer, Server, ServerConfig};

/// Every socket a test opens times out: a hung server fails the test instead of hanging CI.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects with read and write timeouts set, retrying until `IO_TIMEOUT` passes.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
            Ok(s) => {
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                return s;
            }
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect {addr}: {e}"),
        }
    }
}

/// A line-oriented client over one connection.
pub struct LineClient {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl LineClient {
    pub fn connect(addr: SocketAddr) -> Self {
        let s = connect(addr);
        LineClient {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Reads one line, without its `\n`; `None` at end of stream.
    pub fn line(&mut self) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        let n = self
            .reader
            .read_until(b'\n', &mut buf)
            .expect("read a reply line");
        if n == 0 {
            return None;
        }
        assert_eq!(
            buf.pop(),
            Some(b'\n'),
            "reply line cut off: {:?}",
            String::from_utf8_lossy(&buf)
        );
        Some(buf)
    }

    /// Sends `request` and reads one reply line as a string.
    pub fn ask(&mut self, request: &str) -> String {
        self.send(request.as_bytes());
        String::from_utf8(self.line().expect("a reply")).unwrap()
    }

    /// Asserts the server closes the connection (end of stream, or a reset).
    pub fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "unexpected bytes before close: {rest:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
}

/// Connects to `addr`, writes `prefix`, then one more byte every `every`, `steps` times,
/// and says whether the server cut the connection (closed or reset it) before the end: a
/// slowloris hello, each read of which is quick.
pub fn trickled_until_cut(addr: SocketAddr, prefix: &[u8], steps: usize, every: Duration) -> bool {
    let mut stream = connect(addr);
    if stream.write_all(prefix).is_err() {
        return true;
    }
    stream.set_nonblocking(true).unwrap();
    for _ in 0..steps {
        if stream.write_all(b"x").is_err() {
            return true;
        }
        std::thread::sleep(every);
        match stream.read(&mut [0u8; 64]) {
            Ok(0) => return true,
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return true,
            _ => {}
        }
    }
    false
}

/// Polls `cond` until it holds or `IO_TIMEOUT` passes.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Resident set size of this process, from /proc.
pub fn rss_kib() -> u64 {
    switchboard::bench::own_rss_kib().expect("VmRSS in /proc/self/status")
}

/// A server (or any program that logs `listening on ADDR` to stderr) run as a child
/// process; killed when dropped, so no test leaves a process behind.
pub struct ChildServer {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    /// Everything the child wrote to stderr so far (drained by a thread, so it never blocks).
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    /// Set by the draining thread when stderr reaches its end.
    drained: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ChildServer {
    /// Starts `program args...` and waits for its `listening on ADDR` line.
    pub fn start(program: &str, args: &[&str]) -> ChildServer {
        let mut cmd = std::process::Command::new(program);
        cmd.args(args);
        ChildServer::start_command(cmd)
    }

    /// Starts `python3 interop/SCRIPT args...` (cwd: the repository root).
    pub fn start_python(script: &str, args: &[&str]) -> ChildServer {
        ChildServer::start_command(python(script, args))
    }

    pub fn start_command(mut cmd: std::process::Command) -> ChildServer {
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let drained = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = drained.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[child] {line}");
                // In the log before the start is reported: a test that reads the log once
                // `start` returns finds the `listening on` line in it.
                {
                    let mut log = sink.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
                if let Some(at) = line.find("listening on ") {
                    let addr = line[at + 13..].split_whitespace().next().unwrap_or("");
                    if let (Some(tx), Ok(addr)) = (tx.as_ref(), addr.parse::<SocketAddr>()) {
                        let _ = tx.send(addr);
                    }
                    tx = None;
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        match rx.recv_timeout(IO_TIMEOUT) {
            Ok(addr) => ChildServer {
                child,
                addr,
                log,
                drained,
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{cmd:?} did not report `listening on ADDR` within {IO_TIMEOUT:?}");
            }
        }
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        self.wait_exit()
    }

    /// Kills the process with SIGKILL (`kill -9`), as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (up to `IO_TIMEOUT`) for the process to exit and for its last stderr lines to
    /// reach `log`; true for exit status 0.
    pub fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let drained = &self.drained;
                eventually("the child's stderr to be drained", || {
                    drained.load(std::sync::atomic::Ordering::SeqCst)
                });
                return status.success();
            }
            assert!(Instant::now() < deadline, "child did not exit in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `python3 interop/SCRIPT args...` with the repository root as working directory.
pub fn python(script: &str, args: &[&str]) -> std::process::Command {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(format!("{root}/interop/{script}"))
        .args(args)
        .current_dir(root);
    cmd
}

/// Runs `python3 interop/SCRIPT args...` to completion and fails the test, showing its
/// output, unless it exits 0. Python missing is a failure, never a skip.
pub fn run_python(script: &str, args: &[&str]) -> String {
    run_checked(python(script, args))
}

/// Runs a command to completion (stdin closed, output captured), killing it and failing the
/// test if it has not exited within `IO_TIMEOUT` (a server that should have refused to start
/// and did not).
pub fn output_within(mut cmd: std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(IO_TIMEOUT) {
        Ok(out) => out.unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}")),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status();
            panic!("{cmd:?} did not exit within {IO_TIMEOUT:?}");
        }
    }
}

/// Runs a command to completion (stdin closed) and fails the test unless it exits 0.
pub fn run_checked(mut cmd: std::process::Command) -> String {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e} (python3 is required for interop tests)"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    stdout
}

/// Echoes lines; `panic` panics and `fail` returns an error, to test that a handler's
/// failure ends its own connection only.
pub fn echo(conn: Connection) -> Result<(), HandlerError> {
    let mut reader = FrameReader::new(&*conn.stream, Framing::Line);
    let mut writer = FrameWriter::new(&*conn.stream, Framing::Line);
    while let Some(line) = reader.read_frame()? {
        match line {
            b"panic" => panic!("asked to panic"),
            b"fail" => return Err("asked to fail".into()),
            _ => writer.write_frame(line)?,
        }
    }
    Ok(())
}

/// Routes the log lines of servers running in this test process through the test
/// harness's capture: shown for a failing test only, not between the results.
pub fn quiet_logs() {
    switchboard::log::capture_in_tests();
}

/// An in-process [`echo`] server on a free port.
pub fn start_echo(config: ServerConfig) -> RunningServer {
    quiet_logs();
    Server::bind("127.0.0.1:0", config, echo)
        .unwrap()
        .spawn()
        .unwrap()
}

/// What a finished program printed, and how long it took.
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

/// Runs `cmd` with `input` on its stdin (then closed), killing it if it runs past
/// `IO_TIMEOUT`: a client that hangs fails the test instead of hanging it.
pub fn run_with_input(mut cmd: std::process::Command, input: &[u8]) -> Finished {
    use std::process::Stdio;
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // A writer thread: a child that never reads must not block the test on a full pipe.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > IO_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not exit within {IO_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    let _ = writer.join();
    Finished {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        took,
    }
}
