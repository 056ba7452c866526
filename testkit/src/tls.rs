//! TLS towards the broker for the TLS tests: a throw-away CA and server
//! certificate made with `openssl` ([`make_certificates`]) and a TLS
//! listener (`socat`) in front of the shared broker ([`TlsListener`]).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::broker;
use crate::metrics::free_port;
use crate::wait::wait_until;

/// How long the listener gets to accept connections.
const LISTEN_DEADLINE: Duration = Duration::from_secs(120);

/// A CA and a server certificate for localhost/127.0.0.1, made with openssl.
pub fn make_certificates(dir: &Path, name: &str) -> (String, String, String) {
    let path = |f: &str| dir.join(format!("{name}-{f}")).display().to_string();
    let (ca_key, ca, key, csr, cert, ext) = (
        path("ca.key"),
        path("ca.pem"),
        path("server.key"),
        path("server.csr"),
        path("server.pem"),
        path("ext.cnf"),
    );
    std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("ext");
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &csr,
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &cert,
        "-days",
        "2",
        "-extfile",
        &ext,
    ]);
    (ca, cert, key)
}

/// A TLS listener in front of the broker (socat), with the test's certificate.
pub struct TlsListener {
    child: Child,
    /// Where it accepts TLS, on 127.0.0.1 (and `localhost`).
    pub port: u16,
}

impl TlsListener {
    /// Starts `socat` with `cert` and `key`; returns once it accepts.
    pub fn start(cert: &str, key: &str) -> TlsListener {
        let port = free_port();
        let child = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},reuseaddr,fork,cert={cert},key={key},verify=0,bind=127.0.0.1"
            ))
            .arg(format!("TCP:{}", broker::DEFAULT_ADDR))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (scripts/test-setup installs it)");
        wait_until("the TLS listener", LISTEN_DEADLINE, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        TlsListener { child, port }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
