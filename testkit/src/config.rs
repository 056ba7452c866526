//! [`AgentBuilder`]: the configuration of an agent a test is about to start,
//! written as a TOML file into the agent's own temp directory.
//!
//! The kit fills in what every agent needs and a test rarely cares about:
//! the database and the socket inside the temp directory, and a broker on
//! a dead port ([`DEAD_BROKER`]): forwarding is not what most tests are
//! about. [`AgentBuilder::set`] overrides any key; [`AgentBuilder::forwarding_to`]
//! and [`AgentBuilder::consuming`] set up the broker-facing tests.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::agent::{Activation, Agent};

/// A broker address nothing listens on.
pub const DEAD_BROKER: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

/// A TOML string literal for `s` (paths, durations, sizes).
pub fn toml_str(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_string()).to_string()
}

/// The configuration of an agent to start: section → key → TOML value.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    /// The `edge-outbox` binary: only the main package's tests and benches
    /// know its path (`env!("CARGO_BIN_EXE_edge-outbox")`), so they pass it in.
    bin: PathBuf,
    sections: BTreeMap<String, BTreeMap<String, String>>,
    env: Vec<(String, String)>,
    /// Where the agent's temp directory is made; the system's temp dir when unset.
    temp_parent: Option<PathBuf>,
    /// `RLIMIT_NOFILE` (soft, hard) the agent starts with; the test's own when unset.
    fd_limit: Option<(u64, u64)>,
    /// Who listens on the socket: the agent, or a socket passed to it.
    activation: Activation,
}

impl AgentBuilder {
    pub(crate) fn new(bin: PathBuf) -> AgentBuilder {
        AgentBuilder {
            bin,
            sections: BTreeMap::new(),
            env: Vec::new(),
            temp_parent: None,
            fd_limit: None,
            activation: Activation::None,
        }
    }

    /// Socket activation as systemd's `edge-outbox.socket` does it: the kit
    /// binds the socket and keeps it listening for the agent's whole life,
    /// restarts included; each start passes it as descriptor 3 with
    /// `LISTEN_FDS=1` and `LISTEN_PID` (the agent's own pid, through a
    /// `sh` that execs it). Connections made while the agent is down wait
    /// in the kernel's queue.
    pub fn socket_activated(mut self) -> Self {
        self.activation = Activation::Held;
        self
    }

    /// Starts the agent through `systemd-socket-activate -l SOCKET`, which
    /// binds the socket and execs the agent on the first connection. The
    /// tool passes on only the builder's environment (as `-E`).
    pub fn through_systemd_socket_activate(mut self) -> Self {
        self.activation = Activation::Tool;
        self
    }

    /// Sets `[section] key = value`; `value` is TOML (`"3"`, `"\"1s\""`,
    /// `"[12345]"`); see [`toml_str`] for strings. Replaces the default.
    pub fn set(mut self, section: &str, key: &str, value: impl Into<String>) -> Self {
        self.sections
            .entry(section.to_string())
            .or_default()
            .insert(key.to_string(), value.into());
        self
    }

    /// Sets a string key (quoted for TOML).
    pub fn set_str(self, section: &str, key: &str, value: impl AsRef<str>) -> Self {
        self.set(section, key, toml_str(value))
    }

    /// Removes a key the kit sets by default (e.g. `broker.urls`).
    pub fn unset(mut self, section: &str, key: &str) -> Self {
        if let Some(keys) = self.sections.get_mut(section) {
            keys.remove(key);
        }
        self
    }

    /// An environment variable for the agent process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the agent (and its CLI commands) with this soft and hard
    /// `RLIMIT_NOFILE`, as a shell's `ulimit -Sn`/`-Hn` would. A hard limit
    /// above the test's own needs root.
    pub fn fd_limit(mut self, soft: u64, hard: u64) -> Self {
        self.fd_limit = Some((soft, hard));
        self
    }

