//! The classic store server: `store,KEY,VALUE` / `lookup,KEY`, wire compatible with the
//! course's Python and Erlang store servers.

use argh::FromArgs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::budget::Budget;
use switchboard::framing::Framing;
use switchboard::server::{Server, ServerConfig};
use switchboard::store::aof::{self, ByteSize, Fsync};
use switchboard::store::{self, StoreOptions, StoreService};
use switchboard::{framing, log_info};

/// Serve the classic key-value store protocol (store,K,V / lookup,K, plus delete and stats).
#[derive(FromArgs)]
struct Args {
    /// address to listen on (default 127.0.0.1:65002, the course's port; port 0 picks one)
    #[argh(option, default = "store::DEFAULT_ADDR.into()")]
    listen: String,
    /// framing: line (default), ascii10, u16 or u32
    #[argh(option, default = "Framing::Line")]
    framing: Framing,
    /// refuse connections beyond this many live ones (default 10000)
    #[argh(option, default = "10_000")]
    max_connections: usize,
    /// close a connection idle for this many seconds, fractions allowed (default: never)
    #[argh(option, from_str_fn(switchboard::cli::positive_seconds))]
    idle_timeout: Option<Duration>,
    /// bytes all clients together may make the server hold (partial frames, queued
    /// replies), k/m/g suffixes allowed: past it the connection holding the most is
    /// closed, with a log line (default 256m)
    #[argh(
        option,
        arg_name = "SIZE",
        default = "switchboard::budget::DEFAULT_MAX_CLIENT_MEMORY",
        from_str_fn(switchboard::cli::client_memory)
    )]
    max_client_memory: usize,
    /// append every write to this file and replay it at start
    #[argh(option)]
    aof: Option<PathBuf>,
    /// when to fsync the append-only file: always, everysec (default) or no
    #[argh(option, default = "Fsync::EverySec")]
    fsync: Fsync,
    /// compact the append-only file once it is larger than SIZE (bytes, or k, m, g) and
    /// twice its live data (default 64m; 0: never)
    #[argh(
        option,
        arg_name = "SIZE",
        default = "ByteSize(aof::DEFAULT_REWRITE_MIN)"
    )]
    aof_rewrite_min: ByteSize,
    /// report on the --aof file (records, bytes, first bad offset, whether later records
    /// parse) and exit: 0 if a start would use it, 1 if damaged; changes nothing
    #[argh(switch)]
    aof_check: bool,
    /// repair the --aof file and exit: keep every intact record before and after any
    /// damage; the file as it was is kept as PATH.damaged-UNIXTIME
    #[argh(switch)]
    aof_repair: bool,
    /// log every connection
    #[argh(switch, short = 'v')]
    verbose: bool,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    switchboard::log::set_verbose(args.verbose);
    if args.aof_check || args.aof_repair {
        let Some(path) = &args.aof else {
            return fail("--aof-check and --aof-repair need --aof PATH");
        };
        return aof::check_or_repair(path, args.aof_repair);
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
    if let Some(warning) = store::open_file_warning(args.max_connections) {
        log_info!("store: warning: {warning}");
    }
    let mut config = ServerConfig::named("store");
    config.max_connections = args.max_connections;
    config.idle_timeout = args.idle_timeout;
    config.client_memory = Some(Budget::new("store", args.max_client_memory));
    config.framing = args.framing;
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

fn fail(message: &str) -> ExitCode {
    log_info!("store-server: {message}");
    ExitCode::FAILURE
}
