//! The simulator's runs: many seeds, longer ones on demand, and proof the checks bite.

use super::*;

fn run_or_panic(seeds: std::ops::Range<u64>, plan: &Plan) -> Stats {
    let stats = run_seeds(seeds, plan).unwrap_or_else(|report| panic!("{report}"));
    eprintln!("{plan:?}: {stats:?}");
    // A run that never reached a fault or a path proves nothing about it.
    assert!(stats.leader_terms > 0 && stats.committed > 0 && stats.crashes > 0);
    assert!(stats.snapshots_installed > 0 && stats.reads_confirmed > 0);
    assert!(stats.transfers > 0 && stats.rejections > 0 && stats.leaders_stepped_down > 0);
    stats
}

#[test]
fn two_thousand_short_seeds_of_three() {
    run_or_panic(0..2_000, &Plan::short());
}

#[test]
fn five_hundred_short_seeds_of_five() {
    let plan = Plan {
        replicas: 5,
        ..Plan::short()
    };
    run_or_panic(10_000..10_500, &plan);
}

/// Safety does not lean on pre-vote or check-quorum: without them (more elections, more
/// disruption) the checks still hold.
#[test]
fn five_hundred_short_seeds_without_pre_vote_or_check_quorum() {
    let plan = Plan {
        classic: true,
        ..Plan::short()
    };
    let stats = run_seeds(20_000..20_500, &plan).unwrap_or_else(|report| panic!("{report}"));
    assert!(stats.leader_terms > 0 && stats.committed > 0 && stats.snapshots_installed > 0);
}

/// The long run, 20,000 seeds of 2,000 ticks (three and five replicas):
/// `cargo test --release --lib raft::sim::tests::many_long_seeds -- --ignored --nocapture`
#[test]
#[ignore]
fn many_long_seeds() {
    for replicas in [3, 5] {
        let plan = Plan {
            replicas,
            chaos_ticks: 2_000,
            heal_bound: 200,
            bug: Bug::None,
            send_before_persist: false,
            classic: false,
        };
        run_or_panic(replicas * 100_000..replicas * 100_000 + 10_000, &plan);
    }
}

/// The checks are not vacuous: each deliberate bug is caught within a few hundred
/// seeds, and the report names the rule it broke.
#[test]
fn the_checker_catches_deliberate_bugs() {
    let cases = [
        (Bug::VoteTwice, "two leaders"),
        (Bug::IgnoreLogInVotes, "lacks committed"),
    ];
    for (bug, rule) in cases {
        let plan = Plan {
            bug,
            ..Plan::short()
        };
        let report = (0..500)
            .find_map(|seed| Sim::new(seed, plan.clone()).run().err())
            .unwrap_or_else(|| panic!("{bug:?} was not caught in 500 seeds"));
        assert!(report.contains(rule), "{bug:?}: {report}");
        assert!(report.contains("seed ") && report.contains("trace tail"));
    }
}

/// A driver that sends before its fsync is caught: a commit lands on a minority of
/// disks.
#[test]
fn the_checker_catches_sending_before_persisting() {
    let plan = Plan {
        send_before_persist: true,
        ..Plan::short()
    };
    let report = (0..500)
        .find_map(|seed| Sim::new(seed, plan.clone()).run().err())
        .expect("sending before persisting was not caught in 500 seeds");
    assert!(report.contains("disks only"), "{report}");
}
