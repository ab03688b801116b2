//! The echo service of seed 004: every frame comes back, optionally upper-cased, either
//! straight from the connection's own thread (`threaded`) or through the reader →
//! transform → sender [`pipeline`](crate::pipeline) (`pipeline`). Also the client loop of
//! `echo-client` ([`client`]) and the closed-loop benchmark of `echo-bench`
//! ([`bench`](mod@bench)).

pub mod bench;
pub mod client;

pub use bench::{bench, BenchConfig, BenchReport};
pub use client::run_client;

use crate::framing::{FrameError, Framing, Limits};
use crate::log_info;
use crate::pipeline::{Pipeline, PipelineConfig, PipelineServer, Reply, DEFAULT_WRITE_TIMEOUT};
use crate::request::Replies;
use crate::server::{Connection, HandlerError, ServeReport, Server, ServerConfig, ServerHandle};
use std::borrow::Cow;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

/// The seed's port.
pub const DEFAULT_PORT: u16 = 12345;
/// The seed's address, `127.0.0.1:12345`.
pub const DEFAULT_ADDR: &str = "127.0.0.1:12345";

/// Where a reply is computed (`--mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// On the connection's own thread: read frames, transform, write replies (seed Part 3).
    #[default]
    Threaded,
    /// Reader threads → transform workers → senders that write every reply (seed Part 4).
    Pipeline,
}

/// What happens to a payload on its way back (`--transform`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transform {
    /// Echoed unchanged.
    #[default]
    None,
    /// The seed's case converter: see [`upper`].
    Upper,
}

/// A command-line word that names no mode or transform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownWord {
    /// What was being parsed (`mode`, `transform`).
    pub what: &'static str,
    /// The word given.
    pub word: String,
    /// The words accepted.
    pub expected: &'static str,
}

impl fmt::Display for UnknownWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown {} {:?} (expected {})",
            self.what, self.word, self.expected
        )
    }
}

impl std::error::Error for UnknownWord {}

impl FromStr for Mode {
    type Err = UnknownWord;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "threaded" => Ok(Mode::Threaded),
            "pipeline" => Ok(Mode::Pipeline),
            _ => Err(UnknownWord {
                what: "mode",
                word: s.to_owned(),
                expected: "threaded or pipeline",
            }),
        }
    }
}

impl FromStr for Transform {
    type Err = UnknownWord;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Transform::None),
            "upper" => Ok(Transform::Upper),
            _ => Err(UnknownWord {
                what: "transform",
                word: s.to_owned(),
                expected: "none or upper",
            }),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Threaded => "threaded",
            Mode::Pipeline => "pipeline",
        })
    }
}

impl fmt::Display for Transform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transform::None => "none",
            Transform::Upper => "upper",
        })
    }
}

/// The Unicode upper case of a UTF-8 payload (`straße` → `STRASSE`, as Python's
/// `str.upper`); a payload that is not valid UTF-8 comes back unchanged.
pub fn upper(payload: &[u8]) -> Cow<'_, [u8]> {
    match std::str::from_utf8(payload) {
        Ok(text) => Cow::Owned(text.to_uppercase().into_bytes()),
        Err(_) => Cow::Borrowed(payload),
    }
}

impl Transform {
    /// The reply to `payload`.
    pub fn apply(self, payload: &[u8]) -> Cow<'_, [u8]> {
        match self {
            Transform::None => Cow::Borrowed(payload),
            Transform::Upper => upper(payload),
        }
    }

    /// The reply to an owned `payload`, reusing it when it comes back unchanged.
    pub fn apply_owned(self, payload: Vec<u8>) -> Vec<u8> {
        match self {
            Transform::None => payload,
            // ASCII (most messages) in place: a large frame is not copied again.
            Transform::Upper if payload.is_ascii() => {
                let mut payload = payload;
                payload.make_ascii_uppercase();
                payload
            }
            Transform::Upper => match String::from_utf8(payload) {
                Ok(text) => text.to_uppercase().into_bytes(),
                Err(not_utf8) => not_utf8.into_bytes(),
            },
        }
    }
}

