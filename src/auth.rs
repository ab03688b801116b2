//! Proof that a server-to-server link's far end knows the cluster secret, without sending
//! the secret: each side sends a fresh nonce and answers the other's with a keyed MAC over
//! both nonces, its side, its identity and the cluster's name, as Erlang distribution
//! answers a cookie challenge. Sans-IO: the link layer carries the bytes.
//!
//! The MAC is SipHash-2-4 (std's `SipHasher`, a keyed pseudo-random function designed for
//! short inputs) under a 128-bit key derived from the secret file. A tag is 64 bits: an
//! attacker without the secret has one guess per connection, which is enough. There is no
//! encryption: whoever can read and inject packets on the path between two members can
//! watch the traffic and hijack an authenticated connection; this protects against other
//! processes that can merely connect, not against an on-path attacker.
//!
//! The exchange (the link layer frames each message):
//!
//! ```text
//! dialer   → acceptor : nonce_d (16 bytes), with the dialer's hello
//! acceptor → dialer   : nonce_a (16 bytes), tag(Acceptor, nonce_a, nonce_d, acceptor id)
//! dialer   → acceptor : tag(Dialer, nonce_d, nonce_a, dialer id)
//! ```
//!
//! Each tag covers both nonces, so an old answer is worthless on a new connection, and its
//! side, so an answer cannot be reflected back to the side that asked.
//!
//! ```
//! use switchboard::auth::{Nonce, Secret, Side};
//!
//! let secret = Secret::from_bytes(b"a cluster secret of 16+ bytes")?;
//! let (dialer, acceptor) = (Nonce::fresh()?, Nonce::fresh()?);
//! let cluster = b"127.0.0.1:7001,127.0.0.1:7002";
//!
//! // The acceptor answers the dialer's nonce; the dialer checks it.
//! let tag = secret.tag(Side::Acceptor, &acceptor, &dialer, b"server 1", cluster);
//! assert!(secret.verify(Side::Acceptor, &acceptor, &dialer, b"server 1", cluster, &tag));
//! // The same tag proves nothing for another identity, side or connection.
//! assert!(!secret.verify(Side::Acceptor, &acceptor, &dialer, b"server 2", cluster, &tag));
//! assert!(!secret.verify(Side::Dialer, &acceptor, &dialer, b"server 1", cluster, &tag));
//! let other = Nonce::fresh()?;
//! assert!(!secret.verify(Side::Acceptor, &acceptor, &other, b"server 1", cluster, &tag));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![allow(deprecated)] // std's SipHasher is deprecated for hash tables, not as a keyed PRF.

use std::fmt;
use std::fs::File;
use std::hash::{Hasher, SipHasher};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The shortest secret accepted, in bytes: below this a secret is guessable offline from
/// one recorded handshake.
pub const MIN_SECRET_LEN: usize = 16;

/// Bytes in a nonce.
pub const NONCE_LEN: usize = 16;

/// Bytes in a tag.
pub const TAG_LEN: usize = 8;

/// Why a secret could not be loaded.
#[derive(Debug)]
pub enum SecretError {
    /// The file could not be opened or read.
    Io(PathBuf, io::Error),
    /// The file (after trimming one trailing newline) is shorter than [`MIN_SECRET_LEN`].
    TooShort(PathBuf, usize),
    /// Other users may read the file.
    WorldReadable(PathBuf, u32),
    /// A secret given in memory is too short.
    TooShortBytes(usize),
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretError::Io(p, e) => write!(f, "cannot read the secret file {}: {e}", p.display()),
            SecretError::TooShort(p, n) => write!(
                f,
                "the secret file {} holds {n} bytes; at least {MIN_SECRET_LEN} are needed",
                p.display()
            ),
            SecretError::WorldReadable(p, mode) => write!(
                f,
                "the secret file {} is readable by other users (mode {mode:o}); \
                 run `chmod 600 {}`",
                p.display(),
                p.display()
            ),
            SecretError::TooShortBytes(n) => {
                write!(
                    f,
                    "a secret of {n} bytes; at least {MIN_SECRET_LEN} are needed"
                )
            }
        }
    }
}

impl std::error::Error for SecretError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SecretError::Io(_, e) => Some(e),
            _ => None,
        }
    }
}

/// Which end of a link computes a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that connected.
    Dialer,
    /// The side that accepted.
    Acceptor,
}

/// A fresh random challenge, never reused.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce(pub [u8; NONCE_LEN]);

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

