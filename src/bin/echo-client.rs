//! `echo-client`: the echo client of seed 004.

use argh::FromArgs;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::echo::{run_client, DEFAULT_ADDR};
use switchboard::framing::Framing;

/// Echo client of seed 004: sends each line of standard input as one message and prints
/// each reply as `Received > REPLY`; an empty line or end of input ends it.
#[derive(FromArgs)]
struct Args {
    /// the echo server (default 127.0.0.1:12345)
    #[argh(option, default = "DEFAULT_ADDR.to_owned()")]
    addr: String,
    /// line, ascii10 (default), u16 or u32
    #[argh(option, default = "Framing::Ascii10")]
    framing: Framing,
    /// seconds to wait for the server on any socket operation (default 10)
    #[argh(option, default = "10")]
    timeout: u64,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    let stdin = std::io::stdin();
    // The seed prompts `Say >`; only a person at a terminal needs it.
    let prompt = stdin.is_terminal();
    let timeout = Duration::from_secs(args.timeout.max(1));
    match run_client(
        &args.addr,
        args.framing,
        timeout,
        stdin.lock(),
        std::io::stdout().lock(),
        prompt,
    ) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo-client: {e}");
            ExitCode::FAILURE
        }
    }
}
