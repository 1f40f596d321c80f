//! Offline validation of `deploy/` as part of the test suite: runs
//! `scripts/validate_deploy.py`, which renders every kustomize overlay (and
//! combinations with the components) with `kubectl kustomize`, validates the
//! objects against the Kubernetes, KEDA and NVIDIA device plugin schemas,
//! lints the Dockerfile, and requires deliberately broken copies to fail.
//! Needs kubectl on PATH and the venv of `scripts/env.sh`; the script names
//! whatever is missing.

use std::process::Command;

use torchwire_integration_tests::repo_root;

/// The venv's Python when `scripts/env.sh` was sourced, else `python3`.
fn python() -> String {
    match std::env::var("TORCHWIRE_VENV") {
        Ok(venv) if !venv.is_empty() => format!("{venv}/bin/python"),
        _ => "python3".into(),
    }
}

/// Reads `<n> <what>` from the validator's summary line.
fn count(summary: &str, what: &str) -> usize {
    let words: Vec<&str> = summary.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| w.trim_end_matches(',') == what)
        .unwrap_or_else(|| panic!("no {what:?} in {summary:?}"));
    words[at - 1]
        .parse()
        .unwrap_or_else(|_| panic!("no count before {what:?} in {summary:?}"))
}

#[test]
fn every_overlay_validates_and_every_broken_copy_is_rejected() {
    let root = repo_root();
    let out = Command::new(python())
        .arg(root.join("scripts/validate_deploy.py"))
        .current_dir(&root)
        .output()
        .expect("run scripts/validate_deploy.py (is Python 3 installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/validate_deploy.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let summary = stdout
        .lines()
        .rfind(|l| l.starts_with("validate_deploy:"))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}\n{stderr}"));
    // Not vacuous: the overlays were rendered and their objects checked, and
    // every broken copy failed (`<n> of <m> broken copies rejected`).
    assert!(count(summary, "renderings") >= 5, "{summary}");
    assert!(count(summary, "objects") >= 50, "{summary}");
    let rejected = count(summary, "of");
    let broken = count(summary, "broken");
    assert!(
        broken >= 10 && rejected == broken,
        "not every broken copy was rejected: {summary}"
    );
    assert_eq!(count(summary, "failures"), 0, "{summary}");
    for overlay in ["cpu", "gpu", "mig", "time-slicing"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("ok   {overlay}:"))),
            "overlay {overlay} not validated:\n{stdout}"
        );
    }
}
