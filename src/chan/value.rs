//! What travels through a channel: a [`Value`] is an Erlang data term that may also hold
//! channels. It crosses the network as a [`Term`], each channel written as
//! `{remote_chan,Host,Port}`; [`Node::export`](super::Node::export) and
//! [`Node::import`](super::Node::import) convert at that edge.

use super::{Chan, ChanError};
use crate::term::Term;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A message: [`Term`]'s data variants, plus channels anywhere inside.
///
/// Like [`Term`], its derived `Clone`, `Drop` and `PartialEq` recurse; values parsed off the
/// wire are kept shallow by the term [`Limits`](crate::term::Limits).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An atom, by name.
    Atom(String),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A `"..."` string.
    Str(String),
    /// `{A,B,...}`
    Tuple(Vec<Value>),
    /// `[A,B,...]`
    List(Vec<Value>),
    /// A channel, local or remote.
    Chan(Chan),
}

impl Value {
    /// `Value::Atom` of `name`.
    pub fn atom(name: &str) -> Value {
        Value::Atom(name.to_owned())
    }

    /// `Value::Str` of `text`.
    pub fn str(text: &str) -> Value {
        Value::Str(text.to_owned())
    }

    /// `Value::Int`.
    pub fn int(value: i64) -> Value {
        Value::Int(value)
    }

    /// `Value::Tuple`.
    pub fn tuple(items: Vec<Value>) -> Value {
        Value::Tuple(items)
    }

    /// `Value::List`.
    pub fn list(items: Vec<Value>) -> Value {
        Value::List(items)
    }

    /// The name of an atom.
    pub fn as_atom(&self) -> Option<&str> {
        match self {
            Value::Atom(name) => Some(name),
            _ => None,
        }
    }

    /// Whether this is the atom `name`.
    pub fn is_atom(&self, name: &str) -> bool {
        self.as_atom() == Some(name)
    }

    /// The value of an integer.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(value) => Some(*value),
            _ => None,
        }
    }

    /// The elements of a tuple.
    pub fn as_tuple(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The elements of a list.
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) => Some(items),
            _ => None,
        }
    }

    /// The channel, if this is one.
    pub fn as_chan(&self) -> Option<&Chan> {
        match self {
            Value::Chan(chan) => Some(chan),
            _ => None,
        }
    }

    /// Splits `{tag,A,B}` into `("tag", [A, B])`, as [`Term::tagged`].
    pub fn tagged(&self) -> Option<(&str, &[Value])> {
        let (tag, rest) = self.as_tuple()?.split_first()?;
        Some((tag.as_atom()?, rest))
    }

    /// The term, every channel replaced by what `export` makes of it.
    pub(crate) fn to_term(
        &self,
        export: &mut impl FnMut(&Chan) -> Result<Term, ChanError>,
    ) -> Result<Term, ChanError> {
        Ok(match self {
            Value::Atom(name) => Term::Atom(name.clone()),
            Value::Int(value) => Term::Int(*value),
            Value::Float(value) => Term::Float(*value),
            Value::Str(text) => Term::Str(text.clone()),
            Value::Tuple(items) => Term::Tuple(Self::terms(items, export)?),
            Value::List(items) => Term::List(Self::terms(items, export)?),
            Value::Chan(chan) => export(chan)?,
        })
    }

    fn terms(
        items: &[Value],
        export: &mut impl FnMut(&Chan) -> Result<Term, ChanError>,
    ) -> Result<Vec<Term>, ChanError> {
        items.iter().map(|item| item.to_term(export)).collect()
    }

    /// The value, every `{remote_chan,Host,Port}` replaced by what `import` makes of it.
    pub(crate) fn from_term(term: Term, import: &mut impl FnMut(Host, u16) -> Chan) -> Value {
        if let Some((host, port)) = remote_chan_parts(&term) {
            return Value::Chan(import(host, port));
        }
        match term {
            Term::Atom(name) => Value::Atom(name),
            Term::Int(value) => Value::Int(value),
            Term::Float(value) => Value::Float(value),
            Term::Str(text) => Value::Str(text),
            Term::Tuple(items) => Value::Tuple(Self::values(items, import)),
            Term::List(items) => Value::List(Self::values(items, import)),
        }
    }

    fn values(items: Vec<Term>, import: &mut impl FnMut(Host, u16) -> Chan) -> Vec<Value> {
        items
            .into_iter()
            .map(|item| Value::from_term(item, import))
            .collect()
    }

    /// The value, every channel in it replaced by what `f` makes of it.
    pub(crate) fn map_chans(self, f: &mut impl FnMut(Chan) -> Chan) -> Value {
        match self {
            Value::Chan(chan) => Value::Chan(f(chan)),
            Value::Tuple(items) => {
                Value::Tuple(items.into_iter().map(|v| v.map_chans(f)).collect())
            }
            Value::List(items) => Value::List(items.into_iter().map(|v| v.map_chans(f)).collect()),
            scalar => scalar,
        }
    }
}

