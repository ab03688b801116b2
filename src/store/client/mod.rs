//! A blocking client of the store protocol. Requests are queued and sent together when a
//! reply is awaited, so pipelining is a matter of sending several before receiving.
//! [`console`] is the command language of `store-client` on top of it.

pub mod console;

use super::protocol::{self, Reply, Request};
use crate::framing::{encode_frame, FrameError, FrameReader, Framing};
use std::fmt;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// What can go wrong talking to a store server.
#[derive(Debug)]
pub enum ClientError {
    /// Reading or writing the connection failed.
    Frame(FrameError),
    /// The server closed the connection where a reply was due.
    Closed,
    /// The server answered `{error,Reason}`.
    Server(String),
    /// A reply that is not the one this request calls for.
    Unexpected(Vec<u8>),
    /// A request the server would read as another (a key with a comma: `store,a,b,v`
    /// sets `a`), or as none: not sent.
    Unsendable(String),
    /// No reply came within the read timeout: most often a client and a server that
    /// disagree on the framing, each waiting for the end of a frame the other never sends.
    NoReply {
        /// The server.
        addr: SocketAddr,
        /// How long the client waited.
        timeout: Duration,
        /// The framing the client spoke.
        framing: Framing,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Frame(e) => write!(f, "{e}"),
            ClientError::Closed => f.write_str("the server closed the connection"),
            ClientError::Server(reason) => write!(f, "server error: {reason}"),
            ClientError::Unexpected(r) => {
                write!(f, "unexpected reply {:?}", String::from_utf8_lossy(r))
            }
            ClientError::Unsendable(why) => write!(f, "not sent: {why}"),
            ClientError::NoReply {
                addr,
                timeout,
                framing,
            } => write!(
                f,
                "no reply within {} s from {addr}; is the server using --framing {framing}?",
                timeout.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Frame(e) => Some(e),
            _ => None,
        }
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        ClientError::Frame(e)
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Frame(FrameError::Io(e))
    }
}

/// Connect and read timeout: a server that does not answer fails the call, not hangs it.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// One connection to a store server.
pub struct StoreClient {
    reader: FrameReader<TcpStream>,
    writer: TcpStream,
    framing: Framing,
    queued: Vec<u8>,
    peer: SocketAddr,
    timeout: Duration,
}

impl StoreClient {
    /// Connects (trying each address the name resolves to, 10 s each), with `TCP_NODELAY`
    /// and a 10 s read timeout.
    ///
    /// # Errors
    /// When the name does not resolve or no address can be reached.
    pub fn connect(addr: impl ToSocketAddrs, framing: Framing) -> io::Result<StoreClient> {
        StoreClient::connect_timeout(addr, framing, TIMEOUT)
    }

    /// [`StoreClient::connect`] with `timeout` for connecting and for each reply.
    ///
    /// # Errors
    /// When the name does not resolve or no address can be reached.
    pub fn connect_timeout(
        addr: impl ToSocketAddrs,
        framing: Framing,
        timeout: Duration,
    ) -> io::Result<StoreClient> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolved to nothing");
        let mut connected = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    connected = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = connected.ok_or(last)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        Ok(StoreClient {
            peer: stream.peer_addr()?,
            timeout,
            writer: stream.try_clone()?,
            reader: FrameReader::new(stream, framing),
            framing,
            queued: Vec::new(),
        })
    }

    /// Queues a request without sending it.
    ///
    /// # Errors
    /// When the request cannot be framed (a `\n` in a `line` request, or too large).
    pub fn queue(&mut self, request: &Request<'_>) -> Result<(), ClientError> {
        let mut payload = Vec::new();
        protocol::format_request(request, &mut payload);
        // The wire has no escapes: a key with a comma (or an empty one) reads back as
        // another request, and its reply would answer a question nobody asked. A line's
        // final `\r` is taken for a CRLF's by the server's reader, and dropped.
        let crlf = self.framing == Framing::Line && payload.last() == Some(&b'\r');
        if crlf || !matches!(protocol::parse(&payload), Ok(r) if r == *request) {
            return Err(ClientError::Unsendable(format!(
                "{:?} would reach the server as another request (no key may be empty, nor a stored one hold a comma, nor a line end in \\r)",
                String::from_utf8_lossy(&payload)
            )));
        }
        self.queue_raw(&payload)
    }

    /// Queues an arbitrary payload as one frame.
    ///
    /// # Errors
    /// When the payload cannot be framed.
    pub fn queue_raw(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        Ok(encode_frame(self.framing, payload, &mut self.queued)?)
    }

    /// Sends everything queued, in one write.
    ///
    /// # Errors
    /// When the write fails.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if !self.queued.is_empty() {
            self.writer.write_all(&self.queued)?;
            self.queued.clear();
        }
        Ok(())
    }

    /// Sends what is queued and reads one reply frame.
    ///
    /// # Errors
    /// When the connection fails or closes first, or no reply comes within the timeout
    /// ([`ClientError::NoReply`]).
    pub fn recv(&mut self) -> Result<Vec<u8>, ClientError> {
        self.flush()?;
        match self.reader.read_frame() {
            Ok(Some(frame)) => Ok(frame.to_vec()),
            Ok(None) => Err(ClientError::Closed),
            Err(e) if e.is_timeout() => Err(ClientError::NoReply {
                addr: self.peer,
                timeout: self.timeout,
                framing: self.framing,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// `store,KEY,VALUE`, sent at once (there is no reply to wait for).
    ///
    /// # Errors
    /// When the request cannot be framed or sent.
    pub fn store(&mut self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        self.queue(&Request::Store { key, value })?;
        self.flush()
    }

    /// `lookup,KEY`: the value, or `None` for `nothing`.
    ///
    /// # Errors
    /// On a failed connection, an `{error,...}` reply, or an unexpected reply.
    pub fn lookup(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        self.queue(&Request::Lookup { key })?;
        let reply = self.recv()?;
        match protocol::parse_reply(&reply) {
            Some(Reply::Just(v)) => Ok(Some(v.to_vec())),
            Some(Reply::Nothing) => Ok(None),
            _ => Err(unexpected(reply)),
        }
    }

    /// `delete,KEY`: whether the key was there.
    ///
    /// # Errors
    /// As [`StoreClient::lookup`].
    pub fn delete(&mut self, key: &[u8]) -> Result<bool, ClientError> {
        self.queue(&Request::Delete { key })?;
        let reply = self.recv()?;
        match protocol::parse_reply(&reply) {
            Some(Reply::Ok) => Ok(true),
            Some(Reply::Nothing) => Ok(false),
            _ => Err(unexpected(reply)),
        }
    }

    /// `stats`: the whole `{stats,[...]}` term.
    ///
    /// # Errors
    /// As [`StoreClient::lookup`].
    pub fn stats(&mut self) -> Result<String, ClientError> {
        self.queue(&Request::Stats)?;
        let reply = self.recv()?;
        match protocol::parse_reply(&reply) {
            Some(Reply::Stats(s)) => Ok(String::from_utf8_lossy(s).into_owned()),
            _ => Err(unexpected(reply)),
        }
    }
}

fn unexpected(reply: Vec<u8>) -> ClientError {
    match protocol::parse_reply(&reply) {
        Some(Reply::Error(reason)) => {
            ClientError::Server(String::from_utf8_lossy(reason).into_owned())
        }
        _ => ClientError::Unexpected(reply),
    }
}
