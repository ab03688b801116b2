//! A closed-loop load generator for the store protocol and memcached's text protocol.

use argh::FromArgs;
use std::process::ExitCode;
use std::time::Duration;
use switchboard::framing::Framing;
use switchboard::store::bench::{self, BenchConfig, Proto, Ratio};
use switchboard::store::floor;
use switchboard::store::soak::{soak, SoakConfig};

/// Drive a store (or memcached) server with CONNS closed-loop connections and report
/// ops/s, latency percentiles and, with --server-pid, the server's CPU time per operation.
#[derive(FromArgs)]
struct Args {
    /// server address (default 127.0.0.1:65002); several, comma-separated (a replicated
    /// store's servers): the connections are spread over them in turn
    #[argh(option, default = "\"127.0.0.1:65002\".into()")]
    addr: String,
    /// concurrent connections (default 16)
    #[argh(option, default = "16")]
    conns: usize,
    /// requests per batch written at once (default 1)
    #[argh(option, default = "1")]
    pipeline: usize,
    /// measured seconds (default 5)
    #[argh(option, default = "5.0")]
    duration: f64,
    /// unmeasured seconds first (default 1)
    #[argh(option, default = "1.0")]
    warmup: f64,
    /// distinct keys, preloaded (default 1000)
    #[argh(option, default = "1000")]
    keys: usize,
    /// bytes per value (default 32)
    #[argh(option, default = "32")]
    value_size: usize,
    /// GET:SET weights (default 1:0, GET only)
    #[argh(option, default = "Ratio { get: 1, set: 0 }")]
    ratio: Ratio,
    /// protocol: store (default), memcache, or etcd (its v3 JSON gateway over HTTP/1.1)
    #[argh(option, default = "Proto::Store")]
    proto: Proto,
    /// framing for the store protocol (default line)
    #[argh(option, default = "Framing::Line")]
    framing: Framing,
    /// the server's process id, to report its CPU time per operation
    #[argh(option)]
    server_pid: Option<u32>,
    /// instead of a load: hold this many idle connections and report the server's memory
    /// (with --server-pid) and a new client's response time
    #[argh(option)]
    idle: Option<usize>,
    /// instead of a load: open this many silent connections (connected, never a byte), one
    /// every 5 ms, and report new clients' connect+lookup time meanwhile
    #[argh(option)]
    silent: Option<usize>,
    /// instead of a load: a memory soak of this many seconds (with --server-pid): each
    /// connection stores a 32 B-64 KiB value and looks up a key per round trip, and the
    /// server's RSS is printed every --sample-every seconds
    #[argh(option)]
    soak: Option<f64>,
    /// seconds between RSS samples of a soak (default 10)
    #[argh(option, default = "10.0")]
    sample_every: f64,
    /// instead of a load: serve the design's floor on this address (a bare
    /// thread-per-connection loop answering each lookup of the preloaded keys with its
    /// fixed reply; no map, no lock) until killed, to benchmark against
    #[argh(option)]
    floor: Option<String>,
    /// with --floor: add this many dependent multiply-adds (through a stack slot, no other
    /// memory) to every request the floor reads, to calibrate it (default 0)
    #[argh(option, default = "0")]
    floor_spin: u32,
    /// with --floor: also hash 12 bytes of every request (a key's length) with the store's
    /// keyed hash, to calibrate it
    #[argh(switch)]
    floor_hash: bool,
    /// with --floor: also take a shared lock word and write or read the key's shared
    /// 32-byte cell on every request, as a map shared by every thread must, to calibrate it
    #[argh(switch)]
    floor_share: bool,
    /// with --floor: also call this many distinct functions of a few instructions (at
    /// most 64), each on lines of code of its own, on every request, to calibrate it
    /// (default 0)
    #[argh(option, default = "0")]
    floor_code: u32,
    /// instead of spreading the connections over the --addr servers, compare them: given
    /// their process ids (comma-separated, in --addr order), drive each in turn with
    /// --conns connections of its own for --slice seconds per round, and report each one's
    /// CPU time per operation against the first's, over all rounds and round by round
    #[argh(option)]
    compare: Option<String>,
    /// seconds each server is driven per round of --compare (default 0.5)
    #[argh(option, default = "0.5")]
    slice: f64,
    /// rounds of --compare (default 20)
    #[argh(option, default = "20")]
    rounds: usize,
}

