//! The buffered decoder shared by every framing.

use super::{parse_header, FrameError, Framing, Limits};
use crate::budget::{Account, Charge};
use std::hint::cold_path;
use std::io::{self, Read};

/// First buffer size; the buffer is allocated on the first read and grows on demand.
const INITIAL_BUF: usize = 2048;
/// An empty buffer larger than this is given back, so a connection that once carried a big
/// frame does not hold the memory while it idles.
const SHRINK_ABOVE: usize = 64 << 10;
/// How far ahead of the bytes received the buffer may grow towards a declared length.
const GROW_STEP: usize = 64 << 10;
/// Never issue a read for fewer bytes than this unless the frame needs fewer.
const MIN_READ: usize = 512;
/// A buffer that grows past [`SHRINK_ABOVE`] moves into an allocation of this size, of
/// which only the bytes in use are ever touched (address space, not memory, until bytes
/// arrive), so it never moves again while it fills, and it goes back to the system when
/// the buffer is given back. The size is above the largest that glibc's malloc serves from
/// its per-thread arenas (its mmap threshold rises up to 32 MiB on 64-bit systems as large
/// blocks are freed): below it, a buffer freed on one connection's thread stayed in that
/// thread's arena, and 24 connections cut off for the budget left 50-90 MiB resident with
/// 16 MiB charged. Freeing one this large also leaves the threshold where it is.
const RESERVATION: usize = 34 << 20;
/// A reader whose largest buffer is at most this reserves only that: glibc serves such
/// blocks from its arenas whatever the threshold, so a reservation would only cost address
/// space (34 MiB for each of 10,000 chat connections, a 64 KiB line limit, is 340 GB of
/// it, which a system that does not overcommit refuses, aborting the process).
const RESERVE_CAP_UP_TO: usize = 128 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    No,
    /// Discarding the rest of an overlong line, up to and including its `\n`.
    Line,
    /// Discarding the payload of an oversized size-prefixed frame.
    Bytes(u64),
}

/// Reads frames from `R` through one growable buffer.
///
/// Reads are buffered (one `read` call fills as much as the socket has), and the line
/// framing scans the buffered bytes for `\n`, remembering how far it already looked so a
/// long line arriving in pieces is scanned once. [`FrameReader::next_buffered`] and
/// [`FrameReader::fill`] let a server answer every frame a read delivered before it writes
/// the replies in one call and blocks again.
///
/// ```
/// use switchboard::framing::{FrameError, FrameReader, Framing, Limits};
///
/// // Any `Read` will do: a socket, `&Connection`, or bytes.
/// let wire: &[u8] = b"store,k,v\r\nthis line is too long\nlookup,k\n";
/// let limits = Limits { max_line: 10, ..Limits::default() };
/// let mut reader = FrameReader::with_limits(wire, Framing::Line, limits);
/// assert_eq!(reader.read_frame()?, Some(&b"store,k,v"[..]));
/// // Over the limit: skipped, and the stream stays in sync.
/// assert!(matches!(reader.read_frame(), Err(FrameError::TooLong { limit: 10 })));
/// assert_eq!(reader.read_frame()?, Some(&b"lookup,k"[..]));
/// assert_eq!(reader.read_frame()?, None); // closed at a frame boundary
///
/// // A close mid-frame is an error, not a short frame.
/// let mut cut = FrameReader::new(&b"\0\0\0\x05ab"[..], Framing::U32);
/// assert!(matches!(cut.read_frame(), Err(FrameError::Truncated { buffered: 6 })));
/// # Ok::<(), FrameError>(())
/// ```
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    framing: Framing,
    limit: usize,
    /// Largest the buffer may grow: the longest legal frame plus its header or delimiter.
    cap: usize,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Line framing: bytes after `start` already known to hold no `\n`.
    scanned: usize,
    /// Size-prefixed framings: bytes from `start` the frame being assembled needs.
    want: usize,
    skip: Skip,
    /// The buffer's bytes, charged to the connection's share of the server's client memory
    /// budget (see [`FrameReader::accounted`]).
    charge: Option<Charge>,
}

impl<R: Read> FrameReader<R> {
    /// A reader with the default [`Limits`].
    pub fn new(inner: R, framing: Framing) -> Self {
        Self::with_limits(inner, framing, Limits::default())
    }

