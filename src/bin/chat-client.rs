//! The chat client of the seed: joins as NAME, sends each line typed, prints every event
//! (`[JOIN] Name joined the chat`, `[LEAVE] Name left`, `[Name] text`); `exit` leaves.

use argh::FromArgs;
use std::io;
use std::process::ExitCode;
use switchboard::chat::{self, client};

/// Chat from the terminal: every line typed is sent; `exit` (or end of input) leaves.
/// Exits 1 when the server closes the connection.
#[derive(FromArgs)]
struct Args {
    /// server address (default 127.0.0.1:65003)
    #[argh(option, default = "chat::DEFAULT_ADDR.into()")]
    addr: String,
    /// the name to join as
    #[argh(option)]
    name: String,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    match client::run_console(
        &args.addr,
        &args.name,
        io::BufReader::new(io::stdin()),
        io::stdout(),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-client: {e}");
            ExitCode::FAILURE
        }
    }
}
