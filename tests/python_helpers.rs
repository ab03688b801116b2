//! The Python side's own unit tests (`interop/test_*.py`), run as part of `cargo test` so
//! the one framing helper every interop script imports is checked before it is relied on.

use std::process::Command;

#[test]
fn interop_python_unit_tests_pass() {
    let out = Command::new("python3")
        .args([
            "-m",
            "unittest",
            "discover",
            "-s",
            "interop",
            "-p",
            "test_*.py",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python3 is required for the interop tests (README: Requirements)");
    assert!(
        out.status.success(),
        "python unit tests failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
