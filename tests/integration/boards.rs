//! Board profiles as the binary applies them, and `graft doctor`.

use crate::common::*;

#[test]
fn board_profiles_set_model_and_threads() {
    let t = tempfile::tempdir().unwrap();
    let mut c = graft(t.path());
    c.env_remove("GRAFT_THREADS")
        .args(["--json", "--board", "pi4", "info"]);
    let info = &json_lines(&ok(c))[0];
    assert_eq!(info["board"]["name"], "pi4");
    assert_eq!(info["board_source"], "--board");
    assert_eq!(
        info["model"], "efficientnet-lite0-w8-gem",
        "ARM boards use the int8 file with float activations, GeM-pooled"
    );
    assert_eq!(info["threads"], 4);
    // --threads and --model still win over the profile.
    let mut c = graft(t.path());
    c.args([
        "--json",
        "--board",
        "pi-zero-2w",
        "--threads",
        "1",
        "--model",
    ])
    .args(["efficientnet-lite0-fp32", "info"]);
    let info = &json_lines(&ok(c))[0];
    assert_eq!(info["threads"], 1);
    assert_eq!(info["model"], "efficientnet-lite0-fp32");
    let mut c = graft(t.path());
    c.args(["--board", "pi9", "info"]);
    fails(c, "unknown board \"pi9\"; known: pi-zero-2w");
}

#[test]
fn doctor_reports_each_check_and_fails_on_what_blocks_a_kiosk() {
    let t = tempfile::tempdir().unwrap();
    let mut c = graft(t.path());
    c.args(["--json", "doctor", "--serial", "/dev/graft-none", "--data"])
        .arg(t.path());
    let lines = json_lines(&ok(c));
    let checks: Vec<&str> = lines.iter().map(|l| l["check"].as_str().unwrap()).collect();
    for want in [
        "board",
        "model",
        "device",
        "camera",
        "serial",
        "data folder",
    ] {
        assert!(checks.contains(&want), "{want} missing from {checks:?}");
    }
    let serial = lines.iter().find(|l| l["check"] == "serial").unwrap();
    assert_eq!(serial["status"], "warn");
    assert!(serial["detail"]
        .as_str()
        .unwrap()
        .contains("/dev/graft-none does not exist"));
    let model = lines.iter().find(|l| l["check"] == "model").unwrap();
    assert_eq!(model["status"], "ok", "{model}");
    let device = lines.iter().find(|l| l["check"] == "device").unwrap();
    assert!(
        device["detail"].as_str().unwrap().contains("--device auto"),
        "{device}"
    );

    // A data folder that cannot be written fails the doctor (exit 1, the failing check shown).
    let mut c = graft(t.path());
    c.args(["doctor", "--data", "/proc/graft-nowhere"]);
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL  data folder"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("doctor: 1 check(s) failed"));
}
