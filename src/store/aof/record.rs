//! The log's records, encoded and decoded; byte layout in the parent module's docs.

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

/// Decodes the record at the start of `data`: the record and its length, or `None` if it
/// is incomplete or corrupt.
pub(super) fn decode_record(data: &[u8]) -> Option<(Record<'_>, usize)> {
    let u32_at = |at: usize| -> Option<usize> {
        let b = data.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let (record, body_end) = match data.first()? {
        b'S' => {
            let (klen, vlen) = (u32_at(1)?, u32_at(5)?);
            let key = data.get(9..9 + klen)?;
            let value = data.get(9 + klen..9 + klen + vlen)?;
            (Record::Store(key, value), 9 + klen + vlen)
        }
        b'D' => {
            let klen = u32_at(1)?;
            (Record::Delete(data.get(5..5 + klen)?), 5 + klen)
        }
        _ => return None,
    };
    let crc = u32_at(body_end)? as u32;
    (crc32(&data[..body_end]) == crc).then_some((record, body_end + 4))
}

/// CRC-32 (IEEE 802.3, reflected, as zlib), table-driven.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !bytes.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
