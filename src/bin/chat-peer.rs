//! Serverless chat: a peer that is server, client and router at once. Without `--via` it
//! starts a room; with `--via` it joins the room of that peer. Lines typed are sent to
//! every member; `exit` or end of input leaves.

use argh::FromArgs;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::log_info;
use switchboard::peer::{Peer, PeerConfig};
use switchboard::server::on_termination;

/// Chat without a server: every line typed goes to every member of the room; messages,
/// joins, leaves and the member list are printed as they happen.
#[derive(FromArgs)]
struct Args {
    /// address to listen on for other peers (port 0 picks one)
    #[argh(option)]
    listen: String,
    /// the name to chat under (letters, digits, '_', '-', '.')
    #[argh(option)]
    name: String,
    /// join the room of the peer at this address (default: start a new room)
    #[argh(option)]
    via: Option<String>,
    /// never link directly to the peer at this address; route through others (repeatable)
    #[argh(option)]
    no_direct: Vec<String>,
    /// the cluster secret's file (16+ bytes, owner-only): links between peers prove it;
    /// required when listening or joining off loopback
    #[argh(option)]
    secret_file: Option<PathBuf>,
    /// close a link silent this many seconds: the bound on noticing a cut network
    /// (default 3, at least 1)
    #[argh(option, default = "3")]
    link_timeout: u64,
    /// dial the peer known by address ADDR at VIA instead, as ADDR=VIA: a port forward,
    /// a tunnel, or a test's fault proxy (repeatable)
    #[argh(option, from_str_fn(switchboard::peer::parse_reach))]
    reach: Vec<(String, String)>,
    /// bytes the queues and read buffers of all links and connections, and the output's
    /// queue, together may hold (lines waiting for a slow or cut peer or an output nobody
    /// reads, partial lines), k/m/g suffixes allowed: a
    /// link past it is closed, with a log line, and dialled again; its unacknowledged lines
    /// are sent again (default 64m, at least 1m)
    #[argh(
        option,
        arg_name = "SIZE",
        default = "switchboard::peer::DEFAULT_MAX_CLIENT_MEMORY",
        from_str_fn(switchboard::cli::client_memory)
    )]
    max_client_memory: usize,
    /// log every link that opens or closes
    #[argh(switch, short = 'v')]
    verbose: bool,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    switchboard::log::set_verbose(args.verbose);
    let secret = match switchboard::peer::secret_policy(
        args.secret_file.as_deref(),
        &args.listen,
        args.via.as_deref(),
    ) {
        Ok(secret) => secret,
        Err(e) => return fail(&e),
    };
    let config = PeerConfig {
        listen: args.listen,
        name: args.name,
        via: args.via,
        no_direct: args.no_direct,
        secret,
        link_timeout: Duration::from_secs(args.link_timeout),
        reach: args.reach,
        max_client_memory: args.max_client_memory,
    };
    let peer = match Peer::start(&config, Box::new(io::stdout())) {
        Ok(peer) => peer,
        Err(e) => return fail(&e),
    };
    let handle = peer.handle();
    if let Err(e) = on_termination(move || handle.leave()) {
        return fail(&e);
    }
    match peer.run(io::stdin()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    log_info!("chat-peer: {e}");
    ExitCode::FAILURE
}
