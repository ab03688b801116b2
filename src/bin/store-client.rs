//! A command-line client of the store: one command from the arguments, or a prompt.

use argh::FromArgs;
use std::io::{BufRead, Write};
use std::process::ExitCode;
use switchboard::framing::Framing;
use switchboard::store::client::{ClientError, StoreClient};
use switchboard::store::{self, protocol::parse_reply};

/// Talk to a store server: `store KEY VALUE`, `lookup KEY`, `delete KEY`, `stats`, or no
/// command for an interactive prompt (where raw protocol lines such as `lookup,k` work too).
#[derive(FromArgs)]
struct Args {
    /// server address (default 127.0.0.1:65002)
    #[argh(option, default = "store::DEFAULT_ADDR.into()")]
    addr: String,
    /// framing: line (default), ascii10, u16 or u32
    #[argh(option, default = "Framing::Line")]
    framing: Framing,
    /// the command and its arguments
    #[argh(positional, greedy)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    let mut client = match StoreClient::connect(&args.addr, args.framing) {
        Ok(c) => c,
        Err(e) => return fail(&format!("cannot connect to {}: {e}", args.addr)),
    };
    if !args.command.is_empty() {
        return match run(&mut client, &args.command.join(" ")) {
            Ok(Some(reply)) => {
                println!("{reply}");
                ExitCode::SUCCESS
            }
            Ok(None) => ExitCode::SUCCESS,
            Err(e) => fail(&e.to_string()),
        };
    }
    let stdin = std::io::stdin();
    loop {
        print!("{}> ", args.addr);
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).unwrap_or(0) == 0 {
            return ExitCode::SUCCESS;
        }
        match run(&mut client, line.trim_end_matches(['\r', '\n'])) {
            Ok(Some(reply)) => println!("{reply}"),
            Ok(None) => {}
            Err(ClientError::Frame(e)) => return fail(&e.to_string()),
            Err(ClientError::Closed) => return fail("the server closed the connection"),
            Err(e) => println!("(error) {e}"),
        }
    }
}

/// Runs one command (`lookup k`, `store k some value`, or a raw line such as `lookup,k`)
/// and returns the reply to print, if the command has one.
fn run(client: &mut StoreClient, line: &str) -> Result<Option<String>, ClientError> {
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let raw = match word {
        "" => return Ok(None),
        "store" => match rest.split_once(' ') {
            Some((k, v)) => format!("store,{k},{v}"),
            None => return Err(ClientError::Server("usage: store KEY VALUE".into())),
        },
        "lookup" | "delete" => format!("{word},{rest}"),
        _ => line.to_owned(),
    };
    client.queue_raw(raw.as_bytes())?;
    if raw.starts_with("store,") {
        client.flush()?;
        return Ok(None);
    }
    let reply = client.recv()?;
    match parse_reply(&reply) {
        Some(_) => Ok(Some(String::from_utf8_lossy(&reply).into_owned())),
        None => Err(ClientError::Unexpected(reply)),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("store-client: {message}");
    ExitCode::FAILURE
}
