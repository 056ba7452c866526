//! A TCP fault proxy to put between a client (the agent) and a broker.
//!
//! It runs on a thread of its own with its own tokio runtime, so sync and
//! async tests use it alike. It listens on 127.0.0.1 (an ephemeral port,
//! [`FaultProxy::addr`]) and forwards each connection to the target. Faults:
//!
//! - [`Mode::Refuse`]: the proxy stops listening (the port stays reserved), so
//!   new connections are refused by the kernel (ECONNREFUSED) at once, and
//!   connections queued but not yet accepted are reset. Open connections are
//!   left alone; add [`FaultProxy::cut_all`] to end them too.
//! - [`Mode::Stall`]: a silent blackhole, as if every packet were dropped: open
//!   connections stay open but pass no bytes either way (nor a close or a
//!   reset of one side), and new connections are accepted but not forwarded.
//!   Bytes held back are delivered in order when the mode changes again, as
//!   TCP would after a healed partition.
//! - [`Mode::Pass`]: forward everything.
//! - [`FaultProxy::cut_all`]: reset (RST) every open connection, both sides.
//!
//! Mode changes and cuts have taken effect when the call returns. I/O errors
//! end the connection they happen on (both sides reset), never the proxy.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};

/// What the proxy does with connections; see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Refuse,
    Stall,
}

/// How long `set_mode` and `cut_all` wait for the proxy thread to act.
const ACT_DEADLINE: Duration = Duration::from_secs(5);
/// How long the proxy waits for the target to accept a connection.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

struct Shared {
    target: SocketAddr,
    /// The mode and a sequence number that `set_mode` bumps.
    mode: watch::Sender<(Mode, u64)>,
    /// The last sequence number the accept loop has applied.
    applied: AtomicU64,
    /// Cut generation: `cut_all` bumps it, ending connections accepted before.
    cut: watch::Sender<u64>,
    /// Open connections: id -> cut generation when accepted.
    conns: Mutex<HashMap<u64, u64>>,
    accepted: AtomicUsize,
    next_id: AtomicU64,
}

