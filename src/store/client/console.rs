//! The command language of `store-client`: `store KEY VALUE`, `lookup KEY`, `delete KEY`,
//! `stats`, `help`, or a raw protocol line (`lookup,k`). On the command line each argument
//! is one word as the shell gave it; at the prompt, words are split on spaces and quotes
//! (`"a b"`, `'a b'`) group them. Mistakes the server could only answer with a vaguer
//! `{error,...}` (a missing key, a comma in a key) are caught here, with the reason.

use super::{ClientError, StoreClient};
use crate::store::protocol::{self, Reply, Request};
use std::fmt;
use std::io::{BufRead, Write};

/// What `help` prints.
pub const HELP: &str = "\
commands:
  store KEY VALUE   set KEY (no reply; words after KEY are the value, joined by spaces)
  lookup KEY        {just,VALUE} or nothing
  delete KEY        ok or nothing
  stats             the server's counters
  help              this text
  a raw request line, such as lookup,KEY, is sent as typed
quote a key or value that holds spaces: store \"my key\" 'two  spaces'";

/// One command for the server, or `help`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `store KEY VALUE`
    Store {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// `lookup KEY`
    Lookup(String),
    /// `delete KEY`
    Delete(String),
    /// `stats`
    Stats,
    /// `help`: answered here, nothing is sent.
    Help,
    /// A line sent as it is (a raw request such as `lookup,k`, or a word this client does
    /// not know, for the server to judge).
    Raw(String),
}

/// A command this client refuses before sending anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageError {
    /// Too few words for the command; holds its usage line.
    Usage(&'static str),
    /// A key with a comma: the classic protocol ends the key at the first comma, so the
    /// server would see another key (and, for `store`, another value).
    CommaInKey(String),
    /// An empty key, which the server refuses as `missing_key`.
    EmptyKey,
    /// A quote opened at the prompt and never closed.
    UnclosedQuote,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageError::Usage(usage) => write!(f, "usage: {usage}"),
            UsageError::CommaInKey(key) => write!(
                f,
                "the key {key:?} contains a comma, which the store protocol cannot carry \
                 (a key ends at its first comma)"
            ),
            UsageError::EmptyKey => f.write_str("the key is empty"),
            UsageError::UnclosedQuote => f.write_str("a quote is not closed"),
        }
    }
}

impl std::error::Error for UsageError {}

/// Parses a command given as separate words (the command line: each argument one word,
/// spaces and quotes included as given). `Ok(None)` for no words.
///
/// # Errors
/// Too few words, or an empty key or one with a comma.
pub fn parse_words(words: &[String]) -> Result<Option<Command>, UsageError> {
    let Some((verb, args)) = words.split_first() else {
        return Ok(None);
    };
    let command = match verb.as_str() {
        "store" => match args {
            [key, value @ ..] if !value.is_empty() => Command::Store {
                key: checked_key(key)?,
                value: value.join(" "),
            },
            _ => return Err(UsageError::Usage("store KEY VALUE")),
        },
        "lookup" => match args {
            [key] => Command::Lookup(checked_key(key)?),
            _ => return Err(UsageError::Usage("lookup KEY")),
        },
        "delete" => match args {
            [key] => Command::Delete(checked_key(key)?),
            _ => return Err(UsageError::Usage("delete KEY")),
        },
        "stats" if args.is_empty() => Command::Stats,
        "stats" => return Err(UsageError::Usage("stats")),
        "help" => Command::Help,
        _ => Command::Raw(words.join(" ")),
    };
    Ok(Some(command))
}

/// Parses a line typed at the prompt: a raw request (its first word has a comma, or is
/// not a command) is kept as typed; otherwise quotes group words, as in a shell.
///
/// # Errors
/// As [`parse_words`], and an unclosed quote.
pub fn parse_line(line: &str) -> Result<Option<Command>, UsageError> {
    let line = line.trim();
    let first = line.split_whitespace().next().unwrap_or("");
    if first.contains(',') || !["store", "lookup", "delete", "stats", "help"].contains(&first) {
        return Ok((!line.is_empty()).then(|| Command::Raw(line.to_owned())));
    }
    parse_words(&split_words(line)?)
}

