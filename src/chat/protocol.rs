//! The chat wire protocol, pure: a line of Erlang term text in, a typed request out; events
//! and replies in, lines out. Nothing here touches a socket.
//!
//! ```text
//! client → server  {client_join_req,Name}  {send,Name,Text}  {client_leave_req,Name}
//!                  servers  who
//! server → client  {join,Name}  {message,Name,Text}  {leave,Name}  exit  {error,Reason}
//!                  {servers,[Addr,...]}  {clients,[Name,...]}
//! server → server  {server_hello,Id}            first line of a link, from the dialer
//!                  {server_hello,Id,ToId}       the same, to a server it knows the id of
//!                  {server_welcome,Id}          the one line the acceptor answers with
//!                  {update_servers,[Id,...]}    the sender's member list, itself included
//!                  {present,Name}               a client already joined when the link opened
//!                  {join,Name} {message,Name,Text} {leave,Name}   the sender's clients' events
//!                  {server_leave,Id}            the sender is leaving the federation
//!                  heartbeat                    alive, nothing to say (both ways, when idle)
//! Id = {"127.0.0.1:65003",Incarnation}          listen address, and a number new at each start
//! ```
//!
//! Name and Text are read from a string (`"bob"`), a character-code list (`[98,111,98]`) or
//! an atom (`bob`), and always written as strings. The seed's three-element forms
//! `{client_join_req,Name,From}` and `{client_leave_req,Name,From}` are accepted; over TCP
//! the connection is `From`, so the third element is ignored.

use crate::term::{self, Term, TermError};
use std::fmt;

/// Longest name, in bytes of UTF-8.
pub const MAX_NAME: usize = 64;
/// Longest message text, in bytes of UTF-8.
pub const MAX_TEXT: usize = 4096;
/// Longest line, excluding its `\n`: room for the longest text written as a character-code
/// list, with every code up to 7 digits and a comma.
pub const MAX_LINE: usize = 64 << 10;
/// Longest server address in an [`ServerId`].
const MAX_ADDR: usize = 255;
/// Nothing in this protocol nests deeper than `{update_servers,[{Addr,Inc}]}`; a small
/// limit refuses a hostile million-bracket line after a handful of bytes.
const MAX_DEPTH: usize = 8;

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequest {
    /// `{client_join_req,Name}`: join the chat under `Name`.
    Join(String),
    /// `{send,Name,Text}`: say `Text` as `Name`.
    Send {
        /// Who says it; must be the connection's joined name.
        name: String,
        /// What is said.
        text: String,
    },
    /// `{client_leave_req,Name}`: leave the chat.
    Leave(String),
    /// `servers`: ask for the member list of the federation.
    Servers,
    /// `who`: ask for every client this server knows of, here and on the other members.
    Who,
}

/// Something that happened to a client, as every client (and every peer server) is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `{join,Name}`
    Join(String),
    /// `{message,Name,Text}`
    Message {
        /// The sender.
        name: String,
        /// The text.
        text: String,
    },
    /// `{leave,Name}`
    Leave(String),
}

/// One server of a federation: the address it listens on (and is dialled at), and a number
/// chosen anew each time it starts, so a restarted server is a new member, never the old one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId {
    /// `host:port`, as other servers dial it.
    pub addr: String,
    /// Distinguishes successive runs of a server at the same address.
    pub incarnation: u64,
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.addr, self.incarnation)
    }
}

/// The first line of a connection tells a client from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// A client's first request.
    Client(ClientRequest),
    /// `{server_hello,..}`: a server opening a link.
    Server(Hello),
}

/// `{server_hello,From}` or `{server_hello,From,To}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The dialling server.
    pub from: ServerId,
    /// The server it means to reach, when it knows its id (not when joining through an
    /// address): a restarted server at that address refuses, instead of being mistaken
    /// for its predecessor.
    pub to: Option<ServerId>,
}

/// A line on a link between servers, after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    /// `{update_servers,[Id,...]}`
    UpdateServers(Vec<ServerId>),
    /// `{present,Name}`
    Present(String),
    /// `{join,..}`, `{message,..}` or `{leave,..}` of one of the sender's own clients.
    Event(Event),
    /// `{server_leave,Id}`
    Leave(ServerId),
    /// `heartbeat`: nothing to say, but alive (sent both ways on an idle link, see
    /// [`crate::link::Liveness`]).
    Heartbeat,
}

