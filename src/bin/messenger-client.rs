//! The interactive messenger client: commands at a prompt, incoming messages printed as
//! they arrive (see `switchboard::messenger::client::console`).

use argh::FromArgs;
use std::io::IsTerminal;
use std::process::ExitCode;
use switchboard::messenger::client::console;
use switchboard::messenger::Client;

/// Talk to a messenger cluster: register, login, search, send, logout, delete, quit. At
/// start it says which servers accept connections; a command fails within a second when
/// none does.
#[derive(FromArgs)]
struct Args {
    /// every server's HOST:PORT by id, comma-separated
    #[argh(option)]
    servers: String,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    let client = match switchboard::cli::addresses(&args.servers) {
        Ok(servers) => Client::new(servers),
        Err(e) => {
            eprintln!("messenger-client: --servers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stdin = std::io::BufReader::new(std::io::stdin());
    console::run_console(client, stdin, std::io::stdout().is_terminal());
    ExitCode::SUCCESS
}
