//! The classic store protocol as typed requests and replies: pure functions, no I/O.
//!
//! ```text
//! request                      reply
//! store,KEY,VALUE              (none)
//! lookup,KEY                   {just,VALUE} | nothing
//! delete,KEY                   ok | nothing                      (extension)
//! stats                        {stats,[{uptime_secs,N},...]}     (extension)
//! anything else                {error,Reason}
//! ```
//!
//! KEY runs from the first comma to the next one; VALUE is everything after that, commas,
//! braces and any byte but the frame delimiter included. Keys and values are bytes.

use crate::framing::find_byte;
use std::fmt;

/// One parsed request, borrowing from the frame it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// `store,KEY,VALUE`: set KEY; no reply.
    Store {
        /// The key.
        key: &'a [u8],
        /// The value, exactly as sent.
        value: &'a [u8],
    },
    /// `lookup,KEY`: `{just,VALUE}` or `nothing`.
    Lookup {
        /// The key.
        key: &'a [u8],
    },
    /// `delete,KEY`: `ok` if KEY was present, else `nothing`.
    Delete {
        /// The key.
        key: &'a [u8],
    },
    /// `stats`: counters as a term.
    Stats,
}

/// The verbs, for per-verb counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `store`
    Store = 0,
    /// `lookup`
    Lookup = 1,
    /// `delete`
    Delete = 2,
    /// `stats`
    Stats = 3,
    /// Requests answered with `{error,...}`.
    Error = 4,
}

impl Verb {
    /// Every verb, in counter order.
    pub const ALL: [Verb; 5] = [
        Verb::Store,
        Verb::Lookup,
        Verb::Delete,
        Verb::Stats,
        Verb::Error,
    ];

    /// The verb's word in requests and in `stats`.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Store => "store",
            Verb::Lookup => "lookup",
            Verb::Delete => "delete",
            Verb::Stats => "stats",
            Verb::Error => "error",
        }
    }
}

impl Request<'_> {
    /// The request's verb.
    pub fn verb(&self) -> Verb {
        match self {
            Request::Store { .. } => Verb::Store,
            Request::Lookup { .. } => Verb::Lookup,
            Request::Delete { .. } => Verb::Delete,
            Request::Stats => Verb::Stats,
        }
    }
}

/// Why a request could not be parsed; answered as `{error,Reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// The verb is not one of the above (verbs are case-sensitive; an empty line has none).
    UnknownVerb,
    /// No key, or an empty one.
    MissingKey,
    /// `store,KEY` without a second comma.
    MissingValue,
}

impl ProtocolError {
    /// The `Reason` atom of the `{error,Reason}` reply.
    pub fn reason(self) -> &'static str {
        match self {
            ProtocolError::UnknownVerb => "unknown_verb",
            ProtocolError::MissingKey => "missing_key",
            ProtocolError::MissingValue => "missing_value",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProtocolError::UnknownVerb => "unknown verb",
            ProtocolError::MissingKey => "missing key",
            ProtocolError::MissingValue => "missing value",
        })
    }
}

impl std::error::Error for ProtocolError {}

/// Parses one request frame.
///
/// # Errors
/// A [`ProtocolError`] saying what is wrong; the frame is otherwise ignored.
pub fn parse(frame: &[u8]) -> Result<Request<'_>, ProtocolError> {
    let (verb, rest) = match find_byte(b',', frame) {
        Some(i) => (&frame[..i], Some(&frame[i + 1..])),
        None => (frame, None),
    };
    fn key(rest: Option<&[u8]>) -> Result<&[u8], ProtocolError> {
        match rest {
            Some(k) if !k.is_empty() => Ok(k),
            _ => Err(ProtocolError::MissingKey),
        }
    }
    match verb {
        b"store" => {
            let rest = key(rest)?;
            let comma = find_byte(b',', rest).ok_or(ProtocolError::MissingValue)?;
            let k = &rest[..comma];
            if k.is_empty() {
                return Err(ProtocolError::MissingKey);
            }
            Ok(Request::Store {
                key: k,
                value: &rest[comma + 1..],
            })
        }
        b"lookup" => Ok(Request::Lookup { key: key(rest)? }),
        b"delete" => Ok(Request::Delete { key: key(rest)? }),
        b"stats" => Ok(Request::Stats),
        _ => Err(ProtocolError::UnknownVerb),
    }
}