/// The acceptor's answer to `{server_hello,Id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Welcome {
    /// `{server_welcome,Id}`: the link is open; `Id` is who answered.
    Accepted(ServerId),
    /// `{error,Reason}`: the link is refused.
    Refused(String),
}

/// What a client reads: an event or a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerLine {
    /// `{join,..}`, `{message,..}` or `{leave,..}`.
    Event(Event),
    /// `exit`: the server confirms a leave; the connection closes next.
    Exit,
    /// `{error,Reason}`, with `Reason` as term text.
    Error(String),
    /// `{servers,[Addr,...]}`
    Servers(Vec<String>),
    /// `{clients,[Name,...]}`
    Clients(Vec<String>),
}

/// A line that is not a request of this protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// Not one term of Erlang text, or one too deep or too long.
    Term(TermError),
    /// A term, but no request this protocol knows.
    Unknown,
    /// A name that is not text, is empty, longer than [`MAX_NAME`] or holds control characters.
    BadName,
    /// A text that is not text (a string, character-code list or atom).
    BadText,
    /// A text longer than [`MAX_TEXT`] bytes.
    TextTooLong,
    /// A server id that is not `{"host:port",Incarnation}`.
    BadServerId,
}

impl ProtocolError {
    /// The atom a client is answered with: `{error,Reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProtocolError::Term(e) => e.reason_atom(),
            ProtocolError::Unknown => "unknown_request",
            ProtocolError::BadName => "bad_name",
            ProtocolError::BadText => "bad_text",
            ProtocolError::TextTooLong => "text_too_long",
            ProtocolError::BadServerId => "bad_server_id",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Term(e) => write!(f, "not a term: {e}"),
            ProtocolError::Unknown => f.write_str("unknown request"),
            ProtocolError::BadName => write!(
                f,
                "a name must be 1 to {MAX_NAME} bytes of text without control characters"
            ),
            ProtocolError::BadText => f.write_str("a text must be a string, code list or atom"),
            ProtocolError::TextTooLong => write!(f, "text longer than {MAX_TEXT} bytes"),
            ProtocolError::BadServerId => f.write_str("a server id must be {\"host:port\",N}"),
        }
    }
}

impl std::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProtocolError::Term(e) => Some(e),
            _ => None,
        }
    }
}

impl From<TermError> for ProtocolError {
    fn from(e: TermError) -> Self {
        ProtocolError::Term(e)
    }
}

/// Why a client's request was refused: the `{error,Reason}` it is answered with. The
/// connection stays open after every one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The line is not a request (see [`ProtocolError`]).
    Malformed(ProtocolError),
    /// The line is longer than [`MAX_LINE`]; it was skipped unread.
    LineTooLong,
    /// A join under a name already in use in the federation (or lost to another server's
    /// join of it at the same moment).
    NameTaken,
    /// A second join on one connection.
    AlreadyJoined,
    /// A send or leave before joining.
    NotJoined,
    /// A send or leave under another name than the connection joined as.
    NotYourName,
}

impl Refusal {
    /// The reason atom.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(e) => e.reason(),
            Refusal::LineTooLong => "line_too_long",
            Refusal::NameTaken => "name_taken",
            Refusal::AlreadyJoined => "already_joined",
            Refusal::NotJoined => "not_joined",
            Refusal::NotYourName => "not_your_name",
        }
    }
}

impl From<ProtocolError> for Refusal {
    fn from(e: ProtocolError) -> Self {
        Refusal::Malformed(e)
    }
}

fn parse_term(line: &[u8]) -> Result<Term, ProtocolError> {
    let limits = term::Limits {
        max_depth: MAX_DEPTH,
        max_len: MAX_LINE,
        // Room for the longest text as a character-code list and a long server list; a
        // line of one-character terms would otherwise parse to 16 times its 64 KiB.
        max_nodes: MAX_LINE / 4,
    };
    Ok(term::parse_bytes_with(line, &limits)?)
}