    /// A reader that enforces `limits`.
    pub fn with_limits(inner: R, framing: Framing, limits: Limits) -> Self {
        let limit = limits.for_framing(framing);
        let cap = match framing {
            // limit bytes, a '\r' that will be dropped, and one byte to prove the line is over.
            Framing::Line => limit.saturating_add(2),
            _ => limit.saturating_add(framing.header_len()),
        };
        FrameReader {
            inner,
            framing,
            limit,
            cap,
            buf: Vec::new(),
            start: 0,
            end: 0,
            scanned: 0,
            want: 0,
            skip: Skip::No,
            charge: None,
        }
    }

    /// Charges the buffer to `account` (a connection's share of the server's
    /// [client memory budget](crate::budget)) as it grows and shrinks: a read that would
    /// grow it past the budget fails with [`FrameError::Io`] (kind `OutOfMemory`) when this
    /// connection holds the most, and evicts the connection that does otherwise.
    /// [`Connection::reader`](crate::server::Connection::reader) does this for you.
    pub fn accounted(mut self, account: Option<&Account>) -> Self {
        self.charge_to(account);
        self
    }

    /// [`accounted`](Self::accounted) for a reader already in use: from now on the buffer
    /// is charged to `account` (none: to nobody), and whatever it was charged to before is
    /// given back. The charge never waits (a caller may hold a lock others need; see
    /// [`Account::charge_now`]); should the budget refuse what the buffer holds now, the
    /// reader stays on the account all the same, and its next growth is charged (or
    /// refused) as any.
    pub fn charge_to(&mut self, account: Option<&Account>) {
        self.charge = account.and_then(|a| {
            a.charge_now(self.buf.capacity())
                .or_else(|_| a.charge_now(0))
                .ok()
        });
    }

