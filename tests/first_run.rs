//! What a new user meets first, run as they would run it
//! (docs/cli.md, docs/configuration.md):
//!
//! - `-c FILE` is one option of the whole command line, before or after the
//!   subcommand;
//! - `check-config` reads every file the configuration names (the password
//!   file, the TLS CA, certificate and key) and fails exactly as `run`
//!   would: the same message, exit 78;
//! - every `EDGE_OUTBOX_*` variable is a known key or a documented non-key
//!   variable; any other is refused by name, exit 78, by every command;
//! - the Rust version the README states is Cargo.toml's `rust-version`, and
//!   no locked dependency needs a newer one.

use std::process::Command;

use edge_outbox_testkit::{Agent, CliOutput};

const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

/// The `edge-outbox: bad configuration: ...` line of a run's stderr.
fn config_error(out: &CliOutput) -> String {
    out.stderr
        .lines()
        .find(|l| l.starts_with("edge-outbox: bad configuration:"))
        .unwrap_or_else(|| panic!("no configuration error in {out:?}"))
        .to_string()
}

#[test]
fn the_config_option_is_accepted_before_and_after_the_subcommand() {
    let agent = Agent::builder(BIN).prepare();
    let config = agent.config.to_string_lossy().into_owned();
    let db = format!("path = {:?}", agent.db.to_string_lossy());
    for args in [
        &["-c", &config, "check-config"][..],
        &["check-config", "-c", &config][..],
        &["--config", &config, "check-config"][..],
        &["check-config", &format!("--config={config}")][..],
    ] {
        let out = agent.cli_raw(args, b"");
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        assert!(out.stdout.lines().any(|l| l == db), "{args:?}: {out:?}");
    }
    // A command that reads the database looks for the one the file names
    // (not yet made: no agent ran), not the default in the working directory.
    let no_database = format!("no database at {}", agent.db.display());
    for args in [
        &["-c", &config, "status"][..],
        &["status", "-c", &config][..],
        &["-c", &config, "list"][..],
    ] {
        let out = agent.cli_raw(args, b"");
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains(&no_database), "{args:?}: {out:?}");
    }
    // Without a value it is a usage error, wherever it stands.
    for args in [&["check-config", "-c"][..], &["-c"][..]] {
        assert_eq!(agent.cli_raw(args, b"").code, 2, "{args:?}");
    }
}

