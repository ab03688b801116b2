//! Ping-pong over remote channels found through the store server (the name registry).

use argh::FromArgs;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::budget::Budget;
use switchboard::chan::{pingpong, Host, Node, NodeConfig};
use switchboard::cli::seconds;
use switchboard::{log_info, store};

/// Ping-pong between two processes over remote channels, found through the store server.
#[derive(FromArgs)]
struct Args {
    /// the store server that keeps the names (default 127.0.0.1:65002)
    #[argh(option, default = "store::DEFAULT_ADDR.into()")]
    registry: String,
    /// this node's address, written into its channels (default 127.0.0.1)
    #[argh(option, default = "Host::Ip([127, 0, 0, 1].into())")]
    advertise: Host,
    /// bytes the clients of this process's channel listeners may make it hold together
    /// (partial lines, parsed messages waiting in channels), k/m/g suffixes allowed: past
    /// it the connection holding the most is closed (default 256m)
    #[argh(
        option,
        arg_name = "SIZE",
        default = "switchboard::budget::DEFAULT_MAX_CLIENT_MEMORY",
        from_str_fn(switchboard::cli::client_memory)
    )]
    max_client_memory: usize,
    #[argh(subcommand)]
    role: Role,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Role {
    Pong(Pong),
    Ping(Ping),
}

/// Register a channel as NAME and answer every {ping,N,ReplyChan} with {pong,N} on
/// ReplyChan. Refuses a NAME whose registered channel still answers; unregisters it on
/// exit (Ctrl-C too).
#[derive(FromArgs)]
#[argh(subcommand, name = "pong")]
struct Pong {
    /// the name to register
    #[argh(positional)]
    name: String,
}

/// Look NAME up (retrying for --wait seconds while it is not registered yet), send COUNT
/// {ping,N,ReplyChan} messages one at a time, check each {pong,N}, print round-trip
/// percentiles.
#[derive(FromArgs)]
#[argh(subcommand, name = "ping")]
struct Ping {
    /// the name to look up
    #[argh(positional)]
    name: String,
    /// how many pings
    #[argh(positional)]
    count: usize,
    /// seconds to keep looking NAME up while it is not registered (default 3)
    #[argh(option, default = "pingpong::LOOKUP_WAIT", from_str_fn(seconds))]
    wait: Duration,
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    let Some(ip) = args.advertise.literal_ip() else {
        log_info!(
            "chan-pingpong: --advertise {}: not an IP address",
            args.advertise
        );
        return ExitCode::FAILURE;
    };
    let node = Node::new(NodeConfig {
        client_memory: Some(Budget::new("chan", args.max_client_memory)),
        ..NodeConfig::advertising(ip)
    });
    let registry = args.registry.as_str();
    let ok = match args.role {
        Role::Pong(p) => pingpong::pong_until_terminated(&node, registry, &p.name),
        Role::Ping(p) => pingpong::ping_and_print(&node, registry, &p.name, p.count, p.wait),
    };
    node.shutdown();
    match ok {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log_info!("chan-pingpong: {e}");
            ExitCode::FAILURE
        }
    }
}