/// Parses the first line of a connection.
///
/// # Errors
/// As [`parse_client`] when the line is not a `{server_hello,Id}`; [`ProtocolError::BadServerId`]
/// when it is one with a malformed id.
pub fn parse_opening(line: &[u8]) -> Result<Opening, ProtocolError> {
    let term = parse_term(line)?;
    match term.tagged() {
        Some(("server_hello", [from])) => Ok(Opening::Server(Hello {
            from: server_id(from)?,
            to: None,
        })),
        Some(("server_hello", [from, to])) => Ok(Opening::Server(Hello {
            from: server_id(from)?,
            to: Some(server_id(to)?),
        })),
        _ => client_request(&term).map(Opening::Client),
    }
}

/// Parses a line from a client.
///
/// # Errors
/// When the line is not one term, is no request, or carries a bad name or text.
pub fn parse_client(line: &[u8]) -> Result<ClientRequest, ProtocolError> {
    client_request(&parse_term(line)?)
}

fn client_request(term: &Term) -> Result<ClientRequest, ProtocolError> {
    if term.is_atom("servers") {
        return Ok(ClientRequest::Servers);
    }
    if term.is_atom("who") {
        return Ok(ClientRequest::Who);
    }
    match term.tagged().ok_or(ProtocolError::Unknown)? {
        ("client_join_req", [name] | [name, _]) => Ok(ClientRequest::Join(parse_name(name)?)),
        ("client_leave_req", [name] | [name, _]) => Ok(ClientRequest::Leave(parse_name(name)?)),
        ("send", [name, text]) => Ok(ClientRequest::Send {
            name: parse_name(name)?,
            text: parse_text(text)?,
        }),
        _ => Err(ProtocolError::Unknown),
    }
}

/// Parses a line on a link, after the handshake.
///
/// # Errors
/// When the line is not one of the messages a server sends on a link.
pub fn parse_peer(line: &[u8]) -> Result<PeerMessage, ProtocolError> {
    let term = parse_term(line)?;
    if term.is_atom("heartbeat") {
        return Ok(PeerMessage::Heartbeat);
    }
    if let Some(event) = event(&term)? {
        return Ok(PeerMessage::Event(event));
    }
    match term.tagged().ok_or(ProtocolError::Unknown)? {
        ("update_servers", [Term::List(ids)]) => ids
            .iter()
            .map(server_id)
            .collect::<Result<_, _>>()
            .map(PeerMessage::UpdateServers),
        ("present", [name]) => Ok(PeerMessage::Present(parse_name(name)?)),
        ("server_leave", [id]) => Ok(PeerMessage::Leave(server_id(id)?)),
        _ => Err(ProtocolError::Unknown),
    }
}

/// Parses the acceptor's answer to `{server_hello,Id}`.
///
/// # Errors
/// When the line is neither `{server_welcome,Id}` nor `{error,Reason}`.
pub fn parse_welcome(line: &[u8]) -> Result<Welcome, ProtocolError> {
    let term = parse_term(line)?;
    match term.tagged().ok_or(ProtocolError::Unknown)? {
        ("server_welcome", [id]) => Ok(Welcome::Accepted(server_id(id)?)),
        ("error", [reason]) => Ok(Welcome::Refused(reason.to_string())),
        _ => Err(ProtocolError::Unknown),
    }
}

/// Parses a line a client receives.
///
/// # Errors
/// When the line is none of the lines a server sends to a client.
pub fn parse_server_line(line: &[u8]) -> Result<ServerLine, ProtocolError> {
    let term = parse_term(line)?;
    if term.is_atom("exit") {
        return Ok(ServerLine::Exit);
    }
    if let Some(event) = event(&term)? {
        return Ok(ServerLine::Event(event));
    }
    match term.tagged().ok_or(ProtocolError::Unknown)? {
        ("error", [reason]) => Ok(ServerLine::Error(
            reason.as_text().unwrap_or_else(|| reason.to_string()),
        )),
        ("servers", [Term::List(addrs)]) => addrs
            .iter()
            .map(|a| a.as_text().ok_or(ProtocolError::BadServerId))
            .collect::<Result<_, _>>()
            .map(ServerLine::Servers),
        ("clients", [Term::List(names)]) => names
            .iter()
            .map(parse_name)
            .collect::<Result<_, _>>()
            .map(ServerLine::Clients),
        _ => Err(ProtocolError::Unknown),
    }
}

