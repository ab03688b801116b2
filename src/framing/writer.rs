//! The encoder, and writers that send each frame whole.

use super::reader::find_newline;
use super::{FrameError, Framing};
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

/// Appends one whole frame (header and payload, or line and `\n`) to `out`.
///
/// ```
/// use switchboard::framing::{encode_frame, Framing};
///
/// let mut out = Vec::new();
/// encode_frame(Framing::Ascii10, b"hello", &mut out)?;
/// encode_frame(Framing::U16, b"hi", &mut out)?;
/// assert_eq!(out, b"         5hello\0\x02hi");
/// // A line cannot carry a newline; nothing is added.
/// assert!(encode_frame(Framing::Line, b"a\nb", &mut out).is_err());
/// assert_eq!(out.len(), 19);
/// # Ok::<(), switchboard::framing::FrameError>(())
/// ```
///
/// # Errors
/// [`FrameError::TooLong`] when the payload is too large for the header (65,535 bytes for
/// `u16`): the length is never truncated. [`FrameError::Delimiter`] when a `line` payload
/// contains `\n`. On error `out` is left as it was.
pub fn encode_frame(framing: Framing, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let mark = begin_frame(framing, out);
    out.extend_from_slice(payload);
    end_frame(framing, out, mark)
}

/// Starts a frame in `out` whose payload the caller appends in place; returns the mark to
/// hand to [`end_frame`]. This lets a server format a reply straight into its output buffer.
pub fn begin_frame(framing: Framing, out: &mut Vec<u8>) -> usize {
    let mark = out.len();
    out.extend_from_slice(&[0u8; 10][..framing.header_len()]);
    mark
}