    /// The framing this reader decodes.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Reads the next frame, blocking until one is complete.
    ///
    /// # Errors
    /// [`FrameError::TooLong`] for an over-limit frame, which is skipped: call again to go
    /// on. [`FrameError::BadHeader`] when a size header is not a length, and
    /// [`FrameError::Truncated`] when the peer closes mid-frame: both end the stream.
    /// [`FrameError::Io`] when the socket fails or a read timeout expires.
    pub fn read_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        loop {
            if let Some((s, e)) = self.decode()? {
                return Ok(Some(&self.buf[s..e]));
            }
            if !self.fill()? {
                self.finish()?;
                return Ok(None);
            }
        }
    }

    /// The next frame already in the buffer, without reading the socket.
    ///
    /// # Errors
    /// As [`FrameReader::read_frame`], except that it never returns `Truncated` or `Io`.
    #[inline(always)]
    pub fn next_buffered(&mut self) -> Result<Option<&[u8]>, FrameError> {
        // The common case inline: a whole line within the limit, nothing being skipped.
        // Everything else (no newline yet, over the limit, size-prefixed framings) goes
        // through `decode`, which finds the same newline and says what to do.
        if self.framing == Framing::Line && self.skip == Skip::No {
            let avail = &self.buf[self.start..self.end];
            match find_newline(&avail[self.scanned..]) {
                Some(i) => {
                    let nl = self.scanned + i;
                    let len = if nl > 0 && avail[nl - 1] == b'\r' {
                        nl - 1
                    } else {
                        nl
                    };
                    if len <= self.limit {
                        let s = self.start;
                        self.start += nl + 1;
                        self.scanned = 0;
                        return Ok(Some(&self.buf[s..s + len]));
                    }
                }
                // No newline yet, and the line may still end within the limit: `decode`
                // would say the same, so it is spared (once per read at depth 1).
                None if avail.len() <= self.limit + 1 => {
                    self.scanned = avail.len();
                    return Ok(None);
                }
                // Known to hold no newline: `decode` need not look again.
                None => {
                    cold_path();
                    self.scanned = avail.len();
                }
            }
        }
        self.next_decoded()
    }

    #[inline(never)]
    fn next_decoded(&mut self) -> Result<Option<&[u8]>, FrameError> {
        Ok(self.decode()?.map(|(s, e)| &self.buf[s..e]))
    }

    /// Reads once from the socket into the buffer; `Ok(false)` at end of stream.
    ///
    /// # Errors
    /// [`FrameError::Io`] when the read fails or times out.
    pub fn fill(&mut self) -> Result<bool, FrameError> {
        self.make_room()?;
        loop {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    cold_path();
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => cold_path(),
                Err(e) => {
                    cold_path();
                    return Err(FrameError::Io(e));
                }
            }
        }
    }

    /// Checks, once the stream has ended, that it ended at a frame boundary.
    ///
    /// # Errors
    /// [`FrameError::Truncated`] when part of a frame (or of a skipped frame) was pending.
    pub fn finish(&self) -> Result<(), FrameError> {
        let buffered = self.end - self.start;
        if buffered == 0 && self.skip == Skip::No {
            Ok(())
        } else {
            Err(FrameError::Truncated { buffered })
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered_len(&self) -> usize {
        self.end - self.start
    }

    /// Bytes of buffer currently allocated (for memory accounting and tests).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// The underlying reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The underlying reader, mutably (reading from it directly desynchronises the decoder).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// An iterator of owned frames; recoverable errors are yielded and iteration goes on.
    pub fn frames(self) -> Frames<R> {
        Frames {
            reader: self,
            done: false,
        }
    }

    /// Decodes one frame from the buffer, returning its range.
    fn decode(&mut self) -> Result<Option<(usize, usize)>, FrameError> {
        if !self.drain_skip() {
            return Ok(None);
        }
        let avail = &self.buf[self.start..self.end];
        if self.framing == Framing::Line {
            if let Some(i) = find_newline(&avail[self.scanned..]) {
                let nl = self.scanned + i;
                let len = if nl > 0 && avail[nl - 1] == b'\r' {
                    nl - 1
                } else {
                    nl
                };
                let s = self.start;
                self.start += nl + 1;
                self.scanned = 0;
                if len > self.limit {
                    return Err(self.too_long());
                }
                return Ok(Some((s, s + len)));
            }
            self.scanned = avail.len();
            if avail.len() > self.limit + 1 {
                // Cannot end within the limit any more, even if a '\r' comes next: report it
                // now, having buffered no more than the limit, and drop the rest as it comes.
                self.start = self.end;
                self.scanned = 0;
                self.skip = Skip::Line;
                return Err(self.too_long());
            }
            return Ok(None);
        }
        let h = self.framing.header_len();
        if avail.len() < h {
            self.want = h;
            return Ok(None);
        }
        let header = &avail[..h];
        let n = parse_header(self.framing, header).ok_or_else(|| FrameError::BadHeader {
            header: header.to_vec(),
        })?;
        if n > self.limit as u64 {
            // Rejected before anything is allocated for it; the payload is skipped as it
            // arrives so the next header is found.
            self.start += h;
            self.want = 0;
            self.skip = Skip::Bytes(n);
            self.drain_skip();
            return Err(self.too_long());
        }
        let total = h + n as usize;
        if avail.len() < total {
            self.want = total;
            return Ok(None);
        }
        let s = self.start + h;
        self.start += total;
        self.want = 0;
        Ok(Some((s, s + n as usize)))
    }

    /// Consumes buffered bytes of a frame being skipped; true when no skip is pending.
    #[inline]
    fn drain_skip(&mut self) -> bool {
        matches!(self.skip, Skip::No) || self.drain_skip_slow()
    }

    #[cold]
    fn drain_skip_slow(&mut self) -> bool {
        match self.skip {
            Skip::No => true,
            Skip::Line => match find_newline(&self.buf[self.start..self.end]) {
                Some(i) => {
                    self.start += i + 1;
                    self.skip = Skip::No;
                    true
                }
                None => {
                    self.start = self.end;
                    false
                }
            },
            Skip::Bytes(n) => {
                let k = n.min((self.end - self.start) as u64);
                self.start += k as usize;
                if k < n {
                    self.skip = Skip::Bytes(n - k);
                    false
                } else {
                    self.skip = Skip::No;
                    true
                }
            }
        }
    }

    fn too_long(&self) -> FrameError {
        FrameError::TooLong {
            limit: self.limit as u64,
        }
    }

    /// Makes space after `end` for the next read: compacts, grows, or gives memory back.
    ///
    /// The common case inline: no declared length pending and room for a byte after
    /// `end`, which is all the general case below asks for then. Everything else is
    /// out of line, so that the loop around each read stays a few cache lines of code.
    #[inline(always)]
    fn make_room(&mut self) -> Result<(), FrameError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            self.scanned = 0;
        }
        if self.want <= self.end - self.start
            && self.end < self.buf.len()
            && self.buf.len() <= SHRINK_ABOVE
        {
            return Ok(());
        }
        self.make_room_slow()
    }

    /// [`make_room`](Self::make_room) when the buffer must change.
    #[cold]
    #[inline(never)]
    fn make_room_slow(&mut self) -> Result<(), FrameError> {
        if self.start == self.end && self.buf.len() > SHRINK_ABOVE {
            self.buf = Vec::new();
            if let Some(charge) = &mut self.charge {
                // Giving back never fails.
                let _ = charge.resize(0);
            }
        }
        let pending = self.end - self.start;
        // A declared length is a promise, not data: grow towards it as bytes arrive (at
        // most doubling, or GROW_STEP, per read), so a peer that sends a header and stalls
        // costs memory in proportion to what it sent, not to what it declared.
        let need = if self.want > pending {
            self.want.min((pending * 2).max(pending + GROW_STEP))
        } else {
            pending + 1
        };
        let min_read = MIN_READ.min(need - pending);
        if self.buf.len() - self.start >= need && self.buf.len() - self.end >= min_read {
            return Ok(());
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = pending;
        }
        let len = self.buf.len();
        if len < need || len - self.end < min_read {
            let target = need.max(len * 2).max(INITIAL_BUF).min(self.cap).max(need);
            let reserve = target > SHRINK_ABOVE && self.buf.capacity() < target;
            if let Some(charge) = &mut self.charge {
                // Charged before it is allocated: past the budget, it never is. In a
                // reservation, what is touched.
                let held = if target > SHRINK_ABOVE {
                    target
                } else {
                    target.max(self.buf.capacity())
                };
                charge.resize(held).map_err(|e| FrameError::Io(e.into()))?;
            }
            if reserve {
                let size = if self.cap <= RESERVE_CAP_UP_TO {
                    self.cap
                } else {
                    RESERVATION.max(self.cap)
                };
                let mut reserved = Vec::new();
                if reserved.try_reserve_exact(size).is_err() {
                    // The address space is refused (a system that does not overcommit, a
                    // `ulimit -v`): this buffer grows as it fills instead, moving as it
                    // grows, and only what it holds must fit. Never an abort of the process.
                    reserved
                        .try_reserve_exact(target)
                        .map_err(|_| FrameError::Io(io::ErrorKind::OutOfMemory.into()))?;
                }
                reserved.extend_from_slice(&self.buf[..self.end]);
                self.buf = reserved;
            }
            self.buf.resize(target, 0);
        }
        Ok(())
    }
}