/// Splits on whitespace; `"..."` and `'...'` group (and may be empty), and a backslash
/// outside single quotes takes the next character as it is.
///
/// # Errors
/// An unclosed quote.
pub fn split_words(line: &str) -> Result<Vec<String>, UsageError> {
    let (mut words, mut word, mut in_word) = (Vec::new(), String::new(), false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '"' | '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some(q) if q == c => break,
                        Some('\\') if c == '"' => {
                            word.push(chars.next().ok_or(UsageError::UnclosedQuote)?)
                        }
                        Some(other) => word.push(other),
                        None => return Err(UsageError::UnclosedQuote),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.extend(chars.next());
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

fn checked_key(key: &str) -> Result<String, UsageError> {
    if key.is_empty() {
        Err(UsageError::EmptyKey)
    } else if key.contains(',') {
        Err(UsageError::CommaInKey(key.to_owned()))
    } else {
        Ok(key.to_owned())
    }
}

/// What the server said to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Nothing to print: `store` has no reply.
    Silent,
    /// Text to print that is not an error (a reply, or the help).
    Text(String),
    /// An `{error,Reason}` reply, to print as it came.
    Error(String),
}

/// Sends `command` and reads its reply, if it has one (`help` sends nothing).
///
/// # Errors
/// When the request cannot be framed or sent, no reply comes, or the reply is not one of
/// the store's.
pub fn execute(client: &mut StoreClient, command: &Command) -> Result<Answer, ClientError> {
    let mut raw = Vec::new();
    match command {
        Command::Help => return Ok(Answer::Text(HELP.to_owned())),
        Command::Store { key, value } => {
            client.store(key.as_bytes(), value.as_bytes())?;
            return Ok(Answer::Silent);
        }
        Command::Lookup(key) => protocol::format_request(
            &Request::Lookup {
                key: key.as_bytes(),
            },
            &mut raw,
        ),
        Command::Delete(key) => protocol::format_request(
            &Request::Delete {
                key: key.as_bytes(),
            },
            &mut raw,
        ),
        Command::Stats => protocol::format_request(&Request::Stats, &mut raw),
        Command::Raw(line) => raw.extend_from_slice(line.as_bytes()),
    }
    client.queue_raw(&raw)?;
    // A store has no reply; waiting for one would time out. Only one the server reads as
    // a store: `store,k` is answered {error,missing_value}, and left unread, that answer
    // would be taken for the next command's.
    if matches!(protocol::parse(&raw), Ok(Request::Store { .. })) {
        client.flush()?;
        return Ok(Answer::Silent);
    }
    let reply = client.recv()?;
    let text = String::from_utf8_lossy(&reply).into_owned();
    match protocol::parse_reply(&reply) {
        Some(Reply::Error(_)) => Ok(Answer::Error(text)),
        Some(_) => Ok(Answer::Text(text)),
        None => Err(ClientError::Unexpected(reply)),
    }
}

/// The interactive prompt: writes `prompt`, runs each line of `input`, prints its answer
/// (a usage mistake is printed too, and the prompt goes on) until the input ends.
///
/// # Errors
/// When the connection breaks, closes, or a reply does not come in time; a failed write to
/// `output`.
pub fn run_prompt(
    client: &mut StoreClient,
    prompt: &str,
    mut input: impl BufRead,
    mut output: impl Write,
) -> Result<(), ClientError> {
    let mut line = String::new();
    loop {
        output.write_all(prompt.as_bytes())?;
        output.flush()?;
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let answer = match parse_line(&line) {
            Ok(None) => continue,
            Ok(Some(command)) => execute(client, &command),
            Err(e) => Ok(Answer::Text(e.to_string())),
        };
        match answer {
            Ok(Answer::Silent) => {}
            Ok(Answer::Text(text) | Answer::Error(text)) => writeln!(output, "{text}")?,
            Err(
                e @ (ClientError::Frame(_) | ClientError::Closed | ClientError::NoReply { .. }),
            ) => return Err(e),
            Err(e) => writeln!(output, "(error) {e}")?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(ws: &[&str]) -> Vec<String> {
        ws.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn arguments_are_taken_as_given() {
        assert_eq!(
            parse_words(&words(&["store", "a b", "v"])),
            Ok(Some(Command::Store {
                key: "a b".into(),
                value: "v".into()
            }))
        );
        assert_eq!(
            parse_words(&words(&["store", "k", "some", "value"])),
            Ok(Some(Command::Store {
                key: "k".into(),
                value: "some value".into()
            }))
        );
        assert_eq!(
            parse_words(&words(&["lookup", "a b"])),
            Ok(Some(Command::Lookup("a b".into())))
        );
        assert_eq!(parse_words(&[]), Ok(None));
    }

    #[test]
    fn mistakes_are_caught_locally() {
        assert_eq!(
            parse_words(&words(&["store", "k"])),
            Err(UsageError::Usage("store KEY VALUE"))
        );
        assert_eq!(
            parse_words(&words(&["lookup", "a", "b"])),
            Err(UsageError::Usage("lookup KEY"))
        );
        assert_eq!(
            parse_words(&words(&["store", "a,b", "v"])),
            Err(UsageError::CommaInKey("a,b".into()))
        );
        assert_eq!(
            parse_words(&words(&["delete", ""])),
            Err(UsageError::EmptyKey)
        );
        assert_eq!(
            parse_line("store"),
            Err(UsageError::Usage("store KEY VALUE"))
        );
        assert_eq!(parse_line("lookup \"a"), Err(UsageError::UnclosedQuote));
        let e = UsageError::CommaInKey("a,b".into()).to_string();
        assert!(e.contains("comma") && e.contains("a,b"), "{e}");
    }

    #[test]
    fn the_prompt_understands_quotes() {
        assert_eq!(
            parse_line(r#"store "quoted key" x"#),
            Ok(Some(Command::Store {
                key: "quoted key".into(),
                value: "x".into()
            }))
        );
        assert_eq!(
            parse_line(r#"store k 'two  spaces' "" a\ b "q\"q""#),
            Ok(Some(Command::Store {
                key: "k".into(),
                value: "two  spaces  a b q\"q".into()
            }))
        );
        assert_eq!(parse_line("help"), Ok(Some(Command::Help)));
        assert_eq!(parse_line("   "), Ok(None));
    }

    #[test]
    fn raw_lines_are_kept_as_typed() {
        assert_eq!(
            parse_line("lookup,k"),
            Ok(Some(Command::Raw("lookup,k".into())))
        );
        assert_eq!(
            parse_line("store,k,\"a  b\""),
            Ok(Some(Command::Raw("store,k,\"a  b\"".into())))
        );
        assert_eq!(parse_line("bogus"), Ok(Some(Command::Raw("bogus".into()))));
    }
}
