//! Client connections: a keep-alive connection idle for `PARK_AFTER` is
//! parked (hyper's buffers freed, only the socket kept) and serves its
//! next request on the same socket; what the client sent before the park
//! is not lost; the header timeout and a shutdown hold across a park.
//! The test config's `header_read_timeout_ms` is 2000.

use std::time::{Duration, Instant};

use creditgate::connection::PARK_AFTER;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{self, TestApp, wait_until};

const HEADER_TIMEOUT: Duration = Duration::from_millis(2000);

/// Parked client connections, read on a connection of its own that
/// closes (so that it is never counted itself).
async fn parked(app: &TestApp) -> f64 {
    let (status, body) = common::raw(
        app.addr,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    body.lines()
        .find_map(|l| {
            l.strip_prefix(r#"creditgate_client_connections{state="parked"} "#)?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no parked gauge in:\n{body}"))
}

fn get(key: &str) -> Vec<u8> {
    format!("GET /rag/q HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n").into_bytes()
}

/// Reads one response off a keep-alive connection: its status line, once
/// the body (by Content-Length or chunks) has been read whole.
async fn response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("response in time")
            .expect("read");
        assert_eq!(n, 1, "connection closed mid-response: {buf:?}");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let lower = head.to_ascii_lowercase();
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.expect("body");
    } else if lower.contains("transfer-encoding: chunked") {
        let mut tail = Vec::new();
        while !tail.ends_with(b"0\r\n\r\n") {
            let n = s.read(&mut byte).await.expect("chunk");
            assert_eq!(n, 1, "connection closed mid-body");
            tail.push(byte[0]);
        }
    }
    head.lines().next().unwrap_or("").to_owned()
}

/// A connection that has had one answered request: the moment the answer
/// was read starts its idle period.
async fn after_one_request(app: &TestApp, key: &str) -> (TcpStream, Instant) {
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    s.write_all(&get(key)).await.expect("write");
    let status = response(&mut s).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    (s, Instant::now())
}

/// Waits until the client sees the connection closed; how long after
/// `since` that was.
async fn closed_after(s: &mut TcpStream, since: Instant) -> Duration {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "still open 8 s later");
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_connection_is_parked_and_serves_its_next_request_on_the_same_socket() {
    let app = TestApp::spawn().await;
    let user = app.create_user("enterprise").await;
    let (mut s, _) = after_one_request(&app, &user.key).await;
    // The test client's own pooled connection (create_user) parks too, so
    // the count is not 1: what shows this socket is the count falling by
    // one when it speaks again.
    wait_until(
        "the connection is parked",
        Duration::from_secs(5),
        || async { parked(&app).await >= 1.0 },
    )
    .await;
    tokio::time::sleep(PARK_AFTER / 4).await;
    let before = parked(&app).await;
    s.write_all(&get(&user.key)).await.expect("write");
    let status = response(&mut s).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(parked(&app).await, before - 1.0);
    assert_eq!(app.upstream.hits(), 2);
    // And it parks again.
    wait_until("parked again", Duration::from_secs(5), || async {
        parked(&app).await == before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_head_split_across_a_park_is_served() {
    let app = TestApp::spawn().await;
    let user = app.create_user("enterprise").await;
    let (mut s, _) = after_one_request(&app, &user.key).await;
    let next = get(&user.key);
    let (first, rest) = next.split_at(next.len() / 2);
    s.write_all(first).await.expect("write");
    // Past the park, within the header timeout: the first half was read by
    // the hyper connection that was taken apart.
    tokio::time::sleep(PARK_AFTER + Duration::from_millis(400)).await;
    s.write_all(rest).await.expect("write");
    let status = response(&mut s).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(app.upstream.hits(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_dribbled_across_parks_is_cut_off_at_the_header_timeout() {
    let app = TestApp::spawn().await;
    let user = app.create_user("enterprise").await;
    let (s, idle_since) = after_one_request(&app, &user.key).await;
    let (mut read, mut write) = s.into_split();
    // One byte of a head that never ends, every 200 ms: each park would
    // otherwise hand a fresh hyper connection a fresh header timeout.
    let dribble = tokio::spawn(async move {
        loop {
            if write.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(8), read.read_to_end(&mut rest)).await;
    let elapsed = idle_since.elapsed();
    dribble.abort();
    assert!(closed.is_ok(), "still open 8 s later");
    assert!(
        elapsed >= HEADER_TIMEOUT - Duration::from_millis(300)
            && elapsed < HEADER_TIMEOUT + Duration::from_millis(800),
        "closed {elapsed:?} after the last response"
    );
    assert_eq!(app.upstream.hits(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_parked_connection_is_closed_at_the_header_timeout() {
    let app = TestApp::spawn().await;
    let user = app.create_user("enterprise").await;
    let (mut s, idle_since) = after_one_request(&app, &user.key).await;
    let elapsed = closed_after(&mut s, idle_since).await;
    assert!(
        elapsed >= HEADER_TIMEOUT - Duration::from_millis(300)
            && elapsed < HEADER_TIMEOUT + Duration::from_millis(800),
        "closed {elapsed:?} after the last response"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_the_gateway_closes_parked_connections_at_once() {
    let app = TestApp::spawn().await;
    let user = app.create_user("enterprise").await;
    // An instance of its own, to stop and to wait for.
    let (addr, stop, running) = app.second_instance_running().await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&get(&user.key)).await.expect("write");
    let status = response(&mut s).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    tokio::time::sleep(PARK_AFTER + Duration::from_millis(300)).await;
    let asked = Instant::now();
    let _ = stop.send(());
    // Well before the header timeout would close it anyway (0.7 s).
    tokio::time::timeout(Duration::from_millis(400), running)
        .await
        .expect("stopped at once")
        .expect("join")
        .expect("run");
    let elapsed = closed_after(&mut s, asked).await;
    assert!(elapsed < Duration::from_millis(400), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_unread_rest_of_an_upload_is_never_read_as_a_request() {
    let app = TestApp::spawn().await;
    let user = app.create_user("enterprise").await;
    // The upstream answers /status/200 without reading the upload, so the
    // response is done while the rest of the body is still to come. That
    // rest is a whole request head: were the connection taken apart, or
    // simply kept, with the body unread, it would be served as a request
    // the gateway never saw as one. (hyper closes the connection here:
    // the upstream client drops the unread body. `ClientBody` keeps the
    // connection from being parked in any case where a body outlives its
    // response.)
    let smuggled = format!(
        "GET /rag/status/418 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        user.key
    );
    let padding = "A".repeat(16);
    let head = format!(
        "POST /rag/status/200 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        user.key,
        padding.len() + smuggled.len()
    );
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    s.write_all(format!("{head}{padding}").as_bytes())
        .await
        .expect("write");
    let status = response(&mut s).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    tokio::time::sleep(PARK_AFTER + Duration::from_millis(400)).await;
    // Closed by now or not: either way nothing may come of these bytes
    // but the body's end.
    let _ = s.write_all(smuggled.as_bytes()).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut rest)).await;
    let targets: Vec<String> = app
        .upstream
        .captured()
        .into_iter()
        .map(|c| c.target)
        .collect();
    assert_eq!(
        targets.len(),
        1,
        "a body was served as a request: {targets:?}"
    );
    assert!(!String::from_utf8_lossy(&rest).contains("418"));
}

/// A gateway whose header timeout is shorter than [`PARK_AFTER`]: the
/// connection's driver is told when a request ends instead of waiting for
/// its next check.
async fn short_header_timeout(ms: u64) -> TestApp {
    TestApp::builder()
        .env("CREDITGATE_SERVER__HEADER_READ_TIMEOUT_MS", &ms.to_string())
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_header_timeout_shorter_than_the_park_closes_an_idle_connection_at_it() {
    let app = short_header_timeout(400).await;
    let user = app.create_user("enterprise").await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    // A stream held 1.5 s: the driver checks at 0.4 s, finds the request
    // running and looks again only a PARK_AFTER later (1.4 s, then 2.4 s).
    // Told when the stream ends, it closes at 1.9 s instead of 2.4 s.
    s.write_all(
        format!(
            "GET /rag/sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            user.key
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let (status, ()) = tokio::join!(response(&mut s), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        app.upstream.release();
    });
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let elapsed = closed_after(&mut s, Instant::now()).await;
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(750),
        "closed {elapsed:?} after the stream ended"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_header_timeout_cuts_off_a_first_head_never_finished() {
    let app = short_header_timeout(400).await;
    let mut s = TcpStream::connect(app.addr).await.expect("connect");
    let opened = Instant::now();
    s.write_all(b"GET /rag/q HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let elapsed = closed_after(&mut s, opened).await;
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_millis(850),
        "closed {elapsed:?} after it opened"
    );
    assert_eq!(app.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_header_timeout_counts_each_idle_gap_and_never_a_running_request() {
    let app = short_header_timeout(400).await;
    let user = app.create_user("enterprise").await;
    let (mut s, _) = after_one_request(&app, &user.key).await;
    // Twelve requests, 250 ms apart: 3 s on one connection, far past the
    // timeout in all, each gap within it.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(&get(&user.key)).await.expect("write");
        let status = response(&mut s).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
    // A stream held open twice as long as the timeout is not cut off.
    s.write_all(
        format!(
            "GET /rag/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            user.key
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let status = response(&mut s).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(app.upstream.hits(), 14);
}