/// `Some` when `term` is a `{join,..}`, `{message,..}` or `{leave,..}`.
fn event(term: &Term) -> Result<Option<Event>, ProtocolError> {
    Ok(Some(match term.tagged() {
        Some(("join", [name])) => Event::Join(parse_name(name)?),
        Some(("leave", [name])) => Event::Leave(parse_name(name)?),
        Some(("message", [name, text])) => Event::Message {
            name: parse_name(name)?,
            text: parse_text(text)?,
        },
        _ => return Ok(None),
    }))
}

/// A string, a character-code list or an atom, as text.
fn text_of(term: &Term) -> Option<String> {
    term.as_text().or_else(|| term.as_atom().map(str::to_owned))
}

fn parse_name(term: &Term) -> Result<String, ProtocolError> {
    let name = text_of(term).ok_or(ProtocolError::BadName)?;
    let valid = !name.is_empty() && name.len() <= MAX_NAME && !name.chars().any(char::is_control);
    if valid {
        Ok(name)
    } else {
        Err(ProtocolError::BadName)
    }
}

fn parse_text(term: &Term) -> Result<String, ProtocolError> {
    let text = text_of(term).ok_or(ProtocolError::BadText)?;
    if text.len() > MAX_TEXT {
        return Err(ProtocolError::TextTooLong);
    }
    Ok(text)
}

fn server_id(term: &Term) -> Result<ServerId, ProtocolError> {
    let Some([addr, incarnation]) = term.as_tuple() else {
        return Err(ProtocolError::BadServerId);
    };
    let addr = addr.as_text().ok_or(ProtocolError::BadServerId)?;
    let incarnation = incarnation
        .as_int()
        .and_then(|n| u64::try_from(n).ok())
        .ok_or(ProtocolError::BadServerId)?;
    if addr.is_empty() || addr.len() > MAX_ADDR || addr.chars().any(char::is_control) {
        return Err(ProtocolError::BadServerId);
    }
    Ok(ServerId { addr, incarnation })
}

fn id_term(id: &ServerId) -> Term {
    // Incarnations are made from a clock in nanoseconds and fit an i64 until 2262.
    let incarnation = i64::try_from(id.incarnation).unwrap_or(i64::MAX);
    Term::tuple(vec![Term::str(&id.addr), Term::int(incarnation)])
}

fn event_term(event: &Event) -> Term {
    match event {
        Event::Join(name) => Term::tuple(vec![Term::atom("join"), Term::str(name)]),
        Event::Leave(name) => Term::tuple(vec![Term::atom("leave"), Term::str(name)]),
        Event::Message { name, text } => Term::tuple(vec![
            Term::atom("message"),
            Term::str(name),
            Term::str(text),
        ]),
    }
}

/// Appends `term` and a `\n`.
fn write_line(term: &Term, out: &mut Vec<u8>) {
    term.write_to(out);
    out.push(b'\n');
}

/// Appends `{join,"Name"}\n`, `{message,"Name","Text"}\n` or `{leave,"Name"}\n`.
pub fn format_event(event: &Event, out: &mut Vec<u8>) {
    write_line(&event_term(event), out);
}

/// Appends `exit\n`.
pub fn format_exit(out: &mut Vec<u8>) {
    out.extend_from_slice(b"exit\n");
}

/// Appends `{error,Reason}\n`.
pub fn format_error(reason: &str, out: &mut Vec<u8>) {
    write_line(
        &Term::tuple(vec![Term::atom("error"), Term::atom(reason)]),
        out,
    );
}

/// Appends `{servers,["host:port",...]}\n`.
pub fn format_servers(members: &[ServerId], out: &mut Vec<u8>) {
    let addrs = members.iter().map(|id| Term::str(&id.addr)).collect();
    write_line(
        &Term::tuple(vec![Term::atom("servers"), Term::list(addrs)]),
        out,
    );
}