impl Nonce {
    /// Reads a nonce from the kernel's random source.
    ///
    /// # Errors
    /// When `/dev/urandom` cannot be read; there is no weaker fallback, since a predictable
    /// nonce would let a recorded answer be replayed.
    pub fn fresh() -> io::Result<Nonce> {
        let mut n = [0u8; NONCE_LEN];
        File::open("/dev/urandom")?.read_exact(&mut n)?;
        Ok(Nonce(n))
    }
}

/// The cluster secret, reduced to a 128-bit MAC key. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Secret {
    k0: u64,
    k1: u64,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Loads the secret from a file that only its owner may read. One trailing newline (as
    /// `echo` writes it) is not part of the secret.
    ///
    /// # Errors
    /// A missing or unreadable file, a secret under [`MIN_SECRET_LEN`] bytes, or a file
    /// other users can read.
    pub fn load(path: &Path) -> Result<Secret, SecretError> {
        let io_err = |e| SecretError::Io(path.to_owned(), e);
        let mut file = File::open(path).map_err(io_err)?;
        let mode = file.metadata().map_err(io_err)?.permissions_mode();
        if mode & 0o004 != 0 {
            return Err(SecretError::WorldReadable(path.to_owned(), mode & 0o777));
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_err)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        Secret::from_bytes(&bytes).map_err(|_| SecretError::TooShort(path.to_owned(), bytes.len()))
    }

    /// Derives the key from secret bytes held in memory.
    ///
    /// # Errors
    /// A secret under [`MIN_SECRET_LEN`] bytes.
    pub fn from_bytes(secret: &[u8]) -> Result<Secret, SecretError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShortBytes(secret.len()));
        }
        // Two SipHash passes under fixed, distinct public keys fold a secret of any length
        // into the 128-bit key; the secret's own entropy is what keeps the key unknown.
        let fold = |k0, k1| {
            let mut h = SipHasher::new_with_keys(k0, k1);
            h.write(secret);
            h.finish()
        };
        Ok(Secret {
            k0: fold(0x7377_6974_6368_626f, 0x6172_642d_6b65_7930),
            k1: fold(0x7377_6974_6368_626f, 0x6172_642d_6b65_7931),
        })
    }

    /// The tag `side` sends: it proves knowledge of the secret, bound to this connection's
    /// two nonces (`mine` first), to the sender's `identity` (its role and id) and to the
    /// `cluster` (its member list or room name).
    pub fn tag(
        &self,
        side: Side,
        mine: &Nonce,
        theirs: &Nonce,
        identity: &[u8],
        cluster: &[u8],
    ) -> [u8; TAG_LEN] {
        let mut h = SipHasher::new_with_keys(self.k0, self.k1);
        h.write(b"switchboard-link-v1");
        h.write_u8(match side {
            Side::Dialer => b'D',
            Side::Acceptor => b'A',
        });
        h.write(&mine.0);
        h.write(&theirs.0);
        // Length prefixes keep (identity, cluster) = ("ab", "c") apart from ("a", "bc").
        for field in [identity, cluster] {
            h.write(&(field.len() as u64).to_be_bytes());
            h.write(field);
        }
        h.finish().to_be_bytes()
    }

    /// Checks a tag received from `side`, in time independent of where it differs.
    pub fn verify(
        &self,
        side: Side,
        theirs: &Nonce,
        mine: &Nonce,
        identity: &[u8],
        cluster: &[u8],
        tag: &[u8],
    ) -> bool {
        let want = self.tag(side, theirs, mine, identity, cluster);
        tag.len() == TAG_LEN && want.iter().zip(tag).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
    }
}

/// The three handshake messages as frame payloads: ASCII, so they fit any framing (a
/// `line` frame cannot hold raw random bytes, which may contain `\n`).
///
/// ```text
/// Challenge  "auth1 " hex(nonce_d)                                   38 bytes
/// Answer     "auth2 " hex(nonce_a) " " hex(tag_a) " " hex(identity)  56 + 2·len(identity)
/// Proof      "auth3 " hex(tag_d)                                     22 bytes
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The dialer's nonce, sent right after its hello.
    Challenge(Nonce),
    /// The acceptor's nonce, its tag, and the identity that tag is for.
    Answer(Nonce, [u8; TAG_LEN], Vec<u8>),
    /// The dialer's tag.
    Proof([u8; TAG_LEN]),
}

