//! The log's records, encoded and decoded; byte layout in the parent module's docs.

#[cfg(test)]
use crate::durable::{self, Frame};
use crate::durable::{crc32, Header};

/// The most key and value bytes one record may hold, together: a length field over it is
/// damage, not a record. Far above anything the server accepts (16 MiB frames by default),
/// and it keeps a resynchronising scan from trusting a wild length.
pub(super) const MAX_BODY: usize = 1 << 30;

pub(super) enum Record<'a> {
    Store(&'a [u8], &'a [u8]),
    Delete(&'a [u8]),
}

pub(super) fn encode_store(key: &[u8], value: &[u8], buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.push(b'S');
    buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
    buf.extend_from_slice(&(value.len() as u32).to_be_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    let crc = crc32(&buf[start..]);
    buf.extend_from_slice(&crc.to_be_bytes());
}

pub(super) fn encode_delete(key: &[u8], buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.push(b'D');
    buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
    buf.extend_from_slice(key);
    let crc = crc32(&buf[start..]);
    buf.extend_from_slice(&crc.to_be_bytes());
}

/// The tag, the key and value lengths and where the body ends, for a record at the start
/// of `data`; `Err` when they are not all there or not plausible.
fn fields(data: &[u8]) -> Result<(u8, usize, usize, usize), Header> {
    let u32_at = |at: usize| -> Result<usize, Header> {
        let b = data.get(at..at + 4).ok_or(Header::Cut)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let tag = *data.first().ok_or(Header::Cut)?;
    let (klen, vlen, start) = match tag {
        b'S' => (u32_at(1)?, u32_at(5)?, 9),
        b'D' => (u32_at(1)?, 0, 5),
        _ => return Err(Header::Bad),
    };
    if klen + vlen > MAX_BODY {
        return Err(Header::Bad);
    }
    Ok((tag, klen, vlen, start + klen + vlen))
}

/// The header of the record at the start of `data` (see [`Header`]).
pub(super) fn header(data: &[u8]) -> Header {
    match fields(data) {
        Ok((_, _, _, body_end)) => Header::Len(body_end + 4),
        Err(header) => header,
    }
}

/// What the bytes at the start of `data` are (see [`Frame`]).
#[cfg(test)]
pub(super) fn frame(data: &[u8]) -> Frame {
    durable::frame(data, header)
}

/// The record in `bytes`, which [`frame`] found intact.
pub(super) fn parse(bytes: &[u8]) -> Option<Record<'_>> {
    let (tag, klen, vlen, end) = fields(bytes).ok()?;
    let body = bytes.get(end - klen - vlen..end)?;
    let (key, value) = body.split_at(klen);
    Some(match tag {
        b'S' => Record::Store(key, value),
        _ => Record::Delete(key),
    })
}

/// Decodes the record at the start of `data`: the record and its length, or `None` if it
/// is incomplete or corrupt.
#[cfg(test)]
pub(super) fn decode_record(data: &[u8]) -> Option<(Record<'_>, usize)> {
    match frame(data) {
        Frame::Intact(len) => Some((parse(&data[..len])?, len)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_every_cut_is_cut() {
        let mut data = Vec::new();
        encode_store(b"key", b"va,\nlue", &mut data);
        let store_len = data.len();
        encode_delete(b"key", &mut data);
        let Some((Record::Store(k, v), len)) = decode_record(&data) else {
            panic!("a store record");
        };
        assert_eq!((k, v, len), (&b"key"[..], &b"va,\nlue"[..], store_len));
        let Some((Record::Delete(k), len)) = decode_record(&data[store_len..]) else {
            panic!("a delete record");
        };
        assert_eq!((k, len), (&b"key"[..], data.len() - store_len));
        for cut in 1..store_len {
            assert_eq!(frame(&data[..cut]), Frame::Cut, "cut at {cut}");
        }
    }

    #[test]
    fn bad_tags_wild_lengths_and_bad_crcs_are_bad() {
        let mut data = Vec::new();
        encode_store(b"k", b"v", &mut data);
        let mut flipped = data.clone();
        flipped[9] ^= 1;
        assert_eq!(frame(&flipped), Frame::Bad(Some(data.len())));
        assert_eq!(frame(&[0; 64]), Frame::Bad(None));
        let mut wild = data.clone();
        wild[1] = 0x7f;
        assert_eq!(frame(&wild), Frame::Bad(None));
    }
}