/// Position of the first `\n`.
#[inline]
pub(crate) fn find_newline(bytes: &[u8]) -> Option<usize> {
    find_byte(b'\n', bytes)
}

/// Position of the first `needle`.
#[inline]
pub(crate) fn find_byte(needle: u8, bytes: &[u8]) -> Option<usize> {
    // Eight bytes at a time: `w` has a zero byte where the input has `needle`, and
    // `(w - 0x01..) & !w & 0x80..` sets the top bit of the first zero byte of `w` (bytes
    // above it may be set by the borrow, never bytes below it), so the lowest set bit
    // names the first match. Requests are a few dozen bytes; this is a third of the
    // instructions of a byte-by-byte search on them.
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let needles = u64::from_ne_bytes([needle; 8]);
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        let w = u64::from_le_bytes(word.try_into().expect("chunks of 8")) ^ needles;
        let found = w.wrapping_sub(ONES) & !w & HIGHS;
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| b == needle)
        .map(|i| at + i)
}

/// Owned frames from a [`FrameReader`]; see [`FrameReader::frames`].
#[derive(Debug)]
pub struct Frames<R> {
    reader: FrameReader<R>,
    done: bool,
}

impl<R: Read> Iterator for Frames<R> {
    type Item = Result<Vec<u8>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.reader.read_frame() {
            Ok(Some(frame)) => Some(Ok(frame.to_vec())),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = !e.is_recoverable();
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{encode_frame, Limits};
    use super::*;

    #[test]
    fn find_byte_agrees_with_a_byte_by_byte_search() {
        let mut rng = crate::bench::Rng::new(20);
        for needle in [b'\n', b',', 0x00, 0x80, 0xff] {
            let naive = |b: &[u8]| b.iter().position(|&c| c == needle);
            // Bytes next to the needle in value and bit pattern, so a word-level trick that
            // confuses them shows.
            let alphabet = [
                needle,
                needle ^ 0x01,
                needle ^ 0x02,
                needle ^ 0x80,
                needle.wrapping_add(1),
                needle.wrapping_sub(1),
                0x00,
                0xff,
                0x80,
                0x01,
                b'a',
            ];
            for len in 0..40 {
                for _ in 0..200 {
                    let bytes: Vec<u8> = (0..len)
                        .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
                        .collect();
                    assert_eq!(
                        find_byte(needle, &bytes),
                        naive(&bytes),
                        "{needle} {bytes:?}"
                    );
                    if needle == b'\n' {
                        assert_eq!(find_newline(&bytes), naive(&bytes), "{bytes:?}");
                    }
                }
                let other = needle ^ 0x80;
                let mut none = vec![other; len];
                assert_eq!(find_byte(needle, &none), None);
                for at in 0..len {
                    none[at] = needle;
                    assert_eq!(find_byte(needle, &none), Some(at));
                    none[at] = other;
                    assert_eq!(find_byte(needle, &none), None);
                }
            }
        }
    }
    use crate::bench::Rng;

    /// A reader that hands out the input in pieces of the given sizes, cycling.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        turn: usize,
    }

