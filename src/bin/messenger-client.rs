//! The interactive messenger client: commands at a prompt, incoming messages printed as
//! they arrive (the prompt line is cleared and drawn again, so it is never garbled). While
//! idle it checks its connection every 200 ms, so it fails over without a command.

use argh::FromArgs;
use crossbeam_channel::{unbounded, RecvTimeoutError};
use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchboard::messenger::client::{run_command, HELP};
use switchboard::messenger::{self, Client};

/// Talk to a messenger cluster: register, login, search, send, logout, delete, quit.
#[derive(FromArgs)]
struct Args {
    /// every server's HOST:PORT by id, comma-separated
    #[argh(option)]
    servers: String,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    let mut client = match messenger::parse_addrs(&args.servers) {
        Ok(servers) => Client::new(servers),
        Err(e) => {
            eprintln!("messenger-client: --servers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let prompt = Arc::new(Mutex::new("> ".to_owned()));
    let show = |text: &str, prompt: &Mutex<String>| {
        let p = prompt.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "{text}{}", *p);
        let _ = out.flush();
    };
    // On a terminal: back to the line start, clear it, print the message, redraw the prompt.
    let clear = if std::io::stdout().is_terminal() {
        "\r\x1b[K"
    } else {
        ""
    };
    let (incoming, shown) = (client.deliveries().clone(), Arc::clone(&prompt));
    std::thread::spawn(move || {
        for d in incoming {
            show(&format!("{clear}{}: {}\n", d.from, d.text), &shown);
        }
    });
    let (tx, lines) = unbounded();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    show(&format!("{HELP}\n"), &prompt);
    loop {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let Some(output) = run_command(&mut client, &line) else {
                    return ExitCode::SUCCESS;
                };
                *prompt.lock().unwrap_or_else(|e| e.into_inner()) =
                    format!("{}> ", client.user().unwrap_or(""));
                show(&format!("{output}\n"), &prompt);
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = client.keep_up();
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = client.quit();
                return ExitCode::SUCCESS;
            }
        }
    }
}
