//! The interactive `messenger-client`: commands at a prompt, incoming messages printed as
//! they arrive (on a terminal the prompt line is cleared and drawn again, so it is never
//! garbled). While idle it checks its connection every 200 ms, so it fails over without a
//! command. At start it says which servers accept connections, so a mistyped `--servers`
//! or a cluster that is not running shows before the first command.

use super::{run_command, Client, CONNECT_TIMEOUT, HELP};
use crossbeam_channel::{unbounded, RecvTimeoutError};
use std::io::{self, BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

/// How long the console waits for a line before checking its connection.
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// Tries one connection to each server (closed at once; a server takes a connection that
/// closes before its first frame as nothing) and returns what became of each.
pub fn probe(servers: &[SocketAddr]) -> Vec<(SocketAddr, io::Result<()>)> {
    servers
        .iter()
        .map(|&addr| {
            (
                addr,
                TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map(drop),
            )
        })
        .collect()
}

/// One line on what [`probe`] found: `servers: 127.0.0.1:7001 accepts; 127.0.0.1:7002
/// refused`, with a warning when none accepts.
pub fn describe(probed: &[(SocketAddr, io::Result<()>)]) -> String {
    let each: Vec<String> = probed
        .iter()
        .map(|(addr, result)| match result {
            Ok(()) => format!("{addr} accepts"),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => format!("{addr} refused"),
            Err(e) => format!("{addr} unreachable ({e})"),
        })
        .collect();
    let mut line = format!("servers: {}", each.join("; "));
    if probed.iter().all(|(_, r)| r.is_err()) {
        line.push_str("; none is running, so commands will fail until one starts");
    }
    line
}

/// Runs the console until `quit` or the end of `input`: probes the servers, prints the
/// help, then runs each line with [`run_command`]. `terminal` clears and redraws the
/// prompt around incoming messages. Output goes to stdout.
pub fn run_console(mut client: Client, input: impl BufRead + Send + 'static, terminal: bool) {
    let prompt = Arc::new(Mutex::new("> ".to_owned()));
    let show = |text: &str, prompt: &Mutex<String>| {
        let p = prompt.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = io::stdout().lock();
        let _ = write!(out, "{text}{}", *p);
        let _ = out.flush();
    };
    // On a terminal: back to the line start, clear it, print the message, redraw the prompt.
    let clear = if terminal { "\r\x1b[K" } else { "" };
    let (incoming, shown) = (client.deliveries().clone(), Arc::clone(&prompt));
    thread::spawn(move || {
        for d in incoming {
            show(&format!("{clear}{}: {}\n", d.from, d.text), &shown);
        }
    });
    let (tx, lines) = unbounded();
    // Not joined: a blocking read of stdin cannot be interrupted; it ends with the process.
    thread::spawn(move || {
        for line in input.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    show(
        &format!("{}\n{HELP}\n", describe(&probe(client.servers()))),
        &prompt,
    );
    loop {
        match lines.recv_timeout(IDLE_CHECK) {
            Ok(line) => {
                let Some(output) = run_command(&mut client, &line) else {
                    return;
                };
                *prompt.lock().unwrap_or_else(PoisonError::into_inner) =
                    format!("{}> ", client.user().unwrap_or(""));
                show(&format!("{output}\n"), &prompt);
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = client.keep_up();
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = client.quit();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn the_probe_tells_accepting_from_refusing_servers() {
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let down = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let up_addr = up.local_addr().unwrap();
        let line = describe(&probe(&[up_addr, down]));
        assert_eq!(line, format!("servers: {up_addr} accepts; {down} refused"));
        let line = describe(&probe(&[down]));
        assert!(line.ends_with("none is running, so commands will fail until one starts"));
    }
}
