//! The bootstrap's own unit tests (tests/py/test_bootstrap.py), run with
//! the test venv's Python: what a zygote makes of a spawn request whose
//! descriptors do not match what it names, of more descriptors than it
//! takes, of a message too long. Each is refused and leaves no descriptor
//! open; a failure shows unittest's own report.

mod util;

use std::process::Command;

use util::*;

#[test]
fn the_bootstraps_unit_tests_pass() {
    let out = Command::new(venv_python())
        .args(["-m", "unittest", "-v", "test_bootstrap"])
        .current_dir(repo().join("tests/py"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run the venv's python");
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    // unittest says how many ran; none run is no pass.
    let ran = report
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(0);
    assert!(ran >= 9, "only {ran} bootstrap tests ran:\n{report}");
}