    impl Chunked {
        fn new(data: &[u8], sizes: &[usize]) -> Self {
            Chunked {
                data: data.to_vec(),
                pos: 0,
                sizes: sizes.to_vec(),
                turn: 0,
            }
        }
    }

    impl Read for Chunked {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let size = self.sizes[self.turn % self.sizes.len()].max(1);
            self.turn += 1;
            let n = size.min(out.len()).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn limits(max: usize) -> Limits {
        Limits {
            max_line: max,
            max_frame: max,
        }
    }

    /// Decodes everything, rendering errors as markers so whole sequences can be compared.
    fn decode_all(framing: Framing, input: &[u8], sizes: &[usize], max: usize) -> Vec<String> {
        let mut r = FrameReader::with_limits(Chunked::new(input, sizes), framing, limits(max));
        let mut out = Vec::new();
        loop {
            match r.read_frame() {
                Ok(Some(f)) => out.push(String::from_utf8_lossy(f).into_owned()),
                Ok(None) => return out,
                Err(e) => {
                    out.push(format!("<{}>", e.reason()));
                    if !e.is_recoverable() {
                        return out;
                    }
                }
            }
        }
    }

    /// As [`decode_all`], but the way a request loop reads: [`FrameReader::next_buffered`]
    /// (with its inline path for lines) until the buffer is spent, then one
    /// [`FrameReader::fill`].
    fn buffered_all(framing: Framing, input: &[u8], sizes: &[usize], max: usize) -> Vec<String> {
        let mut r = FrameReader::with_limits(Chunked::new(input, sizes), framing, limits(max));
        let mut out = Vec::new();
        loop {
            match r.next_buffered() {
                Ok(Some(f)) => out.push(String::from_utf8_lossy(f).into_owned()),
                Ok(None) => {
                    if !r.fill().unwrap() {
                        if let Err(e) = r.finish() {
                            out.push(format!("<{}>", e.reason()));
                        }
                        return out;
                    }
                }
                Err(e) => {
                    out.push(format!("<{}>", e.reason()));
                    if !e.is_recoverable() {
                        return out;
                    }
                }
            }
        }
    }

