//! A blocking chat client: join, send, read events. `chat-client` runs it as a console
//! (stdin lines in, the seed's `[JOIN] ..` lines out); `chat-bench` drives many of them.

use super::protocol::{self, ClientRequest, Event, ProtocolError, ServerLine};
use crate::framing::{FrameError, FrameReader, Framing};
use std::fmt;
use std::io::{self, BufRead, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::Duration;

/// How long connecting may take when no timeout is given: an unroutable address fails
/// instead of hanging the console (or the benchmark) for the kernel's minutes of SYN retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong for a client.
#[derive(Debug)]
pub enum ClientError {
    /// The server could not be reached.
    Connect {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The socket failed or timed out.
    Io(io::Error),
    /// The server sent something that is not a line.
    Frame(FrameError),
    /// The server sent a line this client does not understand.
    Protocol(ProtocolError),
    /// The server answered `{error,Reason}` to the join.
    Refused(String),
    /// The server sent a line that is valid but not what was due.
    Unexpected(String),
    /// The server closed the connection.
    Closed,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { addr, source } => {
                write!(f, "cannot connect to {addr}: {source}")
            }
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::Frame(e) => write!(f, "bad line from the server: {e}"),
            ClientError::Protocol(e) => write!(f, "bad line from the server: {e}"),
            ClientError::Refused(reason) => write!(f, "the server refused: {reason}"),
            ClientError::Unexpected(what) => write!(f, "unexpected from the server: {what}"),
            ClientError::Closed => f.write_str("the server closed the connection"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Connect { source, .. } => Some(source),
            ClientError::Io(e) => Some(e),
            ClientError::Frame(e) => Some(e),
            ClientError::Protocol(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// The sending half of a joined client.
#[derive(Debug)]
pub struct ClientWriter {
    name: String,
    stream: TcpStream,
    buf: Vec<u8>,
}

/// The receiving half of a joined client.
#[derive(Debug)]
pub struct ClientReader {
    reader: FrameReader<TcpStream>,
}

/// A client that has joined the chat.
#[derive(Debug)]
pub struct ChatClient {
    /// Sends requests.
    pub writer: ClientWriter,
    /// Reads events and replies.
    pub reader: ClientReader,
}

impl ChatClient {
    /// Connects to `addr` and joins as `name`, returning once the server has announced the
    /// join. `timeout` bounds connecting (10 s when `None`) and every later read.
    ///
    /// # Errors
    /// When the server cannot be reached in time, refuses the name (`{error,name_taken}`,
    /// ...), or closes the connection.
    pub fn join(
        addr: impl ToSocketAddrs + fmt::Display,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<ChatClient, ClientError> {
        let stream =
            super::connect(&addr, timeout.unwrap_or(CONNECT_TIMEOUT)).map_err(|source| {
                ClientError::Connect {
                    addr: addr.to_string(),
                    source,
                }
            })?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(timeout)?;
        let mut client = ChatClient {
            writer: ClientWriter {
                name: name.to_owned(),
                stream: stream.try_clone()?,
                buf: Vec::new(),
            },
            reader: ClientReader {
                reader: FrameReader::with_limits(stream, Framing::Line, super::line_limits()),
            },
        };
        client
            .writer
            .request(&ClientRequest::Join(name.to_owned()))?;
        loop {
            match client.reader.next_line()? {
                Some(ServerLine::Event(Event::Join(joined))) if joined == name => {
                    return Ok(client)
                }
                Some(ServerLine::Error(reason)) => return Err(ClientError::Refused(reason)),
                Some(_) => {}
                None => return Err(ClientError::Closed),
            }
        }
    }
}

impl ClientWriter {
    /// The name this client joined as.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one request line.
    ///
    /// # Errors
    /// When the write fails.
    pub fn request(&mut self, request: &ClientRequest) -> io::Result<()> {
        self.buf.clear();
        protocol::format_request(request, &mut self.buf);
        self.stream.write_all(&self.buf)
    }

    /// Says `text`.
    ///
    /// # Errors
    /// When the write fails.
    pub fn send(&mut self, text: &str) -> io::Result<()> {
        let name = self.name.clone();
        self.request(&ClientRequest::Send {
            name,
            text: text.to_owned(),
        })
    }

    /// Asks to leave; the server answers `exit` and closes.
    ///
    /// # Errors
    /// When the write fails.
    pub fn leave(&mut self) -> io::Result<()> {
        let name = self.name.clone();
        self.request(&ClientRequest::Leave(name))
    }
}

impl ClientReader {
    /// The next line from the server; `None` once it has closed the connection.
    ///
    /// # Errors
    /// A failed or timed-out read, or a line this client does not understand.
    pub fn next_line(&mut self) -> Result<Option<ServerLine>, ClientError> {
        match self.reader.read_frame() {
            Ok(Some(line)) => protocol::parse_server_line(line)
                .map(Some)
                .map_err(ClientError::Protocol),
            Ok(None) => Ok(None),
            Err(FrameError::Io(e)) => Err(ClientError::Io(e)),
            Err(e) => Err(ClientError::Frame(e)),
        }
    }
}

/// The `chat-client` console: joins `addr` as `name`, sends every line of `input` (until
/// `exit` or end of input, which leave), and prints every event to `output` as the seed's
/// client does. Input is read on a thread of its own, so events show while the user types
/// and a server that closes the connection ends the console at once; that thread is not
/// joined then (a blocking read of stdin cannot be interrupted; it ends with the process).
///
/// # Errors
/// When joining fails, the connection breaks, or the server closes it without being asked
/// to ([`ClientError::Closed`], after printing `[CLOSED] ...`).
pub fn run_console(
    addr: &str,
    name: &str,
    input: impl BufRead + Send + 'static,
    mut output: impl Write,
) -> Result<(), ClientError> {
    let ChatClient {
        mut writer,
        mut reader,
    } = ChatClient::join(addr, name, None)?;
    writeln!(
        output,
        "{}",
        protocol::display(&ServerLine::Event(Event::Join(name.to_owned())))
    )?;
    output.flush()?;
    let typist = thread::spawn(move || -> io::Result<()> {
        let typed = (|| -> io::Result<()> {
            for line in input.lines() {
                let line = line?;
                if line.trim_end() == "exit" {
                    break;
                }
                writer.send(&line)?;
            }
            writer.leave()
        })();
        if typed.is_err() {
            // The reader would wait for an `exit` that will not come.
            let _ = writer.stream.shutdown(Shutdown::Both);
        }
        typed
    });
    let printed = (|| -> Result<(), ClientError> {
        loop {
            // A server that goes away may reset the connection instead of closing it
            // (its socket closed with bytes unread): to the user that is the same close.
            let line = match reader.next_line() {
                Err(ClientError::Io(e)) if crate::server::is_disconnect(&e) => None,
                other => other?,
            };
            let shown = match &line {
                Some(line) => protocol::display(line),
                None => "[CLOSED] the server closed the connection".to_owned(),
            };
            writeln!(output, "{shown}")?;
            output.flush()?;
            match line {
                Some(ServerLine::Exit) => return Ok(()),
                None => return Err(ClientError::Closed),
                Some(_) => {}
            }
        }
    })();
    // The reader's view comes first: a line typed into a connection the server had just
    // closed fails with a broken pipe, which says less than "the server closed it".
    printed?;
    if typist.is_finished() {
        typist.join().unwrap_or(Ok(()))?;
    }
    Ok(())
}