#[test]
fn check_config_fails_on_an_unreadable_file_exactly_as_run_does() {
    let probe = Agent::builder(BIN).prepare();
    let missing = probe
        .path()
        .join("no-such-file")
        .to_string_lossy()
        .into_owned();
    let readable = probe.path().join("present.pem");
    std::fs::write(&readable, "not read as PEM until a TLS connection").expect("writing");
    let readable = readable.to_string_lossy().into_owned();
    for (key, others) in [
        ("password_file", &[][..]),
        ("tls_ca_file", &[][..]),
        ("tls_cert_file", &["tls_key_file"][..]),
        ("tls_key_file", &["tls_cert_file"][..]),
    ] {
        let mut builder = Agent::builder(BIN).set_str("broker", key, &missing);
        for other in others {
            builder = builder.set_str("broker", other, &readable);
        }
        let agent = builder.prepare();
        let check = agent.cli(&["check-config"]);
        assert_eq!(check.code, 78, "{key}: {check:?}");
        assert!(
            !check.stdout.contains("configuration OK"),
            "{key}: {check:?}"
        );
        let error = config_error(&check);
        assert!(
            error.contains(&format!("broker.{key} {missing}")),
            "{key}: {error}"
        );
        // `run` refuses to start with the very same words.
        let run = agent.cli(&["run"]);
        assert_eq!(run.code, 78, "{key}: {run:?}");
        assert_eq!(config_error(&run), error, "{key}");
    }
    // Present files: OK (their contents are the TLS handshake's business).
    let agent = Agent::builder(BIN)
        .set_str("broker", "password_file", &readable)
        .set_str("broker", "tls_ca_file", &readable)
        .prepare();
    let out = agent.cli(&["check-config"]);
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn a_password_file_under_run_credentials_gets_a_hint_outside_the_unit() {
    let agent = Agent::builder(BIN)
        .set_str(
            "broker",
            "password_file",
            "/run/credentials/edge-outbox-test.service/broker-password",
        )
        .prepare();
    let out = agent.cli(&["check-config"]);
    assert_eq!(out.code, 78, "{out:?}");
    assert!(
        out.stderr
            .contains("EDGE_OUTBOX_BROKER_PASSWORD_FILE=/etc/edge-outbox/broker-password"),
        "{out:?}"
    );
    // The hint's advice works: the key pointed at a readable file passes.
    let password = agent.path().join("broker-password");
    std::fs::write(&password, "guest\n").expect("writing");
    let mut cmd = Command::new(BIN);
    cmd.env(
        "EDGE_OUTBOX_BROKER_PASSWORD_FILE",
        password.to_string_lossy().as_ref(),
    );
    let config = agent.config.to_string_lossy().into_owned();
    let out =
        edge_outbox_testkit::cli::run_bin(cmd, agent.path(), &["-c", &config, "check-config"], b"");
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn an_unknown_environment_variable_is_refused_by_name_by_every_command() {
    // The example: a misspelt section, once silently ignored.
    let agent = Agent::builder(BIN)
        .env("EDGE_OUTBOX_PUBLSH_MAX_IN_FLIGHT", "64")
        .prepare();
    for command in ["check-config", "status", "list", "run"] {
        let out = agent.cli(&[command]);
        assert_eq!(out.code, 78, "{command}: {out:?}");
        let error = config_error(&out);
        assert!(
            error.contains("EDGE_OUTBOX_PUBLSH_MAX_IN_FLIGHT: unknown variable"),
            "{command}: {error}"
        );
        assert!(
            error.contains("did you mean EDGE_OUTBOX_PUBLISH_MAX_IN_FLIGHT?"),
            "{command}: {error}"
        );
    }
    // A misspelt key in a known section, as before.
    let agent = Agent::builder(BIN)
        .env("EDGE_OUTBOX_PUBLISH_MAX_INFLIGHT", "64")
        .prepare();
    let out = agent.cli(&["check-config"]);
    assert_eq!(out.code, 78, "{out:?}");
    assert!(
        config_error(&out).contains("(from EDGE_OUTBOX_PUBLISH_MAX_INFLIGHT)"),
        "{out:?}"
    );
    // The documented non-key variables are not refused (a handler that runs
    // `edge-outbox submit` inherits the per-message ones).
    let mut builder = Agent::builder(BIN);
    for name in [
        "EDGE_OUTBOX_MESSAGE_ID",
        "EDGE_OUTBOX_EXCHANGE",
        "EDGE_OUTBOX_ROUTING_KEY",
        "EDGE_OUTBOX_REDELIVERED",
        "EDGE_OUTBOX_TEST_SEED",
    ] {
        builder = builder.env(name, "1");
    }
    let out = builder.prepare().cli(&["check-config"]);
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn the_readme_states_the_rust_version_cargo_toml_declares_and_the_lock_needs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let manifest: toml::Table = std::fs::read_to_string(format!("{root}/Cargo.toml"))
        .expect("reading Cargo.toml")
        .parse()
        .expect("Cargo.toml is TOML");
    let declared = manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .expect("workspace.package.rust-version")
        .to_string();
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("reading README");
    assert!(
        readme.contains(&format!("Rust {declared} or newer")),
        "README.md does not say \"Rust {declared} or newer\""
    );
    // Every locked package built here builds on it: none declares a newer
    // rust-version. This host's packages only: the lock also names
    // other platforms' crates, which are never downloaded here.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let host = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(root)
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    // "1.95" and "1.95.0" are the same version: compare three parts.
    let parse = |v: &str| -> Vec<u64> {
        let mut parts: Vec<u64> = v.split('.').map(|n| n.parse().unwrap_or(0)).collect();
        parts.resize(3, 0);
        parts
    };
    let ours = parse(&declared);
    let packages = metadata["packages"].as_array().expect("packages");
    let newer: Vec<String> = packages
        .iter()
        .filter_map(|p| {
            let needs = p["rust_version"].as_str()?;
            (parse(needs) > ours).then(|| format!("{} {} needs {needs}", p["name"], p["version"]))
        })
        .collect();
    assert!(
        newer.is_empty(),
        "rust-version {declared} is too old: {newer:?}"
    );
}