/// How the echo service behaves.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// The wire framing (`ascii10` is the seed's `message.py`).
    pub framing: Framing,
    /// Threaded or pipeline.
    pub mode: Mode,
    /// What replies are made of.
    pub transform: Transform,
    /// Transform workers in pipeline mode.
    pub workers: usize,
    /// Sender threads in pipeline mode.
    pub senders: usize,
    /// Frame limits; a frame over the limit closes its connection (echo has no error reply).
    pub limits: Limits,
    /// In pipeline mode, how long a sender waits for a client to take its replies before
    /// dropping it as not reading (see [`PipelineConfig::write_timeout`]).
    pub write_timeout: Duration,
}

impl Default for EchoConfig {
    /// The seed's server: `ascii10`, threaded, no transform; if pipelined, 2 workers, 2
    /// senders and the pipeline's default write timeout.
    fn default() -> Self {
        EchoConfig {
            framing: Framing::Ascii10,
            mode: Mode::Threaded,
            transform: Transform::None,
            workers: 2,
            senders: 2,
            limits: Limits::default(),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

/// What an echo server reports when it has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoReport {
    /// The server's own report.
    pub server: ServeReport,
    /// Pipeline stage threads joined (pipeline mode only).
    pub pipeline_joined: Option<usize>,
}

/// A bound echo server, threaded or feeding its pipeline.
pub struct EchoServer {
    name: String,
    /// `pipeline mode (2 workers, 2 senders), ascii10 framing, transform upper`, for the log.
    summary: String,
    server: Served,
}

enum Served {
    Threaded(Server),
    Pipelined(PipelineServer),
}

impl EchoServer {
    /// Binds `addr` and, in pipeline mode, starts the pipeline's stages.
    ///
    /// # Errors
    /// When the address cannot be bound or a pipeline thread cannot be started.
    pub fn bind(
        addr: impl ToSocketAddrs,
        server: ServerConfig,
        echo: EchoConfig,
    ) -> io::Result<EchoServer> {
        EchoServer::from_listener(TcpListener::bind(addr)?, server, echo)
    }

    /// Serves an already-bound listener.
    ///
    /// # Errors
    /// As [`EchoServer::bind`], apart from binding.
    pub fn from_listener(
        listener: TcpListener,
        mut server: ServerConfig,
        echo: EchoConfig,
    ) -> io::Result<EchoServer> {
        let EchoConfig {
            framing,
            transform,
            limits,
            ..
        } = echo;
        // A refused client gets its error in the framing it speaks.
        server.framing = framing;
        let name = server.name.clone();
        let (summary, server) = match echo.mode {
            Mode::Threaded => (
                format!("threaded mode, {framing} framing, transform {transform}"),
                Served::Threaded(Server::from_listener(listener, server, move |conn| {
                    serve_threaded(&conn, framing, limits, transform)
                })?),
            ),
            Mode::Pipeline => {
                let mut config = PipelineConfig::new(&server.name, framing);
                config.workers = echo.workers;
                config.senders = echo.senders;
                config.limits = limits;
                config.write_timeout = echo.write_timeout;
                let pipeline = Pipeline::start(config, move |_, payload| {
                    Reply::One(transform.apply_owned(payload))
                })?;
                (
                    format!(
                        "pipeline mode ({} workers, {} senders), {framing} framing, transform \
                         {transform}",
                        echo.workers.max(1),
                        echo.senders.max(1)
                    ),
                    Served::Pipelined(pipeline.into_server(listener, server)?),
                )
            }
        };
        Ok(EchoServer {
            name,
            summary,
            server,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        match &self.server {
            Served::Threaded(s) => s.local_addr(),
            Served::Pipelined(s) => s.local_addr(),
        }
    }

    /// A handle to stop the server (from a signal handler, say).
    pub fn handle(&self) -> ServerHandle {
        match &self.server {
            Served::Threaded(s) => s.handle(),
            Served::Pipelined(s) => s.handle(),
        }
    }

    /// Serves until [`ServerHandle::shutdown`]; in pipeline mode, then shuts the pipeline
    /// down behind the server.
    pub fn run(self) -> EchoReport {
        let name = self.name;
        log_info!("{name}: {}", self.summary);
        match self.server {
            Served::Threaded(server) => EchoReport {
                server: server.run(),
                pipeline_joined: None,
            },
            Served::Pipelined(server) => {
                let report = server.run();
                log_info!(
                    "{name}: pipeline stopped ({} stage threads joined)",
                    report.pipeline_joined
                );
                EchoReport {
                    server: report.server,
                    pipeline_joined: Some(report.pipeline_joined),
                }
            }
        }
    }
}

/// The threaded echo: answers every frame a read delivered, then sends the answers in one
/// write and blocks for more (so a pipelining client costs one `write` per batch). The
/// answers wait in a buffer charged to the connection's share of the client memory
/// budget, given back after a large batch (the request loop's [`Replies`]): a client that
/// sends large frames and then neither reads nor closes holds its answers against the
/// budget, not beside it. The answers to the frames before a fatal one still go.
///
/// # Errors
/// A framing error (a bad header, a frame over the limit, a close mid-frame, an answer
/// the framing cannot carry) or a failed read or write; a read timeout (an idle
/// connection) is a normal end.
pub fn serve_threaded(
    conn: &Connection,
    framing: Framing,
    limits: Limits,
    transform: Transform,
) -> Result<(), HandlerError> {
    // Read through the connection: the idle timeout is a clean end of stream.
    let mut reader = conn.reader(framing, limits);
    let mut out = Replies::new(conn, framing);
    loop {
        let fatal = loop {
            let frame = match reader.next_buffered() {
                Ok(Some(frame)) => frame,
                Ok(None) => break None,
                Err(e) => break Some(e),
            };
            if let Err(e) = out.frame(&transform.apply(frame)) {
                break Some(e);
            }
            out.charge_capacity()?;
        };
        let written = out.flush()?;
        if let Some(e) = fatal {
            return Err(e.into());
        }
        if !written {
            return Ok(());
        }
        if !reader.fill()? {
            return Ok(reader.finish()?);
        }
    }
}

/// Renders a payload for an error message: text as text, the rest escaped, long ones cut.
pub(crate) fn describe(payload: &[u8]) -> String {
    const SHOWN: usize = 40;
    let text = String::from_utf8_lossy(&payload[..payload.len().min(SHOWN)]);
    if payload.len() > SHOWN {
        format!("{text:?}... ({} bytes)", payload.len())
    } else {
        format!("{text:?}")
    }
}

/// Everything that can end an echo client or a benchmark.
#[derive(Debug)]
pub enum EchoError {
    /// The server could not be reached.
    Connect {
        /// The address tried.
        addr: String,
        /// Why it failed.
        source: io::Error,
    },
    /// Reading input, writing output, or the socket failed.
    Io(io::Error),
    /// A reply could not be read, or a message could not be framed.
    Frame(FrameError),
    /// The server closed the connection instead of replying.
    Closed,
    /// No reply within the timeout: most often a client and a server that disagree on the
    /// framing, each waiting for the end of a frame the other never sends.
    NoReply {
        /// The server.
        addr: String,
        /// How long the client waited.
        timeout: Duration,
        /// The framing the client spoke.
        framing: Framing,
    },
    /// A reply was not the echo of its request.
    Mismatch {
        /// The connection (0-based) it arrived on.
        conn: usize,
        /// What was sent.
        sent: Vec<u8>,
        /// What came back.
        got: Vec<u8>,
    },
}

impl fmt::Display for EchoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EchoError::Connect { addr, source } => write!(f, "cannot connect to {addr}: {source}"),
            EchoError::Io(e) => write!(f, "i/o error: {e}"),
            EchoError::Frame(e) => write!(f, "{e}"),
            EchoError::Closed => {
                f.write_str("the server closed the connection instead of replying")
            }
            EchoError::NoReply {
                addr,
                timeout,
                framing,
            } => write!(
                f,
                "no reply within {} s from {addr}; is the server using --framing {framing}?",
                timeout.as_secs_f64()
            ),
            EchoError::Mismatch { conn, sent, got } => write!(
                f,
                "connection {conn}: sent {}, got back {}",
                describe(sent),
                describe(got)
            ),
        }
    }
}

impl std::error::Error for EchoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EchoError::Connect { source, .. } => Some(source),
            EchoError::Io(e) => Some(e),
            EchoError::Frame(e) => Some(e),
            EchoError::Closed | EchoError::NoReply { .. } | EchoError::Mismatch { .. } => None,
        }
    }
}