/// Appends `{clients,["Name",...]}\n` with as many of `names`, in order, as fit a line of
/// [`MAX_LINE`] bytes: a longer one would be refused by every client, ours included.
pub fn format_clients(names: &[String], out: &mut Vec<u8>) {
    let mut room = MAX_LINE - "{clients,[]}".len();
    let (mut listed, mut text) = (Vec::new(), Vec::new());
    for name in names {
        let term = Term::str(name);
        text.clear();
        term.write_to(&mut text);
        let cost = text.len() + usize::from(!listed.is_empty());
        if cost > room {
            break;
        }
        room -= cost;
        listed.push(term);
    }
    write_line(
        &Term::tuple(vec![Term::atom("clients"), Term::list(listed)]),
        out,
    );
}

/// Appends `{server_hello,From}\n` or `{server_hello,From,To}\n`.
pub fn format_hello(hello: &Hello, out: &mut Vec<u8>) {
    let mut items = vec![Term::atom("server_hello"), id_term(&hello.from)];
    items.extend(hello.to.as_ref().map(id_term));
    write_line(&Term::tuple(items), out);
}

/// Appends `{server_welcome,Id}\n`.
pub fn format_welcome(me: &ServerId, out: &mut Vec<u8>) {
    write_line(
        &Term::tuple(vec![Term::atom("server_welcome"), id_term(me)]),
        out,
    );
}

/// Appends a link message.
pub fn format_peer(message: &PeerMessage, out: &mut Vec<u8>) {
    let term = match message {
        PeerMessage::UpdateServers(ids) => Term::tuple(vec![
            Term::atom("update_servers"),
            Term::list(ids.iter().map(id_term).collect()),
        ]),
        PeerMessage::Present(name) => Term::tuple(vec![Term::atom("present"), Term::str(name)]),
        PeerMessage::Event(event) => event_term(event),
        PeerMessage::Leave(id) => Term::tuple(vec![Term::atom("server_leave"), id_term(id)]),
        PeerMessage::Heartbeat => Term::atom("heartbeat"),
    };
    write_line(&term, out);
}

/// Appends `{client_join_req,"Name"}\n`, `{send,"Name","Text"}\n`,
/// `{client_leave_req,"Name"}\n` or `servers\n`.
pub fn format_request(request: &ClientRequest, out: &mut Vec<u8>) {
    let term = match request {
        ClientRequest::Join(name) => {
            Term::tuple(vec![Term::atom("client_join_req"), Term::str(name)])
        }
        ClientRequest::Send { name, text } => {
            Term::tuple(vec![Term::atom("send"), Term::str(name), Term::str(text)])
        }
        ClientRequest::Leave(name) => {
            Term::tuple(vec![Term::atom("client_leave_req"), Term::str(name)])
        }
        ClientRequest::Servers => Term::atom("servers"),
        ClientRequest::Who => Term::atom("who"),
    };
    write_line(&term, out);
}

