//! The seed's echo client: each line of input is sent as one message and its reply printed.

use super::EchoError;
use crate::framing::{encode_frame, FrameReader, Framing};
use std::io::{BufRead, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Connects to `addr` and, for each line of `input` (without its `\n` or `\r\n`), sends it as
/// one message and writes `Received > REPLY` to `output`, as the seed's client prints it.
/// An empty line or the end of `input` ends it; returns the number of messages echoed.
/// With `prompt`, writes the seed's `Say >` before reading each line.
///
/// # Errors
/// When the server cannot be reached, closes the connection, or a read, write or the socket
/// fails (including the `timeout` on any socket operation); a line that cannot be framed
/// (too long for `u16`).
pub fn run_client(
    addr: &str,
    framing: Framing,
    timeout: Duration,
    mut input: impl BufRead,
    mut output: impl Write,
    prompt: bool,
) -> Result<usize, EchoError> {
    let stream = connect(addr, timeout)?;
    let mut reader = FrameReader::new(&stream, framing);
    let (mut line, mut wire) = (Vec::new(), Vec::new());
    let mut echoed = 0;
    loop {
        if prompt {
            output.write_all(b"Say >")?;
            output.flush()?;
        }
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        if line.is_empty() {
            break;
        }
        wire.clear();
        encode_frame(framing, &line, &mut wire)?;
        // One write per message: see README on the Nagle trap.
        (&stream).write_all(&wire)?;
        let reply = match reader.read_frame() {
            Ok(reply) => reply.ok_or(EchoError::Closed)?,
            Err(e) if e.is_timeout() => {
                return Err(EchoError::NoReply {
                    addr: addr.to_owned(),
                    timeout,
                    framing,
                })
            }
            Err(e) => return Err(e.into()),
        };
        output.write_all(b"Received > ")?;
        output.write_all(reply)?;
        output.write_all(b"\n")?;
        output.flush()?;
        echoed += 1;
    }
    Ok(echoed)
}

/// Connects to the first address `addr` resolves to that answers, with every socket
/// operation limited to `timeout`.
pub(crate) fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, EchoError> {
    let failed = |source| EchoError::Connect {
        addr: addr.to_owned(),
        source,
    };
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address resolved");
    for a in addr.to_socket_addrs().map_err(failed)? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(stream) => {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(failed(last))
}