/// Plain data: a `{remote_chan,...}` tuple stays a tuple (use
/// [`Node::import`](super::Node::import) to get channels).
impl From<Term> for Value {
    fn from(term: Term) -> Value {
        match term {
            Term::Atom(name) => Value::Atom(name),
            Term::Int(value) => Value::Int(value),
            Term::Float(value) => Value::Float(value),
            Term::Str(text) => Value::Str(text),
            Term::Tuple(items) => Value::Tuple(items.into_iter().map(Value::from).collect()),
            Term::List(items) => Value::List(items.into_iter().map(Value::from).collect()),
        }
    }
}

impl From<Chan> for Value {
    fn from(chan: Chan) -> Value {
        Value::Chan(chan)
    }
}

impl From<&Chan> for Value {
    fn from(chan: &Chan) -> Value {
        Value::Chan(chan.clone())
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Value {
        Value::Int(value)
    }
}

/// `{remote_chan,Host,Port}`.
pub(crate) fn remote_chan_term(host: &Host, port: u16) -> Term {
    Term::Tuple(vec![
        Term::atom("remote_chan"),
        host.to_term(),
        Term::Int(port.into()),
    ])
}

/// `{remote_chan,Host,Port}` with a host this codec understands and a port in 1..=65535.
fn remote_chan_parts(term: &Term) -> Option<(Host, u16)> {
    let (tag, [host, port]) = term.tagged()? else {
        return None;
    };
    if tag != "remote_chan" {
        return None;
    }
    let port = u16::try_from(port.as_int()?).ok().filter(|&p| p != 0)?;
    Some((Host::from_term(host)?, port))
}

/// Where a remote channel lives: an address, as the course writes it (`{127,0,0,1}`), or a
/// host name (`localhost`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IPv4 or IPv6 address: `{A,B,C,D}` or Erlang's 8-tuple of 16-bit groups.
    Ip(IpAddr),
    /// A name, resolved when a connection is made (`localhost`, or `'node.example'`).
    Name(String),
}

