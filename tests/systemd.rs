//! The systemd units in contrib/systemd (issue 15): `systemd-analyze verify`
//! accepts each with no warning, and each `ExecStart` is a blast command line
//! blast itself accepts. `.ci/run` installs systemd when `systemd-analyze`
//! is missing.

use std::path::Path;
use std::process::Command;

/// The units shipped in contrib/systemd.
fn units() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    let mut units: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("service" | "timer")
            )
        })
        .collect();
    units.sort();
    units
}

#[test]
fn systemd_units_verify_and_run_real_blast_commands() {
    let units = units();
    assert_eq!(units.len(), 4, "{units:?}");
    // verify checks that ExecStart is executable: a copy of this build's
    // binary in a directory without spaces stands in for /usr/local/bin.
    let bin_dir = tempfile::Builder::new()
        .prefix("blast-units-")
        .tempdir_in("/tmp")
        .unwrap();
    let bin = bin_dir.path().join("blast");
    std::fs::copy(env!("CARGO_BIN_EXE_blast"), &bin).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut copies = Vec::new();
    for unit in &units {
        let text = std::fs::read_to_string(unit).unwrap();
        for line in text.lines().filter(|l| l.starts_with("ExecStart=")) {
            let args: Vec<&str> = line["ExecStart=".len()..].split_whitespace().collect();
            assert_eq!(args[0], "/usr/local/bin/blast", "{line}");
            // clap parses every flag before it honours --help: an unknown
            // subcommand or flag fails here.
            let out = Command::new(&bin)
                .args(&args[1..])
                .arg("--help")
                .output()
                .unwrap();
            assert!(out.status.success(), "{line}: {out:?}");
        }
        let copy = dir.path().join(unit.file_name().unwrap());
        std::fs::write(
            &copy,
            text.replace("/usr/local/bin/blast", bin.to_str().unwrap()),
        )
        .unwrap();
        copies.push(copy);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&copies)
        .output()
        .expect("systemd-analyze (apt-get install systemd; .ci/run does)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{out:?}");
    for copy in &copies {
        let text = std::fs::read_to_string(copy).unwrap();
        if copy.extension().is_some_and(|e| e == "service") {
            for sandbox in [
                "NoNewPrivileges=yes",
                "ProtectSystem=strict",
                "ReadWritePaths=/var/lib/blast",
            ] {
                assert!(text.contains(sandbox), "{}: {sandbox}", copy.display());
            }
        }
    }
}
