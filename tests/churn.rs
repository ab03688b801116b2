//! Connection churn: a hundred thousand connect, request, close cycles leave no
//! bookkeeping and no memory behind. In a test binary of its own, so that no other test's
//! threads share the process whose memory it measures.

mod common;

use common::{eventually, rss_kib, start_echo, LineClient};
use switchboard::server::ServerConfig;

#[test]
fn a_hundred_thousand_connect_close_cycles_leave_nothing_behind() {
    let server = start_echo(ServerConfig::named("churn"));
    let addr = server.local_addr();
    // Each cycle waits for its echo, so connections arrive no faster than they are accepted
    // (a client that only connects and closes fills the accept backlog, and the kernel then
    // drops SYNs for a second at a time).
    let cycle = move |n: usize| {
        for _ in 0..n {
            let mut c = LineClient::connect(addr);
            assert_eq!(c.ask("x\n"), "x");
        }
    };
    // Warm up allocator arenas and the table's capacity before measuring.
    cycle(5_000);
    eventually("warm-up connections to end", || {
        server.handle().stats().live == 0
    });
    let before = rss_kib();
    let workers: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || cycle(47_500)))
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    eventually("every connection to end", || {
        server.handle().stats().live == 0
    });
    let after = rss_kib();
    let stats = server.handle().stats();
    assert_eq!(stats.accepted, 100_000);
    assert_eq!(stats.live, 0, "the live-connection table is empty");
    assert!(
        after < before + 8 * 1024,
        "memory grew from {before} KiB to {after} KiB over 95,000 connections"
    );
    let report = server.stop();
    assert_eq!(report.abandoned, 0);
}
