//! Misbehaving peers: an upstream that answers garbage, a client that walks away in the
//! middle of a download, and thousands of idle keep-alive connections beside live traffic.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An "upstream" that answers every connection with bytes that are not HTTP.
async fn garbage_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02 not http at all\r\n\r\n")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_garbage_is_a_502() {
    let upstream = garbage_upstream().await;
    let gw = Gateway::builder(&format!("http://{upstream}"))
        .start()
        .await;
    let token = gw.token_for(&[REPO_A]).await;
    let r = call_with_auth(gw.proxy, "GET", &file_url(REPO_A), &bearer(&token)).await;
    assert_refused(&r, 502, "upstream_unavailable");
}

/// A client that disconnects mid-download ends the request: the gateway stops pulling
/// from the upstream (bytes stop growing far below the body size) and the request leaves
/// the in-flight gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_disconnect_cancels_the_upstream_transfer() {
    let fake = FakeRelace::start().await;
    let gw = Gateway::start(&fake).await;
    let token = gw.token_for(&[REPO_A]).await;
    let one_gib: u64 = 1 << 30;
    let req = http::Request::get(format!("/v1/repo/{REPO_A}/big?bytes={one_gib}"))
        .header("host", "scopegate")
        .header("authorization", bearer(&token))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = hyper_send(gw.proxy, req).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut received = 0u64;
    while received < 4 << 20 {
        let frame = body.frame().await.expect("frame").expect("body ok");
        received += frame.data_ref().map_or(0, |d| d.len() as u64);
    }
    drop(body); // the client goes away after 4 MiB of 1 GiB

    let inflight = "scopegate_inflight_requests{listener=\"proxy\"}";
    let bytes_out = "scopegate_body_bytes_total{direction=\"response\"}";
    // Bounded wait for the gateway to notice the close.
    let mut settled = None;
    for _ in 0..100 {
        let m = gw.metrics().await;
        if metric_value(&m, inflight) == 0.0 {
            settled = Some(metric_value(&m, bytes_out));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = settled.expect("the abandoned request never left the in-flight gauge");
    assert!(
        settled < (one_gib / 4) as f64,
        "the gateway kept pulling after the client left: {settled} bytes"
    );
    // And it stays put: nothing is still streaming in the background.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(metric_value(&gw.metrics().await, bytes_out), settled);
    // The gateway keeps serving.
    let ok = call_with_auth(gw.proxy, "GET", &file_url(REPO_A), &bearer(&token)).await;
    assert_eq!(ok.status, 200);
}

/// 3,000 idle keep-alive connections beside live traffic: the live requests are served
/// and the memory each idle connection costs is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_keep_alive_connections_beside_live_traffic() {
    const IDLE: usize = 3000;
    let fake = FakeRelace::start().await;
    let builder = Gateway::builder(&fake.url()).set("proxy.header_read_timeout", "\"120s\"");
    let gp = GatewayProcess::spawn(&builder);
    let token = new_token();
    let reg = register_at(
        gp.admin,
        &serde_json::json!({"token": token, "name": "scale", "repo_ids": [REPO_A]}),
    )
    .await;
    assert_eq!(reg.status, 201);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n",
        file_url(REPO_A)
    );
    // Warm up, then measure.
    let warm = call_with_auth(gp.proxy, "GET", &file_url(REPO_A), &bearer(&token)).await;
    assert_eq!(warm.status, 200);
    let before = gp.rss_kib();

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let mut s = TcpStream::connect(gp.proxy).await.expect("connect");
        // One real request each, so every connection is an established keep-alive one.
        s.write_all(request.as_bytes()).await.expect("write");
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.expect("response");
        assert_eq!(&head, b"HTTP/1.1 200");
        idle.push(s);
    }
    let after = gp.rss_kib();
    let per_connection = (after.saturating_sub(before) * 1024) / IDLE as u64;
    println!(
        "idle keep-alive connections: {IDLE}; RSS {before} KiB -> {after} KiB; about {per_connection} bytes each"
    );
    assert!(
        per_connection < 64 * 1024,
        "{per_connection} bytes per idle connection"
    );

    // Live traffic still flows while they are held.
    for _ in 0..200 {
        let r = call_with_auth(gp.proxy, "GET", &file_url(REPO_A), &bearer(&token)).await;
        assert_eq!(r.status, 200);
    }
    drop(idle);
}

/// A client whose chunked body is malformed gets a 400 (its own fault), not a 502 that
/// would blame the upstream and invite a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_request_body_is_the_clients_fault() {
    let fake = FakeRelace::start().await;
    let gw = Gateway::start(&fake).await;
    let token = gw.token_for(&[REPO_A]).await;
    let mut s = TcpStream::connect(gw.proxy).await.expect("connect");
    let head = format!(
        "PUT /v1/repo/{REPO_A}/file/a.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(b"4\r\nabcd\r\nzz-not-a-size\r\n")
        .await
        .expect("body");
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw)).await;
    let r = support::raw::parse_response(&raw);
    assert_refused(&r, 400, "bad_request");
    // The gateway keeps serving, and counts it under its own code.
    let ok = call_with_auth(gw.proxy, "GET", &file_url(REPO_A), &bearer(&token)).await;
    assert_eq!(ok.status, 200);
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "scopegate_requests_total{decision=\"bad_request\",listener=\"proxy\"}"
        ),
        1.0
    );
}