/// The longest identity an answer may carry: identities are addresses and member terms.
pub const MAX_IDENTITY: usize = 512;

impl Message {
    /// The frame payload.
    pub fn format(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Message::Challenge(n) => {
                out.extend_from_slice(b"auth1 ");
                hex(&n.0, &mut out);
            }
            Message::Answer(n, tag, id) => {
                out.extend_from_slice(b"auth2 ");
                hex(&n.0, &mut out);
                out.push(b' ');
                hex(tag, &mut out);
                out.push(b' ');
                hex(id, &mut out);
            }
            Message::Proof(tag) => {
                out.extend_from_slice(b"auth3 ");
                hex(tag, &mut out);
            }
        }
        out
    }

    /// Reads a frame payload; `None` for anything else (a peer without the secret sends
    /// its service's frames instead).
    pub fn parse(frame: &[u8]) -> Option<Message> {
        let (kind, rest) = (frame.get(..6)?, &frame[6..]);
        let fields: Vec<&[u8]> = rest.split(|b| *b == b' ').collect();
        match (kind, fields.as_slice()) {
            (b"auth1 ", [n]) => Some(Message::Challenge(Nonce(unhex(n)?))),
            (b"auth2 ", [n, tag, id]) if id.len() <= 2 * MAX_IDENTITY => Some(Message::Answer(
                Nonce(unhex(n)?),
                unhex(tag)?,
                unhex_vec(id)?,
            )),
            (b"auth3 ", [tag]) => Some(Message::Proof(unhex(tag)?)),
            _ => None,
        }
    }
}

fn hex(bytes: &[u8], out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
}

fn unhex_vec(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    text.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

fn unhex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    unhex_vec(text)?.try_into().ok()
}

/// Why a server may not start with the given `--secret-file` and addresses.
#[derive(Debug)]
pub enum PolicyError {
    /// The secret file is unusable.
    Secret(SecretError),
    /// An address off this machine, and no secret: anyone who can reach it could join.
    SecretRequired(SocketAddr),
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::Secret(e) => e.fmt(f),
            PolicyError::SecretRequired(a) => write!(
                f,
                "{a} is not a loopback address: server-to-server links there need \
                 --secret-file PATH (a file of at least {MIN_SECRET_LEN} bytes only its owner can read)"
            ),
        }
    }
}

impl std::error::Error for PolicyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PolicyError::Secret(e) => Some(e),
            PolicyError::SecretRequired(_) => None,
        }
    }
}

/// The start-up rule for every server with server-to-server links: with `--secret-file`,
/// the secret is loaded (and must be sound); without it, the server runs only when every
/// address it listens on or dials (`addrs`) is a loopback one, and warns once that any
/// local process can join (`what` names the cluster in that line).
///
/// # Errors
/// An unusable secret file, or no secret with an address off loopback.
pub fn cluster_secret(
    secret_file: Option<&Path>,
    addrs: &[SocketAddr],
    what: &str,
) -> Result<Option<Secret>, PolicyError> {
    if let Some(path) = secret_file {
        return Secret::load(path).map(Some).map_err(PolicyError::Secret);
    }
    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(PolicyError::SecretRequired(*a));
    }
    crate::log_info!(
        "warning: no --secret-file: any local process can join {what} as a member \
         (allowed on loopback only)"
    );
    Ok(None)
}

/// The permission bits of a file; a separate trait so the Unix-only call has one home.
trait PermissionsMode {
    fn permissions_mode(&self) -> u32;
}

impl PermissionsMode for std::fs::Metadata {
    fn permissions_mode(&self) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        self.permissions().mode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn temp_file(name: &str, contents: &[u8], mode: u32) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("switchboard-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn load_refuses_missing_short_and_world_readable_files() {
        let missing = std::env::temp_dir().join("switchboard-auth-no-such-file");
        assert!(matches!(Secret::load(&missing), Err(SecretError::Io(..))));
        let empty = temp_file("empty", b"", 0o600);
        assert!(matches!(
            Secret::load(&empty),
            Err(SecretError::TooShort(_, 0))
        ));
        // Fifteen bytes and a newline: the newline does not count.
        let short = temp_file("short", b"0123456789abcde\n", 0o600);
        assert!(matches!(
            Secret::load(&short),
            Err(SecretError::TooShort(_, 15))
        ));
        let open = temp_file("open", b"0123456789abcdef", 0o644);
        let err = Secret::load(&open).unwrap_err();
        assert!(matches!(err, SecretError::WorldReadable(_, 0o644)));
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let good = temp_file("good", b"0123456789abcdef\n", 0o600);
        let s = Secret::load(&good).unwrap();
        let n = Nonce([7; NONCE_LEN]);
        let same = Secret::from_bytes(b"0123456789abcdef").unwrap();
        assert_eq!(
            s.tag(Side::Dialer, &n, &n, b"x", b"y"),
            same.tag(Side::Dialer, &n, &n, b"x", b"y"),
            "the trailing newline is not part of the secret"
        );
        assert!(!format!("{s:?}").contains("0123"));
    }

