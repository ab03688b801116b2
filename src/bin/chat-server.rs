//! The chat server ("Chatty"): clients join, talk and leave; with `--join`, it becomes one
//! of a federation of servers that relay every client event to each other.

use argh::FromArgs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::budget::Budget;
use switchboard::chat::{self, ChatConfig};
use switchboard::log_info;

/// Serve the chat protocol ({client_join_req,Name}, {send,Name,Text}, ...), alone or
/// federated with other chat servers.
#[derive(FromArgs)]
struct Args {
    /// address to listen on (default 127.0.0.1:65003; port 0 picks one)
    #[argh(option, default = "chat::DEFAULT_ADDR.into()")]
    listen: String,
    /// join the federation of the chat server at this address
    #[argh(option)]
    join: Option<String>,
    /// the address other servers dial to reach this one, when not the listen address
    /// (behind NAT, a proxy or a port forward); default: the listen address
    #[argh(option)]
    advertise: Option<String>,
    /// a peer server silent this many seconds is lost (its clients leave) and redialled;
    /// links send a heartbeat every third of it (default 3, fractions allowed)
    #[argh(
        option,
        default = "switchboard::link::DEAD_PEER",
        from_str_fn(switchboard::cli::positive_seconds)
    )]
    link_timeout: Duration,
    /// refuse connections beyond this many live ones (default 10000; 16 more are let in
    /// past it for links from other servers only)
    #[argh(option, default = "10_000")]
    max_connections: usize,
    /// close a connection that has not sent its first line (a server: its hello and
    /// proof) within this many seconds, fractions allowed (default 60; one let in past
    /// --max-connections: at most 5)
    #[argh(
        option,
        default = "chat::OPENING_TIMEOUT",
        from_str_fn(switchboard::cli::positive_seconds)
    )]
    opening_timeout: Duration,
    /// close a client connection idle for this many seconds, fractions allowed (default: never)
    #[argh(option, from_str_fn(switchboard::cli::positive_seconds))]
    idle_timeout: Option<Duration>,
    /// bytes all clients together may make the server hold (partial frames, queued
    /// replies, lines queued for slow clients), k/m/g suffixes allowed: past it the connection holding the most is
    /// closed, with a log line (default 256m)
    #[argh(
        option,
        arg_name = "SIZE",
        default = "switchboard::budget::DEFAULT_MAX_CLIENT_MEMORY",
        from_str_fn(switchboard::cli::client_memory)
    )]
    max_client_memory: usize,
    /// lines a client may fall behind before it is disconnected (default 4096)
    #[argh(option, default = "4096")]
    outbox: usize,
    /// the cluster secret's file (16+ bytes, owner-only): federation links prove it;
    /// required when listening or joining off loopback
    #[argh(option)]
    secret_file: Option<PathBuf>,
    /// log every connection, join and leave
    #[argh(switch, short = 'v')]
    verbose: bool,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    switchboard::log::set_verbose(args.verbose);
    // Every address this server listens on or dials decides whether a secret is required.
    let addrs = std::iter::once(&args.listen)
        .chain(&args.join)
        .chain(&args.advertise);
    let secret = match chat::secret_policy(args.secret_file.as_deref(), addrs) {
        Ok(secret) => secret,
        Err(e) => return fail(&e),
    };
    let mut config = ChatConfig {
        outbox: args.outbox,
        secret,
        link_timeout: args.link_timeout,
        advertise: args.advertise,
        ..ChatConfig::default()
    };
    config.server.max_connections = args.max_connections;
    config.server.idle_timeout = args.idle_timeout;
    config.server.opening_timeout = Some(args.opening_timeout);
    config.server.client_memory = Some(Budget::new("chat", args.max_client_memory));
    match chat::serve(&args.listen, args.join.as_deref(), config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &chat::StartError) -> ExitCode {
    log_info!("chat-server: {e}");
    ExitCode::FAILURE
}
