//! `store-server`'s command line and what it runs: the classic store (optionally with an
//! append-only file), or one server of a replicated store (`--raft`). The binary parses
//! [`ServerArgs`] and calls [`run`].

use super::aof::{self, ByteSize, Fsync};
use super::replicated::{self, ReplicatedOptions};
use super::{StoreOptions, StoreService};
use crate::auth;
use crate::budget::Budget;
use crate::framing::{self, Framing};
use crate::log_info;
use crate::server::{Server, ServerConfig};
use argh::FromArgs;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Serve the classic key-value store protocol (store,K,V / lookup,K, plus delete and stats).
#[derive(FromArgs)]
pub struct ServerArgs {
    /// address to listen on (default 127.0.0.1:65002, the course's port; port 0 picks one)
    #[argh(option, default = "super::DEFAULT_ADDR.into()")]
    pub listen: String,
    /// framing: line (default), ascii10, u16 or u32
    #[argh(option, default = "Framing::Line")]
    pub framing: Framing,
    /// refuse connections beyond this many live ones (default 10000; with --raft, two
    /// per other member more are let in past it, for the members' links only)
    #[argh(option, default = "10_000")]
    pub max_connections: usize,
    /// close a connection idle for this many seconds, fractions allowed (default: never)
    #[argh(option, from_str_fn(crate::cli::positive_seconds))]
    pub idle_timeout: Option<Duration>,
    /// bytes all clients together may make the server hold (partial frames, queued
    /// replies), k/m/g suffixes allowed: past it the connection holding the most is
    /// closed, with a log line (default 256m)
    #[argh(
        option,
        arg_name = "SIZE",
        default = "crate::budget::DEFAULT_MAX_CLIENT_MEMORY",
        from_str_fn(crate::cli::client_memory)
    )]
    pub max_client_memory: usize,
    /// append every write to this file and replay it at start
    #[argh(option)]
    pub aof: Option<PathBuf>,
    /// when to fsync the append-only file: always, everysec (default) or no
    #[argh(option, default = "Fsync::EverySec")]
    pub fsync: Fsync,
    /// compact the append-only file once it is larger than SIZE (bytes, or k, m, g) and
    /// twice its live data (default 64m; 0: never)
    #[argh(
        option,
        arg_name = "SIZE",
        default = "ByteSize(aof::DEFAULT_REWRITE_MIN)"
    )]
    pub aof_rewrite_min: ByteSize,
    /// report on the --aof file (records, bytes, first bad offset, whether later records
    /// parse) and exit: 0 if a start would use it, 1 if damaged; changes nothing
    #[argh(switch)]
    pub aof_check: bool,
    /// repair the --aof file and exit: keep every intact record before and after any
    /// damage; the file as it was is kept as PATH.damaged-UNIXTIME
    #[argh(switch)]
    pub aof_repair: bool,
    /// replicate over Raft as server ID (0-based index into --peers); needs --peers and
    /// --data-dir, and listens on its own --peers entry (--listen is ignored)
    #[argh(option)]
    pub raft: Option<usize>,
    /// with --raft: every server's address, comma-separated (3 or 5), this one's included
    #[argh(option, from_str_fn(crate::cli::addresses))]
    pub peers: Option<Vec<SocketAddr>>,
    /// with --raft: the directory of this server's Raft log, hard state and snapshot
    #[argh(option)]
    pub data_dir: Option<PathBuf>,
    /// with --raft: how long a request waits for a leader before {error,no_leader}, in
    /// seconds (default 5)
    #[argh(
        option,
        default = "Duration::from_secs(5)",
        from_str_fn(crate::cli::positive_seconds)
    )]
    pub request_timeout: Duration,
    /// with --raft: take a snapshot (and cut the log) every N entries (default 100000)
    #[argh(option, default = "100_000")]
    pub snapshot_every: u64,
    /// with --raft: the cluster secret (a file of at least 16 bytes only its owner can
    /// read); required unless every --peers address is a loopback one
    #[argh(option)]
    pub secret_file: Option<PathBuf>,
    /// log every connection
    #[argh(switch, short = 'v')]
    pub verbose: bool,
}

/// Runs `store-server` with parsed `args` until Ctrl-C or SIGTERM: the classic store, or
/// (with `--raft`) one server of a replicated store.
pub fn run(args: ServerArgs) -> ExitCode {
    crate::log::set_verbose(args.verbose);
    if args.aof_check || args.aof_repair {
        let Some(path) = &args.aof else {
            return fail("--aof-check and --aof-repair need --aof PATH");
        };
        return aof::check_or_repair(path, args.aof_repair);
    }
    let mut config = ServerConfig::named("store");
    config.max_connections = args.max_connections;
    config.idle_timeout = args.idle_timeout;
    config.client_memory = Some(Budget::new("store", args.max_client_memory));
    config.framing = args.framing;
    if let Some(index) = args.raft {
        return replicated(index, args, config);
    }
    let options = StoreOptions {
        framing: args.framing,
        limits: framing::Limits::default(),
        aof: args.aof,
        fsync: args.fsync,
        aof_rewrite_min: args.aof_rewrite_min.0,
    };
    let (service, replay) = match StoreService::open(&options) {
        Ok(opened) => opened,
        Err(e) => return fail(&format!("cannot open the append-only file: {e}")),
    };
    if let (Some(path), Some(replay)) = (&options.aof, replay) {
        log_info!("store: {}: {replay}", path.display());
    }
    if let Some(warning) = super::open_file_warning(args.max_connections) {
        log_info!("store: warning: {warning}");
    }
    let bound = TcpListener::bind(&args.listen)
        .and_then(|listener| Server::with_handler(listener, config, service.handler()));
    let server = match bound {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot listen on {}: {e}", args.listen)),
    };
    if let Err(e) = server.run_until_signal() {
        return fail(&format!("cannot install the Ctrl-C handler: {e}"));
    }
    match service.close() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("final append-only file sync failed: {e}")),
    }
}

fn replicated(index: usize, args: ServerArgs, mut config: ServerConfig) -> ExitCode {
    if args.aof.is_some() {
        return fail(
            "--aof does not apply with --raft: the Raft log in --data-dir is the persistence",
        );
    }
    let (Some(peers), Some(dir)) = (args.peers, args.data_dir) else {
        return fail("--raft needs --peers A0,A1,A2 and --data-dir DIR");
    };
    let secret =
        match auth::cluster_secret(args.secret_file.as_deref(), &peers, "the store cluster") {
            Ok(s) => s,
            Err(e) => return fail(&e.to_string()),
        };
    // Room past --max-connections for the members' links, from their addresses (see
    // `ServerConfig::reserved_connections`).
    config.reserved_connections = 2 * peers.len().saturating_sub(1);
    config.reserve_from = peers.iter().map(SocketAddr::ip).collect();
    let peers = peers.iter().map(SocketAddr::to_string).collect();
    let mut options = ReplicatedOptions::new(index, peers, dir);
    options.framing = args.framing;
    options.request_timeout = args.request_timeout;
    options.secret = secret;
    options.compact_every = args.snapshot_every;
    match replicated::run_until_signal(options, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(message: &str) -> ExitCode {
    log_info!("store-server: {message}");
    ExitCode::FAILURE
}