fn main() -> ExitCode {
    let a: Args = argh::from_env();
    let work = floor::FloorWork {
        spin: a.floor_spin,
        hash: a.floor_hash,
        share: a.floor_share,
        code: a.floor_code,
    };
    if let Err(e) = work.check() {
        eprintln!("store-bench: {e}");
        return ExitCode::FAILURE;
    }
    if a.floor.is_none() && work != floor::FloorWork::default() {
        eprintln!(
            "store-bench: --floor-spin, --floor-hash, --floor-share and --floor-code need --floor"
        );
        return ExitCode::FAILURE;
    }
    if let Some(listen) = &a.floor {
        let served = std::net::TcpListener::bind(listen).and_then(|l| {
            eprintln!("store-bench: floor listening on {}", l.local_addr()?);
            floor::serve_floor(l, a.keys, a.value_size, work)
        });
        if let Err(e) = served {
            eprintln!("store-bench: floor on {listen}: {e}");
        }
        return ExitCode::FAILURE;
    }
    let cluster = match switchboard::cli::addresses(&a.addr) {
        Ok(addrs) => addrs,
        Err(e) => {
            eprintln!("store-bench: --addr: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = cluster[0];
    if a.conns == 0 || a.pipeline == 0 || a.keys == 0 || a.duration.is_nan() || a.duration <= 0.0 {
        eprintln!("store-bench: --conns, --pipeline, --keys and --duration must be positive");
        return ExitCode::FAILURE;
    }
    let cfg = BenchConfig {
        addr,
        conns: a.conns,
        pipeline: a.pipeline,
        duration: Duration::from_secs_f64(a.duration),
        warmup: Duration::from_secs_f64(a.warmup.max(0.0)),
        keys: a.keys,
        value_size: a.value_size,
        ratio: a.ratio,
        proto: a.proto,
        framing: a.framing,
        server_pid: a.server_pid,
        cluster: if cluster.len() > 1 {
            cluster.clone()
        } else {
            Vec::new()
        },
    };
    if let Some(pids) = &a.compare {
        return compare(&cfg, &cluster, pids, a.slice, a.rounds);
    }
    if let Some(secs) = a.soak {
        let Some(server_pid) = a.server_pid else {
            eprintln!("store-bench: --soak needs --server-pid");
            return ExitCode::FAILURE;
        };
        let config = SoakConfig {
            addr,
            server_pid,
            conns: a.conns,
            keys: a.keys,
            duration: Duration::from_secs_f64(secs.max(0.0)),
            every: Duration::from_secs_f64(a.sample_every.max(0.1)),
        };
        return match soak(&config, |sample| println!("{sample}")) {
            Ok(report) => {
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("store-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let run = match (a.idle, a.silent) {
        (Some(n), _) => bench::preload(&cfg)
            .and_then(|()| bench::hold_idle(&cfg, n))
            .map(|r| r.to_string()),
        (None, Some(n)) => bench::preload(&cfg)
            .and_then(|()| bench::amid_silence(&cfg, n))
            .map(|r| r.to_string()),
        (None, None) => bench::preload(&cfg)
            .and_then(|()| {
                bench::run(&cfg, |t, rate| {
                    eprintln!("[{:5.1}s] {rate:.0} ops/s", t.as_secs_f64())
                })
            })
            .map(|r| format!("{r}\n{}", r.result_line(&cfg))),
    };
    match run {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("store-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--compare`: the servers at `addrs`, whose process ids are `pids`, driven in turn.
fn compare(
    cfg: &BenchConfig,
    addrs: &[std::net::SocketAddr],
    pids: &str,
    slice: f64,
    rounds: usize,
) -> ExitCode {
    let pids: Result<Vec<u32>, _> = pids.split(',').map(|p| p.trim().parse()).collect();
    let pids = match pids {
        Ok(pids) if pids.len() == addrs.len() => pids,
        _ => {
            eprintln!(
                "store-bench: --compare wants one process id per --addr address ({}), \
                 comma-separated",
                addrs.len()
            );
            return ExitCode::FAILURE;
        }
    };
    if slice.is_nan() || slice <= 0.0 || rounds == 0 {
        eprintln!("store-bench: --slice and --rounds must be positive");
        return ExitCode::FAILURE;
    }
    let targets: Vec<bench::Target> = addrs
        .iter()
        .zip(&pids)
        .map(|(&addr, &pid)| bench::Target { addr, pid })
        .collect();
    let run = targets
        .iter()
        .try_for_each(|t| {
            bench::preload(&BenchConfig {
                addr: t.addr,
                cluster: Vec::new(),
                ..cfg.clone()
            })
        })
        .and_then(|()| {
            bench::compare(
                cfg,
                &targets,
                Duration::from_secs_f64(slice),
                rounds,
                |round, slices| {
                    for (t, s) in slices.iter().enumerate() {
                        let us = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.3}"));
                        println!(
                            "ROUND round={} target={t} ops={} secs={:.3} cpu_us_per_op={} \
                             user_us_per_op={}",
                            round + 1,
                            s.ops,
                            s.secs,
                            us(s.cpu_us_per_op()),
                            us(s.user_us_per_op())
                        );
                    }
                },
            )
        });
    let rounds = match run {
        Ok(rounds) => rounds,
        Err(e) => {
            eprintln!("store-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(summary) = bench::summarize(&rounds) else {
        eprintln!("store-bench: a server completed no operation");
        return ExitCode::FAILURE;
    };
    for (t, c) in summary.iter().enumerate() {
        let [median, low, high] = c.rounds_vs_first;
        println!(
            "COMPARE target={t} addr={} ops_per_sec={:.0} server_cpu_us_per_op={:.3} \
             server_user_us_per_op={:.3} vs_first={:.3} rounds_median_vs_first={median:.3} \
             rounds_middle_half={low:.3}-{high:.3}",
            targets[t].addr, c.ops_per_sec, c.cpu_us_per_op, c.user_us_per_op, c.vs_first
        );
    }
    ExitCode::SUCCESS
}