/// The key of a `lookup,KEY` frame, recognised without the general parser: `Some` for
/// exactly the frames [`parse`] reads as [`Request::Lookup`], `None` for every other one
/// (the fast path of the commonest request; tested against [`parse`]).
#[inline]
pub fn parse_lookup(frame: &[u8]) -> Option<&[u8]> {
    match frame.strip_prefix(b"lookup,") {
        Some(key) if !key.is_empty() => Some(key),
        _ => None,
    }
}

/// The key and value of a `store,KEY,VALUE` frame, recognised without the general parser:
/// `Some` for exactly the frames [`parse`] reads as [`Request::Store`], `None` for every
/// other one (the fast path of the commonest write; tested against [`parse`]).
#[inline]
pub fn parse_store(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = frame.strip_prefix(b"store,")?;
    match find_byte(b',', rest) {
        Some(comma) if comma > 0 => Some((&rest[..comma], &rest[comma + 1..])),
        _ => None,
    }
}

/// Appends a request's payload (no framing) to `out`; the inverse of [`parse`].
pub fn format_request(req: &Request<'_>, out: &mut Vec<u8>) {
    match *req {
        Request::Store { key, value } => {
            out.extend_from_slice(b"store,");
            out.extend_from_slice(key);
            out.push(b',');
            out.extend_from_slice(value);
        }
        Request::Lookup { key } => {
            out.extend_from_slice(b"lookup,");
            out.extend_from_slice(key);
        }
        Request::Delete { key } => {
            out.extend_from_slice(b"delete,");
            out.extend_from_slice(key);
        }
        Request::Stats => out.extend_from_slice(b"stats"),
    }
}

/// Appends `{just,VALUE}`.
pub fn format_just(value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{just,");
    out.extend_from_slice(value);
    out.push(b'}');
}

/// Appends `nothing`.
pub fn format_nothing(out: &mut Vec<u8>) {
    out.extend_from_slice(b"nothing");
}

/// Appends `ok`.
pub fn format_ok(out: &mut Vec<u8>) {
    out.extend_from_slice(b"ok");
}

/// Appends `{error,REASON}`.
pub fn format_error(reason: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{error,");
    out.extend_from_slice(reason.as_bytes());
    out.push(b'}');
}

/// Counters reported by `stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Seconds since the server started.
    pub uptime_secs: u64,
    /// Connections being served now.
    pub live_connections: u64,
    /// Connections served since start.
    pub total_connections: u64,
    /// Connections refused (over `--max-connections`).
    pub refused_connections: u64,
    /// Keys stored.
    pub keys: u64,
    /// Bytes of keys and values stored.
    pub bytes: u64,
    /// Bytes clients make the server hold now (read buffers), of the client memory budget.
    pub client_memory: u64,
    /// The most they ever held at once.
    pub client_memory_peak: u64,
    /// The budget (`--max-client-memory`; 0: none).
    pub client_memory_limit: u64,
    /// Requests by verb, in [`Verb::ALL`] order.
    pub commands: [u64; 5],
}

/// Appends the `stats` reply:
/// `{stats,[{uptime_secs,N},{live_connections,N},{total_connections,N},
/// {refused_connections,N},{keys,N},{bytes,N},{client_memory,N},{client_memory_peak,N},
/// {client_memory_limit,N},{commands,[{store,N},{lookup,N},{delete,N},{stats,N},{error,N}]}]}`
/// (one line, no spaces).
pub fn format_stats(s: &Stats, out: &mut Vec<u8>) {
    use std::io::Write;
    let _ = write!(
        out,
        "{{stats,[{{uptime_secs,{}}},{{live_connections,{}}},{{total_connections,{}}},\
         {{refused_connections,{}}},{{keys,{}}},{{bytes,{}}},{{client_memory,{}}},\
         {{client_memory_peak,{}}},{{client_memory_limit,{}}},{{commands,[",
        s.uptime_secs,
        s.live_connections,
        s.total_connections,
        s.refused_connections,
        s.keys,
        s.bytes,
        s.client_memory,
        s.client_memory_peak,
        s.client_memory_limit
    );
    for (i, verb) in Verb::ALL.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = write!(out, "{{{},{}}}", verb.name(), s.commands[i]);
    }
    out.extend_from_slice(b"]}]}");
}