impl From<io::Error> for EchoError {
    fn from(e: io::Error) -> Self {
        EchoError::Io(e)
    }
}

impl From<FrameError> for EchoError {
    fn from(e: FrameError) -> Self {
        EchoError::Frame(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{connect, eventually};

    #[test]
    fn words_parse_and_print() {
        for m in [Mode::Threaded, Mode::Pipeline] {
            assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
        }
        for t in [Transform::None, Transform::Upper] {
            assert_eq!(t.to_string().parse::<Transform>().unwrap(), t);
        }
        let e = "queue".parse::<Mode>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown mode \"queue\" (expected threaded or pipeline)"
        );
        assert!("UPPER".parse::<Transform>().is_err());
    }

    #[test]
    fn upper_is_unicode_aware_and_leaves_binary_alone() {
        assert_eq!(&*upper(b"hello, World 1"), b"HELLO, WORLD 1");
        assert_eq!(&*upper("straße ǆ é".as_bytes()), "STRASSE Ǆ É".as_bytes());
        assert_eq!(&*upper(b"\xff\xfe not utf-8"), b"\xff\xfe not utf-8");
        assert_eq!(&*upper(b""), b"");
        for t in [Transform::None, Transform::Upper] {
            for p in [&b"abc\n\x00"[..], b"\xc3", "ß".as_bytes()] {
                assert_eq!(t.apply(p).into_owned(), t.apply_owned(p.to_vec()));
            }
        }
    }

    /// A threaded echo on u32 frames with a client memory budget, and the budget.
    fn threaded_u32(transform: Transform) -> (crate::server::RunningServer, crate::budget::Budget) {
        crate::log::capture_in_tests();
        let budget = crate::budget::Budget::new("echo", 64 << 20);
        let config = ServerConfig {
            client_memory: Some(budget.clone()),
            ..ServerConfig::named("echo")
        };
        let server = Server::bind("127.0.0.1:0", config, move |conn| {
            serve_threaded(&conn, Framing::U32, Limits::default(), transform)
        })
        .unwrap()
        .spawn()
        .unwrap();
        (server, budget)
    }

    #[test]
    fn answers_wait_against_the_budget_and_go_back_to_it_once_written() {
        use std::io::{Read, Write};
        let (server, budget) = threaded_u32(Transform::Upper);
        let mut client = connect(server.local_addr());
        // 4 MiB whose upper case is three times as long: 'ΐ' is 'Ϊ́', three characters.
        let frame = "ΐ".repeat(2 << 20);
        let mut framed = Vec::new();
        crate::framing::encode_frame(Framing::U32, frame.as_bytes(), &mut framed).unwrap();
        client.write_all(&framed).unwrap();
        // Not read yet: the answer is held, and charged, while its write blocks (the
        // request's 4 MiB in the read buffer, its answer's 12 MiB).
        eventually("the answer to be charged", || budget.held() >= 15 << 20);
        let answer = frame.to_uppercase();
        let mut back = vec![0u8; 4 + answer.len()];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back[4..], answer.as_bytes());
        // Written: the large buffer goes back (and so does its charge).
        eventually("the charge to go back", || budget.held() < 1 << 20);
        server.stop();
    }

    #[test]
    fn answers_to_the_frames_before_a_fatal_one_still_go() {
        use std::io::{Read, Write};
        let (server, _budget) = threaded_u32(Transform::None);
        let mut client = connect(server.local_addr());
        // "hi", then a header declaring 4 GiB: over the limit, the connection ends.
        client.write_all(b"\0\0\0\x02hi\xff\xff\xff\xff").unwrap();
        let mut back = Vec::new();
        let _ = client.read_to_end(&mut back);
        assert_eq!(back, b"\0\0\0\x02hi");
        server.stop();
    }
}
