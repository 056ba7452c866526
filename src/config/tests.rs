//! Tests of [`super::load_from`] as a whole: defaults, the file, the typed
//! values, errors naming their key, and the printed configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;

use super::*;

fn refused(text: &str) -> String {
    match load_from(Some(text), "f.toml", &[]) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_match_the_documentation() {
    let c = load_from(None, "defaults", &[]).unwrap();
    assert_eq!(c.store.path, PathBuf::from("edge-outbox.db"));
    assert_eq!(c.store.synchronous, Synchronous::Full);
    assert_eq!(c.store.max_pending.get(), 1_000_000);
    assert_eq!(c.store.max_db_size, ByteSize::gib(2));
    assert_eq!(c.submit.socket_mode.bits(), 0o660);
    assert_eq!(c.submit.max_connections.get(), 1024);
    assert_eq!(c.broker.password_file, None);
    assert_eq!(c.publish.max_in_flight.get(), 256);
    assert_eq!(c.publish.max_attempts.get(), 4);
    assert_eq!(c.publish.retry_interval, Duration::from_secs(60));
    assert_eq!(c.publish.max_rate, 0);
    assert_eq!(c.publish.max_bytes_rate, ByteSize::b(0));
    assert_eq!(c.publish.order, super::Order::OldestFirst);
    assert_eq!(c.publish.max_age, None);
    assert_eq!(c.consumer.queue, None);
    assert_eq!(c.consumer.prefetch.get(), 1);
    assert_eq!(c.consumer.max_attempts.get(), 2);
    assert_eq!(c.consumer.dead_letter_exchange, None);
    assert_eq!(c.purge.at, TimeOfDay::THREE_AM);
    assert_eq!(c.purge.retention, Duration::from_secs(30 * 86_400));
    assert_eq!(c.purge.batch_size.get(), 1000);
    assert_eq!(c.metrics.listen, None);
}

#[test]
fn file_values_and_human_units() {
    let c = load_from(
        Some("[store]\nmax_db_size = \"10MiB\"\n[publish]\nconfirm_timeout = \"500ms\"\n[purge]\nretention = \"7d\"\n"),
        "test.toml",
        &[],
    )
    .unwrap();
    assert_eq!(c.store.max_db_size, ByteSize::mib(10));
    assert_eq!(c.publish.confirm_timeout, Duration::from_millis(500));
    assert_eq!(c.purge.retention, Duration::from_secs(7 * 86_400));
}

#[test]
fn rate_caps_from_the_file_and_the_environment() {
    let c = load_from(
        Some("[publish]\nmax_rate = 1000\nmax_bytes_rate = \"1MiB\"\n"),
        "f",
        &[],
    )
    .unwrap();
    assert_eq!(c.publish.max_rate, 1000);
    assert_eq!(c.publish.max_bytes_rate, ByteSize::mib(1));
    let env = [
        ("EDGE_OUTBOX_PUBLISH_MAX_RATE".to_string(), "50".to_string()),
        (
            "EDGE_OUTBOX_PUBLISH_MAX_BYTES_RATE".to_string(),
            "64KiB".to_string(),
        ),
    ];
    let c = load_from(None, "d", &env).unwrap();
    assert_eq!(c.publish.max_rate, 50);
    assert_eq!(c.publish.max_bytes_rate, ByteSize::kib(64));
    let e = refused("[publish]\nmax_rate = -1\n");
    assert!(e.starts_with("publish.max_rate"), "{e}");
}

#[test]
fn strings_become_typed_values_and_empty_means_not_set() {
    let c = load_from(
        Some(
            "[submit]\nsocket_mode = \"0600\"\n\
             [broker]\npassword_file = \"/run/pw\"\ntls_ca_file = \"\"\n\
             [consumer]\nqueue = \"q\"\ndead_letter_exchange = \"\"\n\
             bindings = [{ exchange = \"x\", exchange_type = \"topic\" }, { exchange = \"y\" }]\n\
             [purge]\nat = \"23:59\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\n",
        ),
        "f",
        &[],
    )
    .unwrap();
    assert_eq!(c.submit.socket_mode.bits(), 0o600);
    assert_eq!(c.broker.password_file, Some(PathBuf::from("/run/pw")));
    assert_eq!(c.broker.tls_ca_file, None);
    assert_eq!(c.consumer.queue.as_deref(), Some("q"));
    assert_eq!(c.consumer.dead_letter_exchange, None);
    assert_eq!(c.consumer.bindings[0].exchange_type, ExchangeKind::Topic);
    assert_eq!(c.consumer.bindings[1].exchange_type, ExchangeKind::Direct);
    assert_eq!(c.purge.at, "23:59".parse().unwrap());
    let listen: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    assert_eq!(c.metrics.listen, Some(listen));
    let c = load_from(
        Some("[consumer]\nqueue = \"\"\n[metrics]\nlisten = \"\"\n"),
        "f",
        &[],
    )
    .unwrap();
    assert_eq!(c.consumer.queue, None);
    assert_eq!(c.metrics.listen, None);
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let e = refused("[store]\npaht = \"x\"\n");
    assert!(e.contains("paht"), "{e}");
    let e = refused("[stroe]\n");
    assert!(e.contains("stroe"), "{e}");
}

#[test]
fn bad_values_name_the_key_and_the_file() {
    for (text, expected) in [
        ("[publish]\nmax_in_flight = 0\n", "publish.max_in_flight: must be at least 1 (from f.toml)"),
        ("[publish]\nmax_attempts = 0\n", "publish.max_attempts: must be at least 1 (from f.toml)"),
        ("[consumer]\nmax_attempts = 0\n", "consumer.max_attempts: must be at least 1 (from f.toml)"),
        ("[consumer]\nprefetch = 0\n", "consumer.prefetch: must be at least 1 (from f.toml)"),
        ("[store]\nmax_pending = 0\n", "store.max_pending: must be at least 1 (from f.toml)"),
        ("[submit]\nmax_connections = 0\n", "submit.max_connections: must be at least 1 (from f.toml)"),
        ("[purge]\nbatch_size = 0\n", "purge.batch_size: must be at least 1 (from f.toml)"),
        (
            "[submit]\nsocket_mode = \"999\"\n",
            "submit.socket_mode: \"999\" is not an octal file mode like \"0660\" (from f.toml)",
        ),
        (
            "[purge]\nat = \"24:00\"\n",
            "purge.at: \"24:00\" is not a time of day like \"03:00\" (from f.toml)",
        ),
        (
            "[metrics]\nlisten = \"localhost\"\n",
            "metrics.listen: \"localhost\" is not an address like \"127.0.0.1:9464\" (from f.toml)",
        ),
        (
            "[consumer]\nbindings = [{ exchange = \"x\", exchange_type = \"bogus\" }]\n",
            "consumer.bindings[0].exchange_type: \"bogus\" is not one of direct, fanout, topic, headers (from f.toml)",
        ),
    ] {
        assert_eq!(refused(text), expected, "{text}");
    }
    let e = refused("[consumer]\nprefetch = 70000\n");
    assert!(e.starts_with("consumer.prefetch: "), "{e}");
    let e = refused("[publish]\nconfirm_timeout = \"soon\"\n");
    assert!(e.starts_with("publish.confirm_timeout: "), "{e}");
    let e = refused("[submit]\nsocket_mode = 660\n");
    assert!(e.starts_with("submit.socket_mode: invalid type"), "{e}");
    let e = refused("[store]\nsynchronous = \"off\"\n");
    assert!(e.starts_with("store.synchronous: "), "{e}");
}

#[test]
fn passwords_are_not_in_debug_output() {
    let c = Config::default();
    assert!(!format!("{c:?}").contains("guest:guest"));
}

/// `check-config` prints the serialized configuration: the same syntax the
/// file is written in, every key present, "" for what is not set.
const DEFAULTS_PRINTED: &str = r#"[store]
path = "edge-outbox.db"
synchronous = "full"
max_pending = 1000000
max_db_size = "2.0 GiB"
min_free_disk = "64.0 MiB"
key_file = ""
room_failed_grace = "7d"

[submit]
socket = "edge-outbox.sock"
socket_mode = "0660"
allowed_uids = []
allowed_gids = []
max_message_size = "1.0 MiB"
max_connections = 1024
idle_timeout = "5m"

[broker]
urls = ["amqp://guest:guest@127.0.0.1:5672/%2f"]
password_file = ""
heartbeat = "10s"
connect_timeout = "10s"
tls_ca_file = ""
tls_cert_file = ""
tls_key_file = ""

[publish]
max_in_flight = 256
confirm_timeout = "30s"
max_attempts = 4
retry_interval = "1m"
resend_every = "30s"
max_rate = 0
max_bytes_rate = "0 B"
order = "oldest_first"
max_age = ""

[consumer]
queue = ""
queue_type = "classic"
bindings = []
prefetch = 1
handler = "record"
exec = []
handler_timeout = "30s"
max_attempts = 2
dead_letter_exchange = ""

[purge]
at = "03:00"
retention = "30d"
failed_retention = "90d"
batch_size = 1000

[metrics]
listen = ""

[log]
level = "info"
format = "auto"
"#;

#[test]
fn the_printed_configuration_is_the_written_syntax_and_loads_again() {
    let shown = toml::to_string(&Config::default()).unwrap();
    assert_eq!(shown, DEFAULTS_PRINTED);
    let file = "[submit]\nsocket_mode = \"0600\"\n[broker]\npassword_file = \"/run/pw\"\n\
                [consumer]\nqueue = \"q\"\ndead_letter_exchange = \"dlx\"\n\
                bindings = [{ exchange = \"x\", exchange_type = \"fanout\" }]\n\
                [purge]\nat = \"04:30\"\nbatch_size = 50\n[metrics]\nlisten = \"[::1]:9464\"\n\
                [publish]\norder = \"newest_first\"\nmax_age = \"2h\"\n";
    let c = load_from(Some(file), "f", &[]).unwrap();
    let shown = toml::to_string(&c).unwrap();
    for line in [
        "socket_mode = \"0600\"",
        "password_file = \"/run/pw\"",
        "queue = \"q\"",
        "dead_letter_exchange = \"dlx\"",
        "exchange_type = \"fanout\"",
        "at = \"04:30\"",
        "batch_size = 50",
        "listen = \"[::1]:9464\"",
        "order = \"newest_first\"",
        "max_age = \"2h\"",
    ] {
        assert!(shown.lines().any(|l| l == line), "{line} not in {shown}");
    }
    let again = load_from(Some(&shown), "round trip", &[]).unwrap();
    assert_eq!(toml::to_string(&again).unwrap(), shown);
}
