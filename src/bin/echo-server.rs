//! `echo-server`: the echo server of seed 004, threaded or pipelined.

use argh::FromArgs;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::budget::Budget;
use switchboard::echo::{EchoConfig, EchoServer, Mode, Transform, DEFAULT_ADDR};
use switchboard::framing::Framing;
use switchboard::pipeline::DEFAULT_WRITE_TIMEOUT;
use switchboard::server::{on_termination, ServerConfig};

/// Echo server of seed 004: every message comes back, optionally upper-cased.
#[derive(FromArgs)]
struct Args {
    /// address to listen on (default 127.0.0.1:12345; port 0 picks a free port)
    #[argh(option, default = "DEFAULT_ADDR.to_owned()")]
    listen: String,
    /// line, ascii10 (default: the seed's message.py), u16 or u32
    #[argh(option, default = "Framing::Ascii10")]
    framing: Framing,
    /// threaded (default: each connection's thread replies) or pipeline (readers → transform
    /// workers → sender)
    #[argh(option, default = "Mode::Threaded")]
    mode: Mode,
    /// none (default) or upper (Unicode upper case of UTF-8 messages)
    #[argh(option, default = "Transform::None")]
    transform: Transform,
    /// transform threads in pipeline mode (default 2)
    #[argh(option, default = "2", from_str_fn(at_least_one))]
    workers: usize,
    /// sender threads in pipeline mode (default 2)
    #[argh(option, default = "2", from_str_fn(at_least_one))]
    senders: usize,
    /// milliseconds (at least 1) a client's replies may wait for room in its socket
    /// before the pipeline drops it as not reading; nobody else waits meanwhile (default
    /// 1000)
    #[argh(option, default = "DEFAULT_WRITE_TIMEOUT.as_millis() as u64")]
    write_timeout_ms: u64,
    /// live connections beyond which new ones are refused (default 10000)
    #[argh(option, default = "10_000", from_str_fn(at_least_one))]
    max_connections: usize,
    /// close a connection that sends nothing for this many seconds, fractions allowed (default: never)
    #[argh(option, from_str_fn(switchboard::cli::positive_seconds))]
    idle_timeout: Option<Duration>,
    /// bytes all clients together may make the server hold (partial frames, queued
    /// replies, frames in flight in the pipeline), k/m/g suffixes allowed: past it the connection holding the most is
    /// closed, with a log line (default 256m)
    #[argh(
        option,
        arg_name = "SIZE",
        default = "switchboard::budget::DEFAULT_MAX_CLIENT_MEMORY",
        from_str_fn(switchboard::cli::client_memory)
    )]
    max_client_memory: usize,
    /// log every connection and disconnection
    #[argh(switch, short = 'v')]
    verbose: bool,
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "expected a whole number of at least 1, got {text:?}"
        )),
    }
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    switchboard::log::set_verbose(args.verbose);
    let mut server = ServerConfig::named("echo");
    server.max_connections = args.max_connections;
    server.idle_timeout = args.idle_timeout;
    server.client_memory = Some(Budget::new("echo", args.max_client_memory));
    let echo = EchoConfig {
        framing: args.framing,
        mode: args.mode,
        transform: args.transform,
        workers: args.workers,
        senders: args.senders,
        write_timeout: Duration::from_millis(args.write_timeout_ms),
        ..EchoConfig::default()
    };
    let server = match EchoServer::bind(&args.listen, server, echo) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("echo-server: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let handle = server.handle();
    if let Err(e) = on_termination(move || handle.shutdown()) {
        eprintln!("echo-server: cannot install the Ctrl-C/SIGTERM handler: {e}");
        return ExitCode::FAILURE;
    }
    server.run();
    ExitCode::SUCCESS
}