/// The proxy; stops (closing its connections) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy to `target` in [`Mode::Pass`].
    pub fn start(target: SocketAddr) -> FaultProxy {
        let shared = Arc::new(Shared {
            target,
            mode: watch::Sender::new((Mode::Pass, 0)),
            applied: AtomicU64::new(0),
            cut: watch::Sender::new(0),
            conns: Mutex::new(HashMap::new()),
            accepted: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<SocketAddr>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{target}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    // A socket bound, never listening, reserves the port while
                    // Refuse has closed the listener (both use SO_REUSEPORT).
                    let reserved = match reserve_port() {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let addr = match reserved.local_addr() {
                        Ok(a) => a,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let listener = match listen_on(addr) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(addr));
                    accept_loop(thread_shared, addr, listener, stop_rx).await;
                    drop(reserved);
                });
            })
            .expect("spawn the fault proxy thread");
        let addr = match ready_rx.recv_timeout(ACT_DEADLINE) {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => panic!("fault proxy to {target} failed to start: {e}"),
            Err(e) => panic!("fault proxy to {target} did not start: {e}"),
        };
        FaultProxy {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Where clients connect: 127.0.0.1:<port>.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it forwards to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// `amqp_url` with its host and port replaced by the proxy's address
    /// (scheme, user info, vhost and query kept).
    pub fn url_for(&self, amqp_url: &str) -> String {
        rewrite_authority(amqp_url, self.addr)
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.mode.borrow().0
    }

    /// Switches mode; in effect for new and open connections on return.
    pub fn set_mode(&self, mode: Mode) {
        let mut seq = 0;
        self.shared.mode.send_modify(|(m, s)| {
            *m = mode;
            *s += 1;
            seq = *s;
        });
        let start = Instant::now();
        while self.shared.applied.load(Ordering::SeqCst) < seq {
            if start.elapsed() > ACT_DEADLINE {
                panic!(
                    "fault proxy {}: mode {mode:?} not applied within {ACT_DEADLINE:?}",
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Resets every open connection, both sides (RST); they are closed on return.
    pub fn cut_all(&self) {
        let mut generation = 0;
        self.shared.cut.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        let start = Instant::now();
        loop {
            let left = self
                .lock_conns()
                .values()
                .filter(|g| **g < generation)
                .count();
            if left == 0 {
                return;
            }
            if start.elapsed() > ACT_DEADLINE {
                panic!(
                    "fault proxy {}: {left} connections still open {ACT_DEADLINE:?} after cut_all",
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.lock_conns().len()
    }

    /// Connections accepted since the start.
    pub fn total_accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.shared.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn rewrite_authority(url: &str, addr: SocketAddr) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        panic!("not a URL: {url}");
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority.rfind('@').map_or("", |i| &authority[..=i]);
    format!("{scheme}://{userinfo}{addr}{tail}")
}

fn reserve_port() -> io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    Ok(socket)
}

fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    shared: Arc<Shared>,
    addr: SocketAddr,
    listener: TcpListener,
    mut stop: oneshot::Receiver<()>,
) {
    let mut listener = Some(listener);
    let mut mode_rx = shared.mode.subscribe();
    loop {
        let (mode, seq) = *mode_rx.borrow_and_update();
        if mode == Mode::Refuse {
            listener = None;
        } else if listener.is_none() {
            match listen_on(addr) {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    eprintln!("fault proxy {addr}: cannot listen again: {e}; retrying");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    }
                }
            }
        }
        shared.applied.store(seq, Ordering::SeqCst);
        tokio::select! {
            _ = &mut stop => return,
            changed = mode_rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            accepted = accept(listener.as_ref()) => match accepted {
                Ok((client, _)) => {
                    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
                    let generation = *shared.cut.borrow();
                    shared
                        .conns
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, generation);
                    shared.accepted.fetch_add(1, Ordering::SeqCst);
                    let conn = ConnEntry { shared: Arc::clone(&shared), id };
                    tokio::spawn(serve(conn, client, generation));
                }
                Err(e) => {
                    // E.g. out of file descriptors: pause rather than spin.
                    eprintln!("fault proxy {addr}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Removes the connection from the open set however its task ends.
struct ConnEntry {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnEntry {
    fn drop(&mut self) {
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

async fn serve(conn: ConnEntry, mut client: TcpStream, generation: u64) {
    let shared = Arc::clone(&conn.shared);
    let mut cut = shared.cut.subscribe();
    let mut mode = shared.mode.subscribe();
    // While stalled, hold the client without reaching the target.
    let upstream = tokio::select! {
        _ = cut.wait_for(|g| *g > generation) => None,
        server = async {
            mode.wait_for(|(m, _)| *m != Mode::Stall).await.ok()?;
            tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(shared.target))
                .await
                .ok()?
                .ok()
        } => server,
    };
    let Some(mut server) = upstream else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let clean = {
        let (mut client_rd, mut client_wr) = client.split();
        let (mut server_rd, mut server_wr) = server.split();
        let up = pipe(&mut client_rd, &mut server_wr, shared.mode.subscribe());
        let down = pipe(&mut server_rd, &mut client_wr, shared.mode.subscribe());
        tokio::select! {
            _ = cut.wait_for(|g| *g > generation) => false,
            both = async { tokio::try_join!(up, down) } => both.is_ok(),
        }
    };
    if !clean {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
    drop(conn);
}

/// Copies one direction until EOF (then half-closes the writer) or an error.
/// While stalled, nothing is written, and neither EOF nor an error is passed on.
async fn pipe<R, W>(
    reader: &mut R,
    writer: &mut W,
    mut mode: watch::Receiver<(Mode, u64)>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = reader.read(&mut buf).await;
        if mode.wait_for(|(m, _)| *m != Mode::Stall).await.is_err() {
            return Err(io::Error::other("fault proxy stopped"));
        }
        match read? {
            0 => return writer.shutdown().await,
            n => writer.write_all(&buf[..n]).await?,
        }
    }
}