    #[test]
    fn the_inline_line_path_agrees_with_decode() {
        // Random lines of bytes near the delimiters (`\r`, `\n`, bytes one bit away),
        // some over the limit, cut into random reads: `next_buffered` and `read_frame`
        // (always `decode`) must see the same frames and the same errors.
        let mut rng = Rng::new(21);
        let alphabet = [b'\n', b'\r', b'a', b',', 0x0b, 0x8a, 0x00, 0xff];
        for round in 0..400 {
            let max = 1 + rng.below(24) as usize;
            let len = rng.below(200) as usize;
            let mut input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
                .collect();
            if round % 2 == 0 {
                input.push(b'\n');
            }
            let sizes: Vec<usize> = (0..3).map(|_| 1 + rng.below(40) as usize).collect();
            assert_eq!(
                buffered_all(Framing::Line, &input, &sizes, max),
                decode_all(Framing::Line, &input, &sizes, max),
                "input {input:?}, reads {sizes:?}, limit {max}"
            );
        }
    }

    fn encode_all(framing: Framing, frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            encode_frame(framing, f, &mut out).unwrap();
        }
        out
    }

    const SPLITS: [&[usize]; 4] = [&[1], &[2, 3], &[7], &[1 << 20]];

    #[test]
    fn lines_under_every_split() {
        let input = b"store,a,1\r\nlookup,a\n\nx,y,z\r\n";
        for sizes in SPLITS {
            assert_eq!(
                decode_all(Framing::Line, input, sizes, 100),
                ["store,a,1", "lookup,a", "", "x,y,z"],
                "sizes {sizes:?}"
            );
        }
    }

    #[test]
    fn only_the_last_cr_is_dropped() {
        let frames = decode_all(Framing::Line, b"a\r\r\nb\rc\n", &[1], 100);
        assert_eq!(frames, ["a\r", "b\rc"]);
    }

    #[test]
    fn line_limits_at_the_edge() {
        let max = 16;
        for sizes in SPLITS {
            let ok = "x".repeat(max);
            let input = format!(
                "{}\n{ok}\n{ok}\r\n{}\nafter\n",
                "y".repeat(max - 1),
                "z".repeat(max + 1)
            );
            assert_eq!(
                decode_all(Framing::Line, input.as_bytes(), sizes, max),
                [
                    "y".repeat(max - 1),
                    ok.clone(),
                    ok,
                    "<too_long>".into(),
                    "after".into()
                ],
                "sizes {sizes:?}"
            );
        }
    }

    #[test]
    fn an_overlong_line_is_reported_early_and_skipped() {
        let max = 1000;
        let mut input = vec![b'q'; 50_000];
        input.extend_from_slice(b"\nnext\n");
        for sizes in SPLITS {
            let mut r =
                FrameReader::with_limits(Chunked::new(&input, sizes), Framing::Line, limits(max));
            assert!(matches!(
                r.read_frame(),
                Err(FrameError::TooLong { limit: 1000 })
            ));
            // Reported having buffered no more than the limit plus one read.
            assert!(r.capacity() <= max + 2, "buffer grew to {}", r.capacity());
            assert_eq!(r.read_frame().unwrap(), Some(&b"next"[..]));
            assert_eq!(r.read_frame().unwrap(), None);
        }
    }

    #[test]
    fn close_mid_frame_is_truncated_and_at_boundary_is_none() {
        for framing in Framing::ALL {
            let whole = encode_all(framing, &[b"hello", b"world"]);
            for cut in 1..whole.len() {
                let expect_clean = cut == whole.len() / 2;
                let frames = decode_all(framing, &whole[..cut], &[3], 100);
                let last = frames.last().cloned().unwrap_or_default();
                if expect_clean {
                    assert_eq!(frames, ["hello"], "{framing} cut {cut}");
                } else {
                    assert_eq!(last, "<truncated>", "{framing} cut {cut}: {frames:?}");
                }
            }
            assert_eq!(decode_all(framing, &whole, &[3], 100), ["hello", "world"]);
            assert!(decode_all(framing, b"", &[3], 100).is_empty());
        }
    }

    #[test]
    fn sized_frames_under_every_split() {
        for framing in [Framing::Ascii10, Framing::U16, Framing::U32] {
            let input = encode_all(framing, &[b"", b"a\nb", b"\x00\xff", &[b'z'; 300]]);
            for sizes in SPLITS {
                let frames = decode_all(framing, &input, sizes, 1000);
                assert_eq!(frames.len(), 4, "{framing} {sizes:?}");
                assert_eq!(frames[0], "");
                assert_eq!(frames[1], "a\nb");
                assert_eq!(frames[3], "z".repeat(300));
            }
        }
    }