/// A reply as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `{just,VALUE}`
    Just(&'a [u8]),
    /// `nothing`
    Nothing,
    /// `ok`
    Ok,
    /// `{error,REASON}`
    Error(&'a [u8]),
    /// `{stats,...}`, whole.
    Stats(&'a [u8]),
}

/// Parses a reply frame; `None` when it is none of the replies above.
pub fn parse_reply(frame: &[u8]) -> Option<Reply<'_>> {
    let inner = |prefix: &[u8]| {
        frame
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(b"}"))
    };
    match frame {
        b"nothing" => Some(Reply::Nothing),
        b"ok" => Some(Reply::Ok),
        _ => inner(b"{just,")
            .map(Reply::Just)
            .or_else(|| inner(b"{error,").map(Reply::Error))
            .or_else(|| inner(b"{stats,").map(|_| Reply::Stats(frame))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn classic_requests() {
        assert_eq!(
            parse(b"store,k,v"),
            Ok(Request::Store {
                key: b"k",
                value: b"v"
            })
        );
        assert_eq!(
            parse(b"store,ping,{remote_chan,{127,0,0,1},40123}"),
            Ok(Request::Store {
                key: b"ping",
                value: b"{remote_chan,{127,0,0,1},40123}"
            })
        );
        assert_eq!(
            parse(b"store,k,a, b,,c\t\xff"),
            Ok(Request::Store {
                key: b"k",
                value: b"a, b,,c\t\xff"
            })
        );
        assert_eq!(
            parse(b"store,k,"),
            Ok(Request::Store {
                key: b"k",
                value: b""
            })
        );
        assert_eq!(parse(b"lookup,k"), Ok(Request::Lookup { key: b"k" }));
        assert_eq!(parse(b"lookup,a,b"), Ok(Request::Lookup { key: b"a,b" }));
        assert_eq!(parse(b"delete,k"), Ok(Request::Delete { key: b"k" }));
        assert_eq!(parse(b"stats"), Ok(Request::Stats));
        assert_eq!(parse(b"stats,ignored"), Ok(Request::Stats));
    }

    #[test]
    fn malformed_requests() {
        assert_eq!(parse(b""), Err(ProtocolError::UnknownVerb));
        assert_eq!(parse(b"STORE,k,v"), Err(ProtocolError::UnknownVerb));
        assert_eq!(parse(b"get k"), Err(ProtocolError::UnknownVerb));
        assert_eq!(parse(b"store"), Err(ProtocolError::MissingKey));
        assert_eq!(parse(b"store,"), Err(ProtocolError::MissingKey));
        assert_eq!(parse(b"store,,v"), Err(ProtocolError::MissingKey));
        assert_eq!(parse(b"store,k"), Err(ProtocolError::MissingValue));
        assert_eq!(parse(b"lookup"), Err(ProtocolError::MissingKey));
        assert_eq!(parse(b"lookup,"), Err(ProtocolError::MissingKey));
        assert_eq!(parse(b"delete"), Err(ProtocolError::MissingKey));
        assert_eq!(ProtocolError::MissingValue.reason(), "missing_value");
    }

    /// Frames near `lookup,KEY` in every way: case, spacing, missing and doubled commas,
    /// `\r`, invalid UTF-8, other verbs, and random mixes of those bytes.
    pub(crate) fn lookalike_frames() -> Vec<Vec<u8>> {
        let mut frames: Vec<Vec<u8>> = [
            &b"lookup,k"[..],
            b"lookup,",
            b"lookup",
            b"lookup,,",
            b"lookup,,k",
            b"lookup,k,",
            b"lookup,a,b",
            b"lookup ,k",
            b" lookup,k",
            b"lookup, k",
            b"lookup,k ",
            b"lookup\t,k",
            b"Lookup,k",
            b"LOOKUP,k",
            b"lookupx,k",
            b"lookup;k",
            b"lookup.k",
            b"lookup,k\r",
            b"lookup,\r",
            b"lookup,\xff\xfe",
            b"lookup\xff,k",
            b"lookup,{a,b}",
            b"lookup,key:00000001",
            b"{lookup,k}",
            b"lookup k",
            b"look,k",
            b"lookup\0,k",
            b"store,k,v",
            b"store,k,",
            b"store,k",
            b"store,,v",
            b"store,",
            b"store",
            b"store,k,v,w",
            b"store,k,,",
            b"store ,k,v",
            b"Store,k,v",
            b"stor,k,v",
            b"store;k,v",
            b"store,key:00000001,vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv",
            b"store,\xff,\xfe",
            b"store,k\r,v\r",
            b"store,lookup,k",
            b"delete,k",
            b"stats",
            b"stats,lookup,k",
            b"",
            b",",
        ]
        .iter()
        .map(|f| f.to_vec())
        .collect();
        let mut rng = crate::bench::Rng::new(22);
        let alphabet = b"lookup,k \t\r\xff{}Ls";
        for i in 0..4000 {
            // Mostly mutations of a lookup or a store, so the prefix is often nearly right.
            let mut f = if i % 2 == 0 {
                b"lookup,key".to_vec()
            } else {
                b"store,key,v,w".to_vec()
            };
            for _ in 0..rng.below(4) {
                let at = rng.below(f.len() as u64 + 1) as usize;
                let byte = alphabet[rng.below(alphabet.len() as u64) as usize];
                match rng.below(3) {
                    0 if at < f.len() => f[at] = byte,
                    1 if at < f.len() => {
                        f.remove(at);
                    }
                    _ => f.insert(at, byte),
                }
            }
            frames.push(f);
            let len = rng.below(12) as usize;
            frames.push(
                (0..len)
                    .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
                    .collect(),
            );
        }
        frames
    }

    #[test]
    fn the_lookup_fast_path_agrees_with_parse() {
        let mut lookups = 0;
        for frame in lookalike_frames() {
            let general = match parse(&frame) {
                Ok(Request::Lookup { key }) => Some(key),
                _ => None,
            };
            assert_eq!(parse_lookup(&frame), general, "{frame:?}");
            lookups += usize::from(general.is_some());
        }
        assert!(
            lookups > 100,
            "too few lookups among the samples: {lookups}"
        );
    }

    #[test]
    fn the_store_fast_path_agrees_with_parse() {
        let mut stores = 0;
        for frame in lookalike_frames() {
            let general = match parse(&frame) {
                Ok(Request::Store { key, value }) => Some((key, value)),
                _ => None,
            };
            assert_eq!(parse_store(&frame), general, "{frame:?}");
            stores += usize::from(general.is_some());
        }
        assert!(stores > 100, "too few stores among the samples: {stores}");
    }

    #[test]
    fn requests_round_trip() {
        for req in [
            Request::Store {
                key: b"k",
                value: b"v,w",
            },
            Request::Lookup { key: b"k" },
            Request::Delete { key: b"k" },
            Request::Stats,
        ] {
            let mut out = Vec::new();
            format_request(&req, &mut out);
            assert_eq!(parse(&out), Ok(req));
        }
    }

    #[test]
    fn replies_byte_by_byte() {
        let mut out = Vec::new();
        format_just(b"{a,b}", &mut out);
        assert_eq!(out, b"{just,{a,b}}");
        assert_eq!(parse_reply(&out), Some(Reply::Just(b"{a,b}")));
        out.clear();
        format_error("unknown_verb", &mut out);
        assert_eq!(out, b"{error,unknown_verb}");
        assert_eq!(parse_reply(&out), Some(Reply::Error(b"unknown_verb")));
        assert_eq!(parse_reply(b"nothing"), Some(Reply::Nothing));
        assert_eq!(parse_reply(b"ok"), Some(Reply::Ok));
        assert_eq!(parse_reply(b"{just,}"), Some(Reply::Just(b"")));
        assert_eq!(parse_reply(b"{just,x"), None);
        assert_eq!(parse_reply(b"maybe"), None);
    }

    #[test]
    fn stats_is_one_term() {
        let mut out = Vec::new();
        let s = Stats {
            uptime_secs: 3,
            keys: 2,
            commands: [5, 4, 3, 2, 1],
            ..Stats::default()
        };
        format_stats(&s, &mut out);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "{stats,[{uptime_secs,3},{live_connections,0},{total_connections,0},\
             {refused_connections,0},{keys,2},{bytes,0},{client_memory,0},\
             {client_memory_peak,0},{client_memory_limit,0},{commands,[{store,5},{lookup,4},\
             {delete,3},{stats,2},{error,1}]}]}"
        );
        assert!(matches!(parse_reply(&out), Some(Reply::Stats(_))));
        crate::term::parse_bytes(&out).expect("stats reply is Erlang term text");
    }
}
