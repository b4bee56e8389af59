//! Connection and request-head limits: oversized heads, too many headers, slowloris,
//! idle keep-alive connections and the connection cap all end in a clean HTTP error or a
//! closed connection, never a hang, and never reach the upstream.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the peer closes (or `within` passes); returns the bytes and whether the
/// close was seen.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

async fn gateway_with(fake: &FakeRelace, settings: &[(&str, &str)]) -> Gateway {
    let mut builder = Gateway::builder(&fake.url());
    for (key, value) in settings {
        builder = builder.set(key, value);
    }
    builder.start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_gets_431_and_reaches_nothing() {
    let fake = FakeRelace::start().await;
    let gw = gateway_with(&fake, &[("proxy.max_header_bytes", "16384")]).await;
    let token = gw.token_for(&[REPO_A]).await;
    let auth = bearer(&token);
    let big = "x".repeat(100 * 1024);
    let r = call(
        gw.proxy,
        "GET",
        &file_url(REPO_A),
        &[("Authorization", &auth), ("X-Big", &big)],
        b"",
    )
    .await;
    assert_eq!(r.status, 431);
    assert_eq!(fake.request_count(), 0);
    // The gateway still serves normal traffic.
    let ok = call_with_auth(gw.proxy, "GET", &file_url(REPO_A), &auth).await;
    assert_eq!(ok.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_get_431_and_reach_nothing() {
    let fake = FakeRelace::start().await;
    let gw = gateway_with(&fake, &[("proxy.max_headers", "50")]).await;
    let token = gw.token_for(&[REPO_A]).await;
    let auth = bearer(&token);
    let names: Vec<String> = (0..1000).map(|i| format!("X-H{i}")).collect();
    let mut headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
    headers.push(("Authorization", &auth));
    let r = call(gw.proxy, "GET", &file_url(REPO_A), &headers, b"").await;
    assert_eq!(r.status, 431);
    assert_eq!(fake.request_count(), 0);
    let ok = call_with_auth(gw.proxy, "GET", &file_url(REPO_A), &auth).await;
    assert_eq!(ok.status, 200);
}

/// 300 connections that never finish their request head do not delay a normal request
/// by more than a second, and are closed within the head read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_delay_normal_requests_and_is_cut_at_the_head_timeout() {
    let fake = FakeRelace::start().await;
    let gw = gateway_with(&fake, &[("proxy.header_read_timeout", "\"2s\"")]).await;
    let token = gw.token_for(&[REPO_A]).await;
    let auth = bearer(&token);
    let mut stalled = Vec::with_capacity(300);
    let opened = Instant::now();
    for _ in 0..300 {
        let mut s = TcpStream::connect(gw.proxy).await.expect("connect");
        s.write_all(b"GET /v1/repo/").await.expect("partial head");
        stalled.push(s);
    }
    let started = Instant::now();
    let r = call_with_auth(gw.proxy, "GET", &file_url(REPO_A), &auth).await;
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a normal request took {:?} beside 300 stalled connections",
        started.elapsed()
    );
    // Each stalled connection is closed by the gateway (hyper answers 408 or just closes)
    // within the 2 s head timeout, with slack for 300 timers on a loaded machine.
    for mut s in stalled {
        let (_, closed) = read_until_closed(&mut s, Duration::from_secs(6)).await;
        assert!(
            closed,
            "a stalled connection was still open after {:?}",
            opened.elapsed()
        );
    }
    assert!(opened.elapsed() < Duration::from_secs(8));
    assert_eq!(
        fake.request_count(),
        1,
        "only the normal request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let fake = FakeRelace::start().await;
    let gw = gateway_with(&fake, &[("proxy.header_read_timeout", "\"1s\"")]).await;
    let token = gw.token_for(&[REPO_A]).await;
    let mut s = TcpStream::connect(gw.proxy).await.expect("connect");
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n",
        file_url(REPO_A)
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let started = Instant::now();
    let (bytes, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "an idle keep-alive connection stayed open");
    assert!(String::from_utf8_lossy(&bytes).starts_with("HTTP/1.1 200"));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the idle timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed_at_once() {
    let fake = FakeRelace::start().await;
    let gw = gateway_with(&fake, &[("proxy.max_connections", "4")]).await;
    let token = gw.token_for(&[REPO_A]).await;
    let auth = bearer(&token);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(gw.proxy).await.expect("connect");
        // A complete request proves the connection was accepted and is being served.
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n",
            file_url(REPO_A)
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.expect("response");
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    let mut extra = TcpStream::connect(gw.proxy)
        .await
        .expect("the kernel accepts the TCP connect");
    let (bytes, closed) = read_until_closed(&mut extra, Duration::from_secs(3)).await;
    assert!(
        closed && bytes.is_empty(),
        "the fifth connection should be closed without a response"
    );
    drop(held);
    // Once connections are released, new ones are served again (bounded retry while the
    // gateway notices the closes).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(gw.proxy).await.expect("connect");
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: {auth}\r\n\r\n",
            file_url(REPO_A)
        );
        let _ = s.write_all(req.as_bytes()).await;
        let (bytes, _) = read_until_closed(&mut s, Duration::from_secs(3)).await;
        if bytes.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "connections were not released");
        tokio::task::yield_now().await;
    }
}