/// How the seed's client prints a line: `[JOIN] Name joined the chat`, `[LEAVE] Name left`,
/// `[Name] Text`. Control characters in names and texts are shown escaped, so a peer
/// cannot drive the terminal; one trailing newline of a text (an Erlang client sends
/// `io:get_line` results as they are) is dropped.
pub fn display(line: &ServerLine) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .flat_map(|c| {
                let shown: Vec<char> = if c.is_control() && c != '\t' {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                shown
            })
            .collect()
    };
    match line {
        ServerLine::Event(Event::Join(name)) => format!("[JOIN] {} joined the chat", clean(name)),
        ServerLine::Event(Event::Leave(name)) => format!("[LEAVE] {} left", clean(name)),
        ServerLine::Event(Event::Message { name, text }) => {
            let text = text.strip_suffix('\n').unwrap_or(text);
            format!("[{}] {}", clean(name), clean(text))
        }
        ServerLine::Exit => "[EXIT] left the chat".to_owned(),
        ServerLine::Error(reason) => format!("[ERROR] {}", clean(reason)),
        ServerLine::Servers(addrs) => format!("[SERVERS] {}", clean(&addrs.join(", "))),
        ServerLine::Clients(names) => format!("[CLIENTS] {}", clean(&names.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<F: FnOnce(&mut Vec<u8>)>(f: F) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn client(text: &str) -> Result<ClientRequest, ProtocolError> {
        parse_client(text.as_bytes())
    }

    fn join(name: &str) -> ClientRequest {
        ClientRequest::Join(name.into())
    }

    #[test]
    fn names_and_texts_as_strings_code_lists_or_atoms() {
        let send = |n: &str, t: &str| ClientRequest::Send {
            name: n.into(),
            text: t.into(),
        };
        assert_eq!(client(r#"{client_join_req,"bob"}"#), Ok(join("bob")));
        assert_eq!(client("{client_join_req,[98,111,98]}"), Ok(join("bob")));
        assert_eq!(client("{client_join_req,bob}"), Ok(join("bob")));
        assert_eq!(
            client("{client_join_req,'Bob Smith'}"),
            Ok(join("Bob Smith"))
        );
        assert_eq!(client(" {client_join_req, \"bob\"} . \r"), Ok(join("bob")));
        assert_eq!(client(r#"{send,"bob","hi!\n"}"#), Ok(send("bob", "hi!\n")));
        assert_eq!(client("{send,bob,[104,105]}"), Ok(send("bob", "hi")));
        assert_eq!(client("{send,bob,hello}"), Ok(send("bob", "hello")));
        assert_eq!(client(r#"{send,bob,""}"#), Ok(send("bob", "")));
        assert_eq!(client("{send,bob,[]}"), Ok(send("bob", "")));
        assert_eq!(
            client(r#"{client_leave_req,"bob"}"#),
            Ok(ClientRequest::Leave("bob".into()))
        );
        assert_eq!(client("servers"), Ok(ClientRequest::Servers));
        assert_eq!(client("who."), Ok(ClientRequest::Who));
    }

    #[test]
    fn the_seeds_from_element_is_accepted_and_ignored() {
        assert_eq!(
            client(r#"{client_join_req,"bob",{myserver,'server@127.0.0.1'}}"#),
            Ok(join("bob"))
        );
        assert_eq!(
            client("{client_leave_req,bob,x}"),
            Ok(ClientRequest::Leave("bob".into()))
        );
    }

    #[test]
    fn bad_requests_say_why() {
        let reason = |text: &str| client(text).unwrap_err().reason();
        assert_eq!(reason("{client_join_req,\"\"}"), "bad_name");
        assert_eq!(reason("{client_join_req,[]}"), "bad_name");
        assert_eq!(reason("{client_join_req,42}"), "bad_name");
        assert_eq!(reason("{client_join_req,\"a\\nb\"}"), "bad_name");
        assert_eq!(reason("{client_join_req,[-1]}"), "bad_name");
        let long = format!("{{client_join_req,\"{}\"}}", "x".repeat(MAX_NAME + 1));
        assert_eq!(reason(&long), "bad_name");
        let longest = format!("{{client_join_req,\"{}\"}}", "é".repeat(MAX_NAME / 2));
        assert_eq!(client(&longest), Ok(join(&"é".repeat(MAX_NAME / 2))));
        assert_eq!(reason("{send,bob,42}"), "bad_text");
        assert_eq!(reason("{send,bob,{a}}"), "bad_text");
        let text = "x".repeat(MAX_TEXT);
        assert!(client(&format!("{{send,bob,\"{text}\"}}")).is_ok());
        assert_eq!(
            reason(&format!("{{send,bob,\"{text}x\"}}")),
            "text_too_long"
        );
        assert_eq!(reason("{send,bob}"), "unknown_request");
        assert_eq!(reason("{send,bob,hi,there}"), "unknown_request");
        assert_eq!(reason("disconnect"), "unknown_request");
        assert_eq!(reason("{1,2}"), "unknown_request");
        assert_eq!(reason("[send,bob,hi]"), "unknown_request");
        assert_eq!(reason("{join,bob}"), "unknown_request");
        assert_eq!(reason("{server_hello,{\"a:1\",1}}"), "unknown_request");
        assert_eq!(reason("{send,bob,hi"), "bad_term");
        assert_eq!(reason("hello world"), "bad_term");
        assert_eq!(reason(""), "bad_term");
        assert_eq!(reason("<0.80.0>"), "unsupported");
        assert_eq!(
            parse_client(b"{send,bob,\"\xff\"}").unwrap_err().reason(),
            "invalid_utf8"
        );
        // A million brackets is over the line limit; a line within it stops at depth 8.
        assert_eq!(reason(&"[".repeat(1_000_000)), "too_long");
        let deep = "{".repeat(MAX_LINE);
        assert_eq!(reason(&deep), "too_deep");
        let e = client(&deep).unwrap_err();
        assert!(std::error::Error::source(&e).is_some());
        assert!(e.to_string().contains("nesting deeper than 8"), "{e}");
        // A line of one-character terms within the line limit is refused by count.
        assert_eq!(reason(&format!("[{}0]", "0,".repeat(20_000))), "too_big");
        let longest = format!("{{send,bob,[{}120]}}", "120,".repeat(MAX_TEXT - 1));
        assert!(
            client(&longest).is_ok(),
            "the longest text as a code list fits"
        );
    }

    #[test]
    fn refusals_have_reason_atoms() {
        assert_eq!(Refusal::NameTaken.reason(), "name_taken");
        assert_eq!(Refusal::NotYourName.reason(), "not_your_name");
        assert_eq!(Refusal::LineTooLong.reason(), "line_too_long");
        assert_eq!(Refusal::from(ProtocolError::BadName).reason(), "bad_name");
        assert_eq!(
            line(|o| format_error("name_taken", o)),
            "{error,name_taken}\n"
        );
    }

    #[test]
    fn a_clients_line_lists_as_many_names_as_fit_one_line() {
        let names: Vec<String> = (0..2_000)
            .map(|i| format!("{i:05}{}", "n".repeat(55)))
            .collect();
        let mut out = Vec::new();
        format_clients(&names, &mut out);
        let line = out.strip_suffix(b"\n").unwrap();
        assert!(line.len() <= MAX_LINE, "{} bytes", line.len());
        assert!(
            line.len() > MAX_LINE - 70,
            "stopped early: {} bytes",
            line.len()
        );
        match parse_server_line(line) {
            Ok(ServerLine::Clients(listed)) => {
                assert!(listed.len() > 900 && listed.len() < names.len());
                assert_eq!(listed[..], names[..listed.len()]);
            }
            other => panic!("{other:?}"),
        }
        let mut few = Vec::new();
        format_clients(&names[..2], &mut few);
        let want = format!("{{clients,[\"{}\",\"{}\"]}}\n", names[0], names[1]);
        assert_eq!(few, want.as_bytes());
    }

    #[test]
    fn events_are_written_with_strings() {
        let msg = Event::Message {
            name: "bob".into(),
            text: "hi \"you\"\n".into(),
        };
        assert_eq!(
            line(|o| format_event(&msg, o)),
            "{message,\"bob\",\"hi \\\"you\\\"\\n\"}\n"
        );
        assert_eq!(
            line(|o| format_event(&Event::Join("bob".into()), o)),
            "{join,\"bob\"}\n"
        );
        assert_eq!(
            line(|o| format_event(&Event::Leave("Zoë".into()), o)),
            "{leave,\"Zoë\"}\n"
        );
        assert_eq!(line(format_exit), "exit\n");
    }

    #[test]
    fn the_opening_line_tells_a_server_from_a_client() {
        let id = ServerId {
            addr: "127.0.0.1:65003".into(),
            incarnation: 17,
        };
        let mut hello = Hello {
            from: id.clone(),
            to: None,
        };
        let text = line(|o| format_hello(&hello, o));
        assert_eq!(text, "{server_hello,{\"127.0.0.1:65003\",17}}\n");
        assert_eq!(
            parse_opening(text.trim_end().as_bytes()),
            Ok(Opening::Server(hello.clone()))
        );
        hello.to = Some(ServerId {
            addr: "127.0.0.1:65004".into(),
            incarnation: 18,
        });
        let text = line(|o| format_hello(&hello, o));
        assert_eq!(
            text,
            "{server_hello,{\"127.0.0.1:65003\",17},{\"127.0.0.1:65004\",18}}\n"
        );
        assert_eq!(
            parse_opening(text.trim_end().as_bytes()),
            Ok(Opening::Server(hello))
        );
        assert_eq!(
            parse_opening(b"{client_join_req,bob}"),
            Ok(Opening::Client(join("bob")))
        );
        for bad in [
            "{server_hello,{\"a:1\",-1}}",
            "{server_hello,{\"\",1}}",
            "{server_hello,{a,1}}",
            "{server_hello,{\"a:1\"}}",
        ] {
            assert_eq!(
                parse_opening(bad.as_bytes()),
                Err(ProtocolError::BadServerId),
                "{bad}"
            );
        }
        let welcome = line(|o| format_welcome(&id, o));
        assert_eq!(welcome, "{server_welcome,{\"127.0.0.1:65003\",17}}\n");
        assert_eq!(
            parse_welcome(welcome.trim_end().as_bytes()),
            Ok(Welcome::Accepted(id))
        );
        assert_eq!(
            parse_welcome(b"{error,duplicate}"),
            Ok(Welcome::Refused("duplicate".into()))
        );
        assert_eq!(parse_welcome(b"ok"), Err(ProtocolError::Unknown));
    }

    #[test]
    fn peer_messages_round_trip() {
        let a = ServerId {
            addr: "127.0.0.1:1".into(),
            incarnation: 1,
        };
        let b = ServerId {
            addr: "[::1]:2".into(),
            incarnation: 1_767_000_000_123_456_789,
        };
        let messages = [
            PeerMessage::UpdateServers(vec![a.clone(), b.clone()]),
            PeerMessage::UpdateServers(vec![]),
            PeerMessage::Present("bob".into()),
            PeerMessage::Event(Event::Join("bob".into())),
            PeerMessage::Event(Event::Message {
                name: "bob".into(),
                text: "a\tb\\c".into(),
            }),
            PeerMessage::Event(Event::Leave("bob".into())),
            PeerMessage::Leave(b),
            PeerMessage::Heartbeat,
        ];
        for m in messages {
            let text = line(|o| format_peer(&m, o));
            assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
            assert_eq!(parse_peer(text.trim_end().as_bytes()), Ok(m), "{text}");
        }
        assert_eq!(
            line(|o| format_peer(&PeerMessage::UpdateServers(vec![a]), o)),
            "{update_servers,[{\"127.0.0.1:1\",1}]}\n"
        );
        assert_eq!(
            line(|o| format_peer(&PeerMessage::Heartbeat, o)),
            "heartbeat\n"
        );
        assert_eq!(
            parse_peer(b"{client_join_req,bob}"),
            Err(ProtocolError::Unknown)
        );
    }

    #[test]
    fn client_side_lines_parse_and_display_like_the_seed() {
        let show = |text: &str| display(&parse_server_line(text.as_bytes()).unwrap());
        assert_eq!(show("{join,\"John\"}"), "[JOIN] John joined the chat");
        assert_eq!(show("{leave,\"John\"}"), "[LEAVE] John left");
        assert_eq!(show("{message,\"John\",\"hi!\\n\"}"), "[John] hi!");
        assert_eq!(show("{message,\"John\",\"\\e[2J\"}"), "[John] \\u{1b}[2J");
        assert_eq!(show("{error,name_taken}"), "[ERROR] name_taken");
        assert_eq!(show("exit"), "[EXIT] left the chat");
        assert_eq!(show("{clients,[\"a\",\"b\"]}"), "[CLIENTS] a, b");
        let names = ["a".to_owned(), "b".to_owned()];
        assert_eq!(
            line(|o| format_clients(&names, o)),
            "{clients,[\"a\",\"b\"]}\n"
        );
        assert_eq!(
            show("{servers,[\"127.0.0.1:1\",\"127.0.0.1:2\"]}"),
            "[SERVERS] 127.0.0.1:1, 127.0.0.1:2"
        );
        let ids = [
            ServerId {
                addr: "127.0.0.1:1".into(),
                incarnation: 5,
            },
            ServerId {
                addr: "127.0.0.1:2".into(),
                incarnation: 6,
            },
        ];
        assert_eq!(
            line(|o| format_servers(&ids, o)),
            "{servers,[\"127.0.0.1:1\",\"127.0.0.1:2\"]}\n"
        );
    }

    #[test]
    fn requests_round_trip() {
        for r in [
            join("bob"),
            ClientRequest::Send {
                name: "bob".into(),
                text: "1 2 3\n".into(),
            },
            ClientRequest::Leave("bob".into()),
            ClientRequest::Servers,
            ClientRequest::Who,
        ] {
            let text = line(|o| format_request(&r, o));
            assert_eq!(client(text.trim_end()), Ok(r));
        }
    }
}