    #[test]
    fn a_tag_binds_every_input() {
        let s = Secret::from_bytes(b"0123456789abcdef").unwrap();
        let other = Secret::from_bytes(b"0123456789abcdeF").unwrap();
        let (a, b) = (Nonce([1; NONCE_LEN]), Nonce([2; NONCE_LEN]));
        let t = s.tag(Side::Dialer, &a, &b, b"id 1", b"room");
        assert!(s.verify(Side::Dialer, &a, &b, b"id 1", b"room", &t));
        assert!(!other.verify(Side::Dialer, &a, &b, b"id 1", b"room", &t));
        assert!(!s.verify(Side::Acceptor, &a, &b, b"id 1", b"room", &t));
        assert!(!s.verify(Side::Dialer, &b, &a, b"id 1", b"room", &t));
        assert!(!s.verify(Side::Dialer, &a, &b, b"id 2", b"room", &t));
        assert!(!s.verify(Side::Dialer, &a, &b, b"id 1", b"roon", &t));
        assert!(!s.verify(Side::Dialer, &a, &b, b"id 1r", b"oom", &t));
        assert!(!s.verify(Side::Dialer, &a, &b, b"id 1", b"room", &t[..7]));
        let mut flipped = t;
        flipped[7] ^= 1;
        assert!(!s.verify(Side::Dialer, &a, &b, b"id 1", b"room", &flipped));
    }

    #[test]
    fn a_secret_is_required_off_loopback_only() {
        let lo: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let lo6: SocketAddr = "[::1]:7000".parse().unwrap();
        let lan: SocketAddr = "192.0.2.7:7000".parse().unwrap();
        assert!(matches!(
            cluster_secret(None, &[lo, lo6], "the room"),
            Ok(None)
        ));
        let err = cluster_secret(None, &[lo, lan], "the room").unwrap_err();
        assert!(matches!(err, PolicyError::SecretRequired(a) if a == lan));
        assert!(err.to_string().contains("--secret-file"), "{err}");
        let good = temp_file("policy", b"0123456789abcdef", 0o600);
        assert!(matches!(
            cluster_secret(Some(&good), &[lan], "x"),
            Ok(Some(_))
        ));
        let open = temp_file("policy-open", b"0123456789abcdef", 0o604);
        assert!(matches!(
            cluster_secret(Some(&open), &[lo], "x"),
            Err(PolicyError::Secret(SecretError::WorldReadable(..)))
        ));
    }

    #[test]
    fn handshake_messages_round_trip_and_refuse_anything_else() {
        let n = Nonce([0xab; NONCE_LEN]);
        let msgs = [
            Message::Challenge(n),
            Message::Answer(n, [1; TAG_LEN], b"127.0.0.1:7000".to_vec()),
            Message::Answer(n, [1; TAG_LEN], Vec::new()),
            Message::Proof([0xff; TAG_LEN]),
        ];
        for m in msgs {
            let bytes = m.format();
            assert!(!bytes.contains(&b'\n'));
            assert_eq!(Message::parse(&bytes), Some(m));
        }
        assert_eq!(Message::Challenge(n).format().len(), 38);
        assert_eq!(Message::Proof([0; TAG_LEN]).format().len(), 22);
        for bad in [
            &b""[..],
            b"auth1 ",
            b"auth1 abab",
            b"auth1 ABABABABABABABABABABABABABABABAB",
            b"auth3 00000000000000000",
            b"auth3 0000000000000000 00",
            b"{hello,x}",
            b"auth2 abababababababababababababababab 0101010101010101 7",
        ] {
            assert_eq!(
                Message::parse(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn nonces_are_fresh() {
        let a = Nonce::fresh().unwrap();
        let b = Nonce::fresh().unwrap();
        assert_ne!(a, b);
    }
}
