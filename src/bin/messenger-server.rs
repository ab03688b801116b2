//! A messenger server: one of the cluster named by `--peers`; primary or backup by the rules
//! in `switchboard::messenger` (`--quorum primary`, the default), or a Raft member
//! (`--quorum majority`, `switchboard::messenger::majority`).

use argh::FromArgs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::budget::Budget;
use switchboard::messenger::majority::{Majority, MajorityOptions};
use switchboard::messenger::state::Limits;
use switchboard::messenger::{self, Options, Replica};
use switchboard::server::{on_termination, Server, ServerConfig};
use switchboard::{auth, log_info};

/// Serve the replicated messenger: accounts, offline delivery, failover. Two modes, the
/// same clients: --quorum primary (default) survives two of three servers crashing, but a
/// network split can lose what the cut-off primary acknowledged alone; --quorum majority
/// (Raft) loses nothing acknowledged under any partition, but needs a majority (two of
/// three) up and connected to serve.
#[derive(FromArgs)]
struct Args {
    /// replication: "primary" (default; primary-backup, every live server acknowledges,
    /// survives two of three crashes) or "majority" (Raft over 3 or 5 servers, a majority
    /// acknowledges, survives any partition and one of three failing)
    #[argh(option, default = "Quorum::Primary")]
    quorum: Quorum,
    /// this server's id: its index in --peers (required to serve)
    #[argh(option)]
    id: Option<usize>,
    /// every server's HOST:PORT by id, comma-separated (clients and peers share the port;
    /// required to serve)
    #[argh(option)]
    peers: Option<String>,
    /// where this server dials each server, HOST:PORT by id, comma-separated (default:
    /// --peers): for a NAT, a tunnel or a fault-injecting proxy; --peers stays the
    /// cluster's identity, the same on every server, and this server listens on its own
    /// --peers address
    #[argh(option)]
    dial: Option<String>,
    /// directory for the snapshot and the change log (created if missing)
    #[argh(option)]
    data_dir: PathBuf,
    /// write the log without fsync: survives a killed process, not a power cut (primary
    /// mode only: the Raft log is always fsynced)
    #[argh(switch)]
    no_fsync: bool,
    /// snapshot the state and empty the log after this many records (default 50000; in
    /// majority mode, Raft log entries)
    #[argh(option, default = "messenger::log::COMPACT_AFTER")]
    compact_after: u64,
    /// report on the data directory (snapshot, log records, first bad offset, whether
    /// later records parse) and exit: 0 if a start would use it, 1 if damaged (primary
    /// mode's data directories)
    #[argh(switch)]
    check: bool,
    /// repair the data directory and exit: keep every record a start can replay; the
    /// files as they were are kept with a .damaged-UNIXTIME suffix
    #[argh(switch)]
    repair: bool,
    /// refuse a register while this many accounts exist, with `5a` (no room; default
    /// 100000): a search goes through every account, so this bounds how long one takes.
    /// Give every server the same: the server deciding a request (the primary, or the
    /// leader) applies its own, and every other applies what it decided
    #[argh(option, default = "messenger::state::DEFAULT_MAX_ACCOUNTS")]
    max_accounts: usize,
    /// refuse a send while this many messages wait for their recipients, over all
    /// accounts, with `5a` (no room, as a send to a full mailbox; default 1000000, up to
    /// about 400 MB): every waiting message is held in memory. Decided as --max-accounts
    #[argh(option, default = "messenger::state::DEFAULT_MAX_WAITING")]
    max_waiting: usize,
    /// refuse connections beyond this many live ones, peer links included (two per
    /// other server of --peers more are let in past it, for peer links only), with the
    /// `41` (unavailable) reply (default 10000)
    #[argh(option, default = "10_000")]
    max_connections: usize,
    /// close a client connection that sends nothing for this many seconds; fractions
    /// allowed (default: never)
    #[argh(option, from_str_fn(seconds))]
    idle_timeout: Option<Duration>,
    /// bytes all clients together may make the server hold (partial frames, queued
    /// replies, answers queued for slow clients), k/m/g suffixes allowed: past it the connection holding the most is
    /// closed, with a log line (default 256m)
    #[argh(
        option,
        arg_name = "SIZE",
        default = "switchboard::budget::DEFAULT_MAX_CLIENT_MEMORY",
        from_str_fn(switchboard::cli::client_memory)
    )]
    max_client_memory: usize,
    /// the cluster secret: a file of at least 16 bytes only its owner can read, the same
    /// on every server; replication links prove knowledge of it (required when any
    /// --peers address is off loopback)
    #[argh(option)]
    secret_file: Option<PathBuf>,
    /// log every connection
    #[argh(switch, short = 'v')]
    verbose: bool,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    switchboard::log::set_verbose(args.verbose);
    if args.check || args.repair {
        return messenger::repair::check_or_repair(&args.data_dir, args.repair);
    }
    let (Some(id), Some(peers)) = (args.id, &args.peers) else {
        return fail("--id and --peers are required to serve");
    };
    let peers = match switchboard::cli::addresses(peers) {
        Ok(p) => p,
        Err(e) => return fail(&format!("--peers: {e}")),
    };
    if id >= peers.len() {
        let n = peers.len();
        return fail(&format!(
            "--id {id} is out of range: --peers names {n} servers, ids 0 to {}",
            n - 1
        ));
    }
    let dial = match args.dial.as_deref().map(switchboard::cli::addresses) {
        None => peers.clone(),
        Some(Ok(d)) if d.len() == peers.len() => d,
        Some(Ok(d)) => {
            return fail(&format!(
                "--dial names {} servers but --peers {}",
                d.len(),
                peers.len()
            ))
        }
        Some(Err(e)) => return fail(&format!("--dial: {e}")),
    };
    let secret = match auth::cluster_secret(
        args.secret_file.as_deref(),
        &[&peers[..], &dial].concat(),
        "the messenger cluster",
    ) {
        Ok(s) => s,
        Err(e) => return fail(&e.to_string()),
    };
    let mut config = ServerConfig::named(&format!("messenger-{id}"));
    config.max_connections = args.max_connections;
    // Room past it for the peers' replication links, from the cluster's own addresses:
    // idle clients holding every slot cannot keep a dropped link from being dialled again.
    config.reserved_connections = 2 * peers.len().saturating_sub(1);
    config.reserve_from = peers.iter().chain(&dial).map(|a| a.ip()).collect();
    config.idle_timeout = args.idle_timeout;
    config.client_memory = Some(Budget::new(
        &format!("messenger-{id}"),
        args.max_client_memory,
    ));
    config.refusal = Some(messenger::server::refusal());
    let limits = Limits {
        max_accounts: args.max_accounts,
        max_waiting: args.max_waiting,
    };
    let addr = peers[id];
    if args.quorum == Quorum::Majority {
        if args.no_fsync {
            return fail("--no-fsync is for --quorum primary: the Raft log is always fsynced");
        }
        let options = MajorityOptions {
            dial,
            compact_after: args.compact_after,
            secret,
            limits,
            ..MajorityOptions::new(id, peers, args.data_dir)
        };
        return run_majority(&options, config);
    }
    let options = Options {
        dial,
        fsync: !args.no_fsync,
        compact_after: args.compact_after,
        secret,
        limits,
        ..Options::new(id, peers, args.data_dir)
    };
    let (node, report) = match Replica::open(&options) {
        Ok(opened) => opened,
        Err(e) => return fail(&format!("cannot open the data directory: {e}")),
    };
    log_info!("messenger-{}: {}: {report}", id, options.data_dir.display());
    let n = node.clone();
    let server = match Server::bind(addr, config, move |conn| n.serve(conn)) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot listen on {addr}: {e}")),
    };
    if let Err(e) = node.start() {
        return fail(&format!("cannot start: {e}"));
    }
    let (handle, n) = (server.handle(), node.clone());
    if let Err(e) = on_termination(move || {
        n.begin_stop();
        handle.shutdown();
    }) {
        return fail(&format!("cannot install the Ctrl-C handler: {e}"));
    }
    server.run();
    node.stop();
    ExitCode::SUCCESS
}