impl Host {
    /// The address this host names without a DNS query: an IP as is, `localhost` as
    /// 127.0.0.1 (Erlang's `gen_tcp` resolves it to IPv4 by default); other names `None`.
    pub fn literal_ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip(ip) => Some(*ip),
            Host::Name(name) if name.eq_ignore_ascii_case("localhost") => {
                Some(Ipv4Addr::LOCALHOST.into())
            }
            Host::Name(_) => None,
        }
    }

    /// `{127,0,0,1}`, an 8-tuple for IPv6, or the name as an atom.
    pub fn to_term(&self) -> Term {
        match self {
            Host::Ip(IpAddr::V4(ip)) => {
                Term::Tuple(ip.octets().iter().map(|&o| Term::Int(o.into())).collect())
            }
            Host::Ip(IpAddr::V6(ip)) => {
                Term::Tuple(ip.segments().iter().map(|&s| Term::Int(s.into())).collect())
            }
            Host::Name(name) => Term::Atom(name.clone()),
        }
    }

    /// Reads an address tuple, or a name written as an atom or a string.
    pub fn from_term(term: &Term) -> Option<Host> {
        if let Some(parts) = term.as_tuple() {
            let ints: Option<Vec<i64>> = parts.iter().map(Term::as_int).collect();
            return match ints?.as_slice() {
                [a, b, c, d] => {
                    let octets = [*a, *b, *c, *d].map(|o| u8::try_from(o).ok());
                    let [a, b, c, d] = octets;
                    Some(Host::Ip(Ipv4Addr::new(a?, b?, c?, d?).into()))
                }
                groups @ [_, _, _, _, _, _, _, _] => {
                    let mut segments = [0u16; 8];
                    for (segment, &group) in segments.iter_mut().zip(groups) {
                        *segment = u16::try_from(group).ok()?;
                    }
                    Some(Host::Ip(Ipv6Addr::from(segments).into()))
                }
                _ => None,
            };
        }
        let name = match term {
            Term::Atom(name) => name.clone(),
            other => other.as_text()?,
        };
        (!name.is_empty()).then_some(Host::Name(name))
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl From<IpAddr> for Host {
    fn from(ip: IpAddr) -> Host {
        Host::Ip(ip)
    }
}

/// An IP literal, or else a name (`localhost`); never fails.
impl FromStr for Host {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Host, Self::Err> {
        Ok(s.parse::<IpAddr>()
            .map_or_else(|_| Host::Name(s.to_owned()), Host::Ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::term::parse;

    fn host(text: &str) -> Option<Host> {
        Host::from_term(&parse(text).unwrap())
    }

    #[test]
    fn hosts_in_every_spelling() {
        let v4 = Host::Ip(Ipv4Addr::LOCALHOST.into());
        assert_eq!(host("{127,0,0,1}"), Some(v4.clone()));
        assert_eq!(v4.to_term().to_string(), "{127,0,0,1}");
        assert_eq!(host("localhost"), Some(Host::Name("localhost".into())));
        assert_eq!(host("\"localhost\""), Some(Host::Name("localhost".into())));
        assert_eq!(host("[108,111]"), Some(Host::Name("lo".into())));
        let v6 = host("{0,0,0,0,0,0,0,1}").unwrap();
        assert_eq!(v6, Host::Ip(Ipv6Addr::LOCALHOST.into()));
        assert_eq!(v6.to_term().to_string(), "{0,0,0,0,0,0,0,1}");
        assert_eq!(Host::Name("a.b".into()).to_term().to_string(), "'a.b'");
        for bad in [
            "{256,0,0,1}",
            "{1,2,3}",
            "{-1,0,0,1}",
            "\"\"",
            "[]",
            "1",
            "{a,0,0,1}",
        ] {
            assert_eq!(host(bad), None, "{bad}");
        }
        assert_eq!(
            Host::Name("LocalHost".into()).literal_ip(),
            Some(Ipv4Addr::LOCALHOST.into())
        );
        assert_eq!(Host::Name("example.org".into()).literal_ip(), None);
        assert_eq!(
            "10.0.0.7".parse::<Host>(),
            Ok(Host::Ip([10, 0, 0, 7].into()))
        );
        assert_eq!(
            "localhost".parse::<Host>(),
            Ok(Host::Name("localhost".into()))
        );
    }

    #[test]
    fn remote_chan_shapes() {
        let parts = |text: &str| remote_chan_parts(&parse(text).unwrap());
        assert_eq!(
            parts("{remote_chan,{127,0,0,1},40123}"),
            Some((Host::Ip(Ipv4Addr::LOCALHOST.into()), 40123))
        );
        assert_eq!(
            parts("{remote_chan,localhost,1}"),
            Some((Host::Name("localhost".into()), 1))
        );
        for not in [
            "{remote_chan,{127,0,0,1},0}",
            "{remote_chan,{127,0,0,1},65536}",
            "{remote_chan,{127,0,0,1}}",
            "{remote_chan,{127,0,0,1},1,2}",
            "{local_chan,{127,0,0,1},1}",
            "{remote_chan,1,1}",
            "remote_chan",
        ] {
            assert_eq!(parts(not), None, "{not}");
        }
    }

    #[test]
    fn plain_terms_convert_both_ways() {
        let term = parse(r#"{a,-1,2.5,"s",[x,{}],{remote_chan,{127,0,0,1},5}}"#).unwrap();
        let value = Value::from(term.clone());
        assert_eq!(
            value.tagged().map(|(tag, rest)| (tag, rest.len())),
            Some(("a", 5))
        );
        assert_eq!(value.as_tuple().unwrap()[1].as_int(), Some(-1));
        assert_eq!(
            value.as_tuple().unwrap()[4].as_list().map(<[_]>::len),
            Some(2)
        );
        let back = value.to_term(&mut |_| unreachable!("no channels")).unwrap();
        assert_eq!(back, term);
    }
}