    #[test]
    fn sized_limits_at_the_edge_and_skip() {
        let max = 64;
        for framing in [Framing::Ascii10, Framing::U16, Framing::U32] {
            let (a, b, c) = (vec![b'a'; max - 1], vec![b'b'; max], vec![b'c'; max + 1]);
            let input = encode_all(framing, &[&a, &b, &c, b"after"]);
            for sizes in SPLITS {
                let frames = decode_all(framing, &input, sizes, max);
                assert_eq!(frames.len(), 4, "{framing} {sizes:?}: {frames:?}");
                assert_eq!(frames[0].len(), max - 1);
                assert_eq!(frames[1].len(), max);
                assert_eq!(frames[2], "<too_long>");
                assert_eq!(frames[3], "after");
            }
        }
    }

    #[test]
    fn a_huge_declared_length_allocates_nothing() {
        let mut r = FrameReader::with_limits(
            Chunked::new(b"\xff\xff\xff\xffabc", &[100]),
            Framing::U32,
            limits(1024),
        );
        assert!(matches!(r.read_frame(), Err(FrameError::TooLong { .. })));
        assert!(r.capacity() <= INITIAL_BUF);
        // The stream ends inside the skipped payload: that is a truncation.
        assert!(matches!(r.read_frame(), Err(FrameError::Truncated { .. })));
    }

    #[test]
    fn a_declared_length_is_not_allocated_before_the_bytes_arrive() {
        // A 16 MiB frame is announced but only 100 bytes of it are ever sent.
        let mut input = (16u32 << 20).to_be_bytes().to_vec();
        input.extend_from_slice(&[b'x'; 100]);
        let mut r = FrameReader::new(Chunked::new(&input, &[1 << 20]), Framing::U32);
        assert!(matches!(r.read_frame(), Err(FrameError::Truncated { .. })));
        assert!(r.capacity() <= 2 * GROW_STEP, "grew to {}", r.capacity());
        // A frame that does arrive is still read whole, however it is split.
        let big = vec![7u8; 3 << 20];
        let mut wire = Vec::new();
        encode_frame(Framing::U32, &big, &mut wire).unwrap();
        let mut r = FrameReader::new(Chunked::new(&wire, &[100_000]), Framing::U32);
        assert_eq!(r.read_frame().unwrap().unwrap().len(), 3 << 20);
    }

    #[test]
    fn bad_ascii_header_is_fatal() {
        let frames = decode_all(Framing::Ascii10, b"       -12hello", &[4], 100);
        assert_eq!(frames, ["<bad_header>"]);
        let frames = decode_all(Framing::Ascii10, b"     5    hello", &[4], 100);
        assert_eq!(frames, ["<bad_header>"]);
    }

    #[test]
    fn python_style_ascii10_header_is_read() {
        let mut input = b"         5hello".to_vec();
        input.extend_from_slice(b"0000000003abc");
        assert_eq!(
            decode_all(Framing::Ascii10, &input, &[1], 100),
            ["hello", "abc"]
        );
    }

    #[test]
    fn big_frames_release_their_buffer() {
        let input = encode_all(Framing::U32, &[&vec![7u8; 1 << 20], b"x"]);
        let mut r = FrameReader::new(Chunked::new(&input, &[1 << 16]), Framing::U32);
        assert_eq!(r.read_frame().unwrap().unwrap().len(), 1 << 20);
        assert_eq!(r.read_frame().unwrap().unwrap(), b"x");
        assert_eq!(r.read_frame().unwrap(), None);
        assert!(
            r.capacity() <= INITIAL_BUF,
            "an idle reader keeps no big buffer"
        );
    }

    #[test]
    fn a_reader_with_a_small_limit_reserves_no_more_than_it() {
        // The chat's limit: 64 KiB lines. A line that grows the buffer past 64 KiB moves it
        // into a reservation of the largest buffer the reader can use, not of 34 MiB.
        let limits = Limits {
            max_line: 64 << 10,
            ..Limits::default()
        };
        let line = [vec![b'a'; 64 << 10], b"\n".to_vec()].concat();
        let mut r = FrameReader::with_limits(Chunked::new(&line, &[4096]), Framing::Line, limits);
        assert_eq!(r.read_frame().unwrap().unwrap().len(), 64 << 10);
        assert!(
            r.buf.capacity() <= (64 << 10) + 2,
            "{} bytes reserved",
            r.buf.capacity()
        );
    }