/// Majority mode: listen, start Raft, serve until Ctrl-C or SIGTERM; then hand leadership
/// over (so clients wait for no election timeout) and stop.
fn run_majority(options: &MajorityOptions, config: ServerConfig) -> ExitCode {
    let addr = options.peers[options.id];
    let listener = match std::net::TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => return fail(&format!("cannot listen on {addr}: {e}")),
    };
    let node = match Majority::open(options) {
        Ok(n) => n,
        Err(e) => return fail(&format!("cannot start raft: {e}")),
    };
    let n = node.clone();
    let server = match Server::from_listener(listener, config, move |conn| n.serve(conn)) {
        Ok(s) => s,
        Err(e) => {
            node.stop();
            return fail(&format!("cannot serve on {addr}: {e}"));
        }
    };
    let (handle, raft) = (server.handle(), node.raft().clone());
    if let Err(e) = on_termination(move || {
        if !raft.transfer_leadership(Duration::from_secs(2)) {
            log_info!("messenger: leadership transfer did not finish in 2 s; stopping anyway");
        }
        handle.shutdown();
    }) {
        node.stop();
        return fail(&format!("cannot install the Ctrl-C handler: {e}"));
    }
    server.run();
    node.stop();
    ExitCode::SUCCESS
}

/// `--quorum`: how many servers acknowledge a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quorum {
    Primary,
    Majority,
}

impl argh::FromArgValue for Quorum {
    fn from_arg_value(value: &str) -> Result<Self, String> {
        match value {
            "primary" => Ok(Quorum::Primary),
            "majority" => Ok(Quorum::Majority),
            _ => Err(format!("{value:?}: expected primary or majority")),
        }
    }
}

/// A positive number of seconds, fractions allowed (`0.5`).
fn seconds(value: &str) -> Result<Duration, String> {
    match value.parse::<f64>() {
        Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!("{value:?} is not a positive number of seconds")),
    }
}

fn fail(message: &str) -> ExitCode {
    log_info!("messenger-server: {message}");
    ExitCode::FAILURE
}
