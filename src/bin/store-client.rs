//! A command-line client of the store: one command from the arguments, or a prompt.

use argh::FromArgs;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::framing::Framing;
use switchboard::store;
use switchboard::store::client::console::{self, Answer, Command};
use switchboard::store::client::StoreClient;

/// Talk to a store server: `store KEY VALUE`, `lookup KEY`, `delete KEY`, `stats`, `help`,
/// or no command for an interactive prompt (where quotes group words, and raw protocol
/// lines such as `lookup,k` work too). Exits 1 on an `{error,...}` reply.
#[derive(FromArgs)]
struct Args {
    /// server address (default 127.0.0.1:65002); several, comma-separated (a replicated
    /// store's servers), are tried in turn until one accepts the connection
    #[argh(option, default = "store::DEFAULT_ADDR.into()")]
    addr: String,
    /// framing: line (default), ascii10, u16 or u32; it must be the server's
    #[argh(option, default = "Framing::Line")]
    framing: Framing,
    /// seconds to wait for connecting and for each reply, fractions allowed (default 10)
    #[argh(
        option,
        default = "Duration::from_secs(10)",
        from_str_fn(switchboard::cli::positive_seconds)
    )]
    timeout: Duration,
    /// the command and its arguments, each argument one word (quote a key with spaces)
    #[argh(positional, greedy)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    // A usage mistake is reported before connecting: it needs no server.
    let command = match console::parse_words(&args.command) {
        Ok(command) => command,
        Err(e) => return fail(&e.to_string()),
    };
    if command == Some(Command::Help) {
        println!("{}", console::HELP);
        return ExitCode::SUCCESS;
    }
    let addrs = match switchboard::cli::addresses(&args.addr) {
        Ok(a) => a,
        Err(e) => return fail(&format!("--addr: {e}")),
    };
    // Each address in turn, `timeout` each.
    let mut client = match StoreClient::connect_timeout(&addrs[..], args.framing, args.timeout) {
        Ok(c) => c,
        Err(e) => return fail(&format!("cannot connect to {}: {e}", args.addr)),
    };
    if let Some(command) = command {
        return match console::execute(&mut client, &command) {
            Ok(Answer::Silent) => ExitCode::SUCCESS,
            Ok(Answer::Text(reply)) => {
                println!("{reply}");
                ExitCode::SUCCESS
            }
            Ok(Answer::Error(reply)) => {
                println!("{reply}");
                ExitCode::FAILURE
            }
            Err(e) => fail(&e.to_string()),
        };
    }
    let prompt = format!("{}> ", args.addr);
    match console::run_prompt(
        &mut client,
        &prompt,
        std::io::stdin().lock(),
        std::io::stdout(),
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("store-client: {message}");
    ExitCode::FAILURE
}
