//! Self-tests of the test kit (`testkit/`): the fault proxy, the
//! restartable broker node and its locks, and the AMQP helpers.

use std::future::Future;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use edge_outbox_testkit::{amqp, broker, node, Cleanup, FaultProxy, Mode};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::time::timeout;

fn broker_addr() -> SocketAddr {
    broker::DEFAULT_ADDR.parse().unwrap()
}

/// Polls `condition` every 20 ms; panics with `what` after `deadline`.
async fn wait_for(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a future on a runtime of its own (for the sync node tests).
fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Whether an AMQP connection to `url` opens within 5 s.
async fn can_connect(url: &str) -> bool {
    match timeout(Duration::from_secs(5), connect(url)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close(200, "OK".into()).await;
            true
        }
        _ => false,
    }
}

async fn connect(url: &str) -> lapin::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default()).await
}

#[test]
fn url_for_rewrites_host_and_port_only() {
    let proxy = FaultProxy::start("127.0.0.1:9".parse().unwrap());
    let a = proxy.addr();
    assert_eq!(a.ip().to_string(), "127.0.0.1");
    assert_eq!(
        proxy.url_for("amqp://guest:guest@127.0.0.1:5672/%2f"),
        format!("amqp://guest:guest@{a}/%2f")
    );
    assert_eq!(proxy.url_for("amqp://localhost"), format!("amqp://{a}"));
    assert_eq!(
        proxy.url_for("amqp://u:p%40ss@broker.example:5671/vh?heartbeat=5"),
        format!("amqp://u:p%40ss@{a}/vh?heartbeat=5")
    );
    assert_eq!(proxy.connections(), 0);
    assert_eq!(proxy.total_accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_passes_amqp_traffic() {
    let url = broker::default_url();
    let proxy = FaultProxy::start(broker_addr());
    let via_proxy = proxy.url_for(&url);
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("harness-pass"));

    amqp::declare_queue(&via_proxy, &queue).await;
    amqp::publish(&via_proxy, "", &queue, b"through the proxy").await;
    assert_eq!(amqp::queue_len(&url, &queue).await, 1);
    let got = amqp::get_all(&via_proxy, &queue).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].delivery.data, b"through the proxy");
    assert_eq!(amqp::queue_len(&url, &queue).await, 0);

    // Each helper call above used a connection of its own through the proxy.
    assert_eq!(proxy.total_accepted(), 3);
    wait_for(
        "proxied connections to close",
        Duration::from_secs(5),
        || proxy.connections() == 0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_all_breaks_open_connections() {
    let url = broker::default_url();
    let proxy = FaultProxy::start(broker_addr());
    let via_proxy = proxy.url_for(&url);
    let conn = connect(&via_proxy).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    assert_eq!(proxy.connections(), 1);

    proxy.cut_all();
    assert_eq!(proxy.connections(), 0);
    wait_for(
        "the client to see its connection fail",
        Duration::from_secs(5),
        || !conn.status().connected(),
    )
    .await;
    let declared = timeout(
        Duration::from_secs(5),
        channel.queue_declare(
            amqp::unique("harness-cut").into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("a call on a cut connection fails fast");
    assert!(declared.is_err(), "declare on a cut connection succeeded");

    // The proxy itself still passes new connections.
    assert!(can_connect(&via_proxy).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_holds_traffic_until_pass() {
    let url = broker::default_url();
    let proxy = FaultProxy::start(broker_addr());
    let via_proxy = proxy.url_for(&url);
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("harness-stall"));
    amqp::declare_queue(&url, &queue).await;

    let conn = connect(&via_proxy).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    proxy.set_mode(Mode::Stall);
    let publish = timeout(
        Duration::from_secs(5),
        channel.basic_publish(
            "".into(),
            queue.clone().into(),
            BasicPublishOptions::default(),
            b"held back",
            BasicProperties::default().with_delivery_mode(2),
        ),
    )
    .await
    .expect("basic_publish itself returns while stalled")
    .unwrap();
    let mut confirm = tokio::spawn(publish);
    assert!(
        timeout(Duration::from_millis(1500), &mut confirm)
            .await
            .is_err(),
        "a publish was confirmed through a stalled proxy"
    );
    assert_eq!(amqp::queue_len(&url, &queue).await, 0);
    assert!(
        timeout(Duration::from_secs(1), connect(&via_proxy))
            .await
            .is_err(),
        "a connection opened through a stalled proxy"
    );
    assert!(
        conn.status().connected(),
        "stall must not close connections"
    );

    proxy.set_mode(Mode::Pass);
    // What was held back is delivered: the confirm arrives, the message is there.
    let confirmation = timeout(Duration::from_secs(10), confirm)
        .await
        .expect("confirm after Pass")
        .unwrap()
        .unwrap();
    assert!(confirmation.is_ack());
    assert_eq!(amqp::queue_len(&url, &queue).await, 1);
    // And new connections work again.
    assert!(can_connect(&via_proxy).await);
    let _ = conn.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_fails_new_connections_fast() {
    let url = broker::default_url();
    let proxy = FaultProxy::start(broker_addr());
    let via_proxy = proxy.url_for(&url);
    let open = connect(&via_proxy).await.unwrap();

    proxy.set_mode(Mode::Refuse);
    let started = Instant::now();
    let err = TcpStream::connect_timeout(&proxy.addr(), Duration::from_secs(2)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    let attempt = timeout(Duration::from_secs(5), connect(&via_proxy))
        .await
        .expect("a refused AMQP connect fails, not hangs");
    assert!(attempt.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Open connections are left alone.
    let channel = open.create_channel().await.unwrap();
    channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    proxy.set_mode(Mode::Pass);
    assert!(can_connect(&via_proxy).await);
    let _ = open.close(200, "OK".into()).await;
}

#[test]
fn restartable_node_stops_and_starts() {
    let node = node::lock_restartable();
    let url = node.url();
    block_on(async {
        let conn = connect(&url).await.unwrap();

        let t = Instant::now();
        tokio::task::block_in_place(|| node.stop());
        eprintln!("stop took {:?}", t.elapsed());
        wait_for(
            "the open connection to be closed",
            Duration::from_secs(10),
            || !conn.status().connected(),
        )
        .await;
        assert!(!can_connect(&url).await, "connected to a stopped node");

        let t = Instant::now();
        tokio::task::block_in_place(|| node.start());
        eprintln!("start took {:?}", t.elapsed());
        assert!(can_connect(&url).await, "no connection after start");
    });
}

#[test]
fn restartable_node_halts_and_starts() {
    let node = node::lock_restartable();
    let url = node.url();
    assert!(!node.os_pids().is_empty());
    let t = Instant::now();
    node.halt();
    eprintln!("halt took {:?}", t.elapsed());
    assert!(node.os_pids().is_empty());
    assert!(!block_on(can_connect(&url)), "connected to a halted node");
    let t = Instant::now();
    node.start();
    eprintln!("start after halt took {:?}", t.elapsed());
    assert!(block_on(can_connect(&url)), "no connection after start");
}

#[test]
fn restartable_node_survives_kill9_with_durable_messages() {
    let node = node::lock_restartable();
    let url = node.url();
    let queue = amqp::unique("harness-kill9");
    block_on(async {
        amqp::declare_queue(&url, &queue).await;
        amqp::publish(&url, "", &queue, b"persistent").await;
        let conn = connect(&url).await.unwrap();

        let pids = node.os_pids();
        let t = Instant::now();
        tokio::task::block_in_place(|| node.kill9());
        eprintln!("kill9 of {pids:?} took {:?}", t.elapsed());
        wait_for(
            "the open connection to fail",
            Duration::from_secs(10),
            || !conn.status().connected(),
        )
        .await;
        assert!(!can_connect(&url).await, "connected to a killed node");

        let t = Instant::now();
        tokio::task::block_in_place(|| node.start());
        eprintln!("start after kill9 took {:?}", t.elapsed());
        assert_ne!(node.os_pids(), pids);
        assert_eq!(amqp::queue_len(&url, &queue).await, 1);
        let got = amqp::get_all(&url, &queue).await;
        assert_eq!(got[0].delivery.data, b"persistent");
        amqp::delete_queue(&url, &queue).await;
    });
}

#[test]
fn shared_guard_and_restartable_see_the_node_up() {
    let shared = node::share_restartable();
    assert!(shared.is_up());
    let node = node::restartable();
    assert_eq!(node.url(), shared.url());
    assert!(node.url().contains(&node::NODE_PORT.to_string()));
    assert!(node.is_up());
    assert!(!node.os_pids().is_empty());
}

#[test]
fn exclusive_guard_excludes_shared_users() {
    let exclusive = node::lock_restartable();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let shared = node::share_restartable();
        tx.send(()).unwrap();
        assert!(shared.is_up());
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "a shared guard was granted while the exclusive one is held"
    );
    drop(exclusive);
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the shared guard after the exclusive one is dropped");
    waiter.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_what_it_was_given() {
    let url = broker::default_url();
    let exchange = amqp::unique("harness-x");
    let queue = amqp::unique("harness-q");
    assert_ne!(amqp::unique("harness-q"), queue);
    {
        let mut cleanup = Cleanup::new(&url);
        cleanup.exchange(exchange.clone());
        cleanup.queue(queue.clone());
        amqp::declare_exchange_with_queue(&url, &exchange, &queue, "rk").await;
        amqp::publish(&url, &exchange, "rk", b"routed").await;
        assert_eq!(amqp::queue_len(&url, &queue).await, 1);
    }
    let conn = amqp::connect(&url).await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let channel = conn.create_channel().await.unwrap();
    let q = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await;
    assert!(q.is_err(), "queue still exists after Cleanup");
    let channel = conn.create_channel().await.unwrap();
    let x = channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(x.is_err(), "exchange still exists after Cleanup");
    let _ = conn.close(200, "OK".into()).await;
}