    /// Makes the agent's temp directory inside `parent` (e.g. to measure on
    /// a given filesystem) instead of the system's temp dir.
    pub fn temp_dir_in(mut self, parent: impl Into<PathBuf>) -> Self {
        self.temp_parent = Some(parent.into());
        self
    }

    /// Forwards to the broker at `url`, with fast retry timings.
    pub fn forwarding_to(self, url: &str) -> Self {
        self.set("broker", "urls", format!("[{}]", toml_str(url)))
            .set_str("broker", "connect_timeout", "2s")
            .set_str("publish", "retry_interval", "200ms")
            .set_str("publish", "resend_every", "300ms")
    }

    /// Consumes `queue` on the broker at `url` (and forwards there, as
    /// [`AgentBuilder::forwarding_to`]); the handler is the default `record`.
    pub fn consuming(self, url: &str, queue: &str) -> Self {
        self.forwarding_to(url).set_str("consumer", "queue", queue)
    }

    /// The `exec` handler running `sh -c script` for each delivery.
    pub fn exec_handler(self, script: &str) -> Self {
        self.set_str("consumer", "handler", "exec").set(
            "consumer",
            "exec",
            format!(
                "[{}, {}, {}]",
                toml_str("sh"),
                toml_str("-c"),
                toml_str(script)
            ),
        )
    }

    /// Writes the config and starts the agent; returns once its socket accepts.
    pub fn start(self) -> Agent {
        let mut agent = self.prepare();
        agent.spawn_and_wait_ready();
        agent
    }

    /// Writes the config in a new temp dir but does not start the agent
    /// ([`Agent::restart`] starts it).
    pub fn prepare(self) -> Agent {
        let mut temp = tempfile::Builder::new();
        temp.prefix("eo");
        let dir = match &self.temp_parent {
            Some(parent) => temp.tempdir_in(parent),
            None => temp.tempdir(),
        }
        .expect("creating a temp dir");
        let root = dir.path().to_path_buf();
        let mut sections = self.sections;
        let mut defaults = |section: &str, key: &str, value: String| {
            sections
                .entry(section.to_string())
                .or_default()
                .entry(key.to_string())
                .or_insert(value);
        };
        defaults(
            "store",
            "path",
            toml_str(root.join("outbox.db").to_string_lossy()),
        );
        defaults(
            "submit",
            "socket",
            toml_str(root.join("s.sock").to_string_lossy()),
        );
        defaults("broker", "urls", format!("[{}]", toml_str(DEAD_BROKER)));
        defaults("broker", "connect_timeout", toml_str("1s"));
        let config_text = render(&sections);
        let config = root.join("agent.toml");
        std::fs::write(&config, &config_text).expect("writing the agent config");
        let parsed: toml::Table = toml::from_str(&config_text).expect("the kit wrote bad TOML");
        let get = |section: &str, key: &str| -> PathBuf {
            parsed[section][key]
                .as_str()
                .map(PathBuf::from)
                .expect("a path key")
        };
        let socket = get("submit", "socket");
        assert!(
            socket.as_os_str().len() < 107,
            "socket path too long: {}",
            socket.display()
        );
        let held = match self.activation {
            Activation::Held => Some(
                std::os::unix::net::UnixListener::bind(&socket)
                    .unwrap_or_else(|e| panic!("binding {}: {e}", socket.display())),
            ),
            _ => None,
        };
        Agent {
            db: get("store", "path"),
            socket,
            log: root.join("agent.log"),
            config,
            config_text,
            bin: self.bin,
            env: self.env,
            fd_limit: self.fd_limit,
            activation: self.activation,
            held,
            child: None,
            dir,
        }
    }
}

fn render(sections: &BTreeMap<String, BTreeMap<String, String>>) -> String {
    let mut text = String::new();
    for (section, keys) in sections {
        text.push_str(&format!("[{section}]\n"));
        for (key, value) in keys {
            text.push_str(&format!("{key} = {value}\n"));
        }
        text.push('\n');
    }
    text
}
