//! Server log lines written during a passing test stay out of `cargo test`'s output: the
//! harness shows them only for a failing test. Checked by running this test binary again
//! as a child, for one test that makes an in-process server log, and reading what it
//! printed.

mod common;

use common::{eventually, run_with_input, start_echo, LineClient};
use switchboard::server::ServerConfig;

/// Run only by [`a_passing_test_prints_no_server_log_lines`]: a server logs a failed
/// handler, and the test passes.
#[test]
#[ignore = "run by a_passing_test_prints_no_server_log_lines"]
fn helper_an_in_process_server_logs_and_the_test_passes() {
    let server = start_echo(ServerConfig::named("chatty"));
    let mut failer = LineClient::connect(server.local_addr());
    failer.send(b"fail\n");
    failer.expect_closed();
    eventually("the failed connection to be counted", || {
        server.handle().stats().live == 0
    });
    server.stop();
}

#[test]
fn a_passing_test_prints_no_server_log_lines() {
    let me = std::env::current_exe().unwrap();
    let name = "helper_an_in_process_server_logs_and_the_test_passes";
    let mut cmd = std::process::Command::new(&me);
    cmd.args(["--ignored", "--exact", name, "--test-threads", "1"]);
    let quiet = run_with_input(cmd, b"");
    assert!(quiet.status.success(), "{}{}", quiet.stdout, quiet.stderr);
    assert!(quiet.stdout.contains("1 passed"), "{}", quiet.stdout);
    let printed = format!("{}{}", quiet.stdout, quiet.stderr);
    assert!(!printed.contains("asked to fail"), "{printed}");
    // The same test with capture off shows the line: the check above can see one.
    let mut cmd = std::process::Command::new(&me);
    cmd.args(["--ignored", "--exact", name, "--nocapture"]);
    let loud = run_with_input(cmd, b"");
    let printed = format!("{}{}", loud.stdout, loud.stderr);
    assert!(printed.contains("chatty: connection"), "{printed}");
    assert!(printed.contains("asked to fail"), "{printed}");
}