/// Finishes the frame begun at `mark`: writes its header (or its `\n`).
///
/// # Errors
/// As [`encode_frame`]; on error the partial frame is removed from `out`.
pub fn end_frame(framing: Framing, out: &mut Vec<u8>, mark: usize) -> Result<(), FrameError> {
    let h = framing.header_len();
    let len = (out.len() - mark - h) as u64;
    if len > framing.max_encodable() {
        out.truncate(mark);
        return Err(FrameError::TooLong {
            limit: framing.max_encodable(),
        });
    }
    let header = mark..mark + h;
    match framing {
        Framing::Line => {
            if find_newline(&out[mark..]).is_some() {
                out.truncate(mark);
                return Err(FrameError::Delimiter);
            }
            out.push(b'\n');
        }
        Framing::U16 => out[header].copy_from_slice(&(len as u16).to_be_bytes()),
        Framing::U32 => out[header].copy_from_slice(&(len as u32).to_be_bytes()),
        Framing::Ascii10 => {
            // Right-aligned and space-padded, as Python's b'%10d' % n.
            let header = &mut out[header];
            header.fill(b' ');
            let mut n = len;
            for slot in header.iter_mut().rev() {
                *slot = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Writes frames to one owner's stream, each with a single `write_all` call.
///
/// Frames can also be queued with [`FrameWriter::queue`] and sent together by
/// [`FrameWriter::flush`]: one system call for a batch of pipelined replies.
///
/// ```
/// use switchboard::framing::{FrameWriter, Framing};
///
/// let mut writer = FrameWriter::new(Vec::new(), Framing::U32);
/// writer.queue(b"one")?;
/// writer.queue(b"two")?;
/// assert_eq!(writer.queued_len(), 14);
/// writer.flush()?; // both frames, one write
/// writer.write_frame(b"three")?;
/// assert_eq!(writer.get_mut(), b"\0\0\0\x03one\0\0\0\x03two\0\0\0\x05three");
/// # Ok::<(), switchboard::framing::FrameError>(())
/// ```
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    framing: Framing,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    /// A writer of `framing` frames onto `inner`.
    pub fn new(inner: W, framing: Framing) -> Self {
        FrameWriter {
            inner,
            framing,
            buf: Vec::new(),
        }
    }

    /// Sends one frame now, together with anything queued before it.
    ///
    /// # Errors
    /// Encoding errors as [`encode_frame`] (nothing is sent), or [`FrameError::Io`].
    pub fn write_frame(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        self.queue(payload)?;
        self.flush()
    }

    /// Adds one frame to the batch without sending it.
    ///
    /// # Errors
    /// Encoding errors as [`encode_frame`]; the batch is left as it was.
    pub fn queue(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        encode_frame(self.framing, payload, &mut self.buf)
    }

    /// Sends the queued frames in one `write_all`.
    ///
    /// # Errors
    /// [`FrameError::Io`] when the write fails; the batch is dropped either way.
    pub fn flush(&mut self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let result = self.inner.write_all(&self.buf);
        self.buf.clear();
        result.map_err(FrameError::Io)
    }

    /// Bytes queued and not yet sent.
    pub fn queued_len(&self) -> usize {
        self.buf.len()
    }

    /// The underlying writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

/// A cloneable frame writer for a stream that several threads write to.
///
/// The frame is encoded outside the lock and written whole under it, so frames from
/// different threads never interleave. The lock is held for the duration of the write: a
/// peer that stops reading blocks the writers of *its* stream only, which is why servers
/// that fan out give each client its own outbox thread instead of writing from the sender.
#[derive(Debug)]
pub struct SharedFrameWriter<W> {
    inner: Arc<Mutex<W>>,
    framing: Framing,
}

impl<W> Clone for SharedFrameWriter<W> {
    fn clone(&self) -> Self {
        SharedFrameWriter {
            inner: Arc::clone(&self.inner),
            framing: self.framing,
        }
    }
}

impl<W: Write> SharedFrameWriter<W> {
    /// Wraps `inner` for shared use.
    pub fn new(inner: W, framing: Framing) -> Self {
        SharedFrameWriter {
            inner: Arc::new(Mutex::new(inner)),
            framing,
        }
    }

    /// Encodes `payload` and writes it as one frame.
    ///
    /// # Errors
    /// Encoding errors as [`encode_frame`] (nothing is sent), or [`FrameError::Io`].
    pub fn write_frame(&self, payload: &[u8]) -> Result<(), FrameError> {
        let mut buf = Vec::with_capacity(payload.len() + 10);
        encode_frame(self.framing, payload, &mut buf)?;
        self.write_encoded(&buf)
    }

    /// Writes bytes that are already one or more whole frames.
    ///
    /// # Errors
    /// [`FrameError::Io`] when the write fails.
    pub fn write_encoded(&self, frames: &[u8]) -> Result<(), FrameError> {
        // A writer that panicked mid-frame poisons the lock; the stream may hold half a
        // frame then, but refusing every later write would not repair it either.
        let mut w = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        w.write_all(frames).map_err(FrameError::Io)
    }

    /// The framing frames are written in.
    pub fn framing(&self) -> Framing {
        self.framing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn headers_byte_by_byte() {
        let enc = |f, p: &[u8]| {
            let mut out = Vec::new();
            encode_frame(f, p, &mut out).unwrap();
            out
        };
        assert_eq!(enc(Framing::Line, b"lookup,k"), b"lookup,k\n");
        assert_eq!(enc(Framing::Ascii10, b"hello"), b"         5hello");
        assert_eq!(enc(Framing::Ascii10, b""), b"         0");
        assert_eq!(enc(Framing::Ascii10, &[b'x'; 1234])[..10], *b"      1234");
        assert_eq!(enc(Framing::U16, b"abc"), b"\x00\x03abc");
        assert_eq!(enc(Framing::U32, b"abc"), b"\x00\x00\x00\x03abc");
        assert_eq!(enc(Framing::U16, &[0; 258])[..2], [1, 2]);
    }

    #[test]
    fn the_encoder_refuses_what_the_header_cannot_say() {
        let mut out = b"kept".to_vec();
        let big = vec![0u8; 65_536];
        assert!(matches!(
            encode_frame(Framing::U16, &big, &mut out),
            Err(FrameError::TooLong { limit: 65_535 })
        ));
        assert_eq!(out, b"kept");
        encode_frame(Framing::U16, &big[..65_535], &mut out).unwrap();
        assert_eq!(out.len(), 4 + 2 + 65_535);
        let mut out = Vec::new();
        assert!(matches!(
            encode_frame(Framing::Line, b"two\nlines", &mut out),
            Err(FrameError::Delimiter)
        ));
        assert!(out.is_empty());
    }

    /// Records each `write` call, to prove a frame goes out in one.
    #[derive(Default)]
    struct Calls(Vec<Vec<u8>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_frame_is_one_write_and_a_batch_is_one_write() {
        let mut w = FrameWriter::new(Calls::default(), Framing::Ascii10);
        w.write_frame(b"hello").unwrap();
        w.queue(b"a").unwrap();
        w.queue(b"b").unwrap();
        assert_eq!(w.queued_len(), 22);
        w.flush().unwrap();
        assert_eq!(
            w.get_mut().0,
            [
                b"         5hello".to_vec(),
                b"         1a         1b".to_vec()
            ]
        );
    }

    #[test]
    fn shared_writers_never_interleave() {
        let w = SharedFrameWriter::new(Calls::default(), Framing::U32);
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        w.write_frame(&[t; 100]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let calls = &w.inner.lock().unwrap().0;
        assert_eq!(calls.len(), 1600);
        for c in calls {
            assert_eq!(c.len(), 104);
            assert!(c[4..].iter().all(|&b| b == c[4]));
        }
    }
}