    #[test]
    fn next_buffered_serves_every_frame_of_one_read() {
        let input = b"a\nb\nc\npartial";
        let mut r = FrameReader::new(Chunked::new(input, &[1 << 10]), Framing::Line);
        assert!(r.fill().unwrap());
        let mut got = Vec::new();
        while let Some(f) = r.next_buffered().unwrap() {
            got.push(f.to_vec());
        }
        assert_eq!(got, [b"a", b"b", b"c"]);
        assert_eq!(r.buffered_len(), 7);
        assert!(!r.fill().unwrap());
        assert!(matches!(
            r.finish(),
            Err(FrameError::Truncated { buffered: 7 })
        ));
    }

    #[test]
    fn frames_iterator_goes_on_after_recoverable_errors() {
        let input = b"ok\ntoolongline\nfine\n";
        let r = FrameReader::with_limits(Chunked::new(input, &[5]), Framing::Line, limits(4));
        let got: Vec<_> = r.frames().map(|f| f.map_err(|e| e.reason())).collect();
        assert_eq!(
            got,
            [Ok(b"ok".to_vec()), Err("too_long"), Ok(b"fine".to_vec())]
        );
    }

    /// A reader charged once in use ([`FrameReader::charge_to`]) whose buffer the budget
    /// cannot cover stays on the account: nothing is charged then, and its next growth is
    /// refused, as any reader's past the budget.
    #[test]
    fn a_reader_charged_late_stays_on_the_account_when_its_buffer_is_refused() {
        use crate::budget::Budget;
        let budget = Budget::new("test", 2048);
        let other = budget.account("other", None);
        let _held = other.charge(1024).unwrap();
        let input = [&b"short\n"[..], &[b'x'; 10_000], b"\n"].concat();
        let mut r = FrameReader::new(Chunked::new(&input, &[6, 4096]), Framing::Line);
        assert_eq!(r.read_frame().unwrap(), Some(&b"short"[..]));
        assert!(r.capacity() > 1024, "{}", r.capacity());
        let mine = budget.account("mine", None);
        r.charge_to(Some(&mine));
        assert_eq!((mine.held(), budget.refusals()), (0, 1));
        match r.read_frame() {
            Err(FrameError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::OutOfMemory),
            other => panic!("grew past the budget: {other:?}"),
        }
        assert_eq!(budget.refusals(), 2);
        drop(r);
        assert_eq!(budget.held(), 1024);
    }

    #[test]
    fn property_encode_decode_round_trips_under_arbitrary_splits() {
        let mut rng = Rng::new(42);
        for round in 0..400 {
            let framing = Framing::ALL[round % 4];
            let count = 1 + (rng.below(12) as usize);
            let payloads: Vec<Vec<u8>> = (0..count)
                .map(|_| {
                    let len = match rng.below(10) as usize {
                        0 => 0,
                        1 => 1000 + (rng.below(5000) as usize),
                        _ => rng.below(64) as usize,
                    };
                    let mut p = rng.bytes(len);
                    if framing == Framing::Line {
                        // A line payload cannot hold '\n', nor end in '\r' (that is dropped).
                        p.retain(|&b| b != b'\n');
                        while p.last() == Some(&b'\r') {
                            p.pop();
                        }
                    }
                    p
                })
                .collect();
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let wire = encode_all(framing, &refs);
            let sizes: Vec<usize> = (0..1 + (rng.below(5) as usize))
                .map(|_| 1 + (rng.below(700) as usize))
                .collect();
            let mut r = FrameReader::new(Chunked::new(&wire, &sizes), framing);
            for p in &payloads {
                assert_eq!(
                    r.read_frame().unwrap().unwrap(),
                    &p[..],
                    "{framing} {sizes:?}"
                );
            }
            assert_eq!(r.read_frame().unwrap(), None);
        }
    }
}
