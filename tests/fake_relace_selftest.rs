//! Checks that the fake Relace upstream behaves as the integration tests
//! assume, using a hand-written HTTP/1.1 client so that a bug in a real client
//! (or in scopegate) cannot mask a bug in the fake.

#[path = "support/fake_relace.rs"]
mod fake_relace;
#[path = "support/raw.rs"]
mod raw;

use std::time::{Duration, Instant};

use fake_relace::{pattern_sha256, FakeRelace, ACCOUNT_KEY};
use raw::{build_request, call, call_with_auth, find, parse_response, post_json, sha_hex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REPO: &str = "0b9c5f0e-6a53-4c62-9a0e-6e1f0a1c2d3e";

#[tokio::test]
async fn repo_token_lifecycle() {
    let fake = FakeRelace::start().await;
    let addr = fake.addr();
    let auth = format!("Bearer {ACCOUNT_KEY}");
    let create = format!(r#"{{"name":"agent-1","repo_ids":["{REPO}"],"ttl_seconds":600}}"#);

    let denied = call(addr, "POST", "/v1/repo_token", &[], create.as_bytes()).await;
    assert_eq!(denied.status, 401);
    assert_eq!(denied.header("www-authenticate"), Some("Bearer"));
    assert_eq!(denied.json()["error"], "Invalid authentication credentials");

    let bad = call(
        addr,
        "POST",
        "/v1/repo_token",
        &[("Authorization", &auth)],
        b"{not json",
    )
    .await;
    assert_eq!(bad.status, 422);
    assert!(bad.json().get("detail").is_some());

    let created = post_json(addr, "/v1/repo_token", &auth, create.as_bytes()).await;
    assert_eq!(created.status, 200);
    let created = created.json();
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("rlcr-") && token.len() == 45, "{token}");
    assert!(token[5..]
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(created["name"], "agent-1");
    assert_eq!(created["repo_ids"][0], REPO);
    assert!(created["expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(fake.has_token(&token));

    let got = call_with_auth(addr, "GET", &format!("/v1/repo_token/{token}"), &auth).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["name"], "agent-1");
    assert!(
        got.json().get("token").is_none(),
        "secret is shown only once"
    );

    let deleted = call_with_auth(addr, "DELETE", &format!("/v1/repo_token/{token}"), &auth).await;
    assert_eq!(deleted.status, 204);
    assert!(!fake.has_token(&token));
    let gone = call_with_auth(addr, "GET", &format!("/v1/repo_token/{token}"), &auth).await;
    assert_eq!(gone.status, 404);

    let minted = fake.mint("direct", &[REPO], None);
    assert!(fake.has_token(&minted));
    let got = call_with_auth(addr, "GET", &format!("/v1/repo_token/{minted}"), &auth).await;
    assert_eq!(got.json()["expires_at"], serde_json::Value::Null);

    let list = call_with_auth(addr, "GET", "/v1/repo", &auth).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["total_items"], 0);
}

#[tokio::test]
async fn download_matches_pattern_sha() {
    let fake = FakeRelace::start().await;
    let n = 300_001;
    let target = format!("/v1/repo/{REPO}/file/big.bin?bytes={n}");
    let resp = call(fake.addr(), "GET", &target, &[], b"").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-length"), Some("300001"));
    assert_eq!(
        resp.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(
        resp.header("content-disposition"),
        Some("attachment; filename=\"big.bin\"")
    );
    assert_eq!(resp.body.len(), n);
    assert_eq!(resp.body[252], 1);
    assert_eq!(sha_hex(&resp.body), pattern_sha256(n as u64));

    let chunked = call(fake.addr(), "GET", &format!("{target}&chunked=1"), &[], b"").await;
    assert_eq!(chunked.header("transfer-encoding"), Some("chunked"));
    assert_eq!(sha_hex(&chunked.body), pattern_sha256(n as u64));
    assert_eq!(pattern_sha256(0), sha_hex(b""));
}

#[tokio::test]
async fn abort_after_cuts_the_body() {
    let fake = FakeRelace::start().await;
    let raw = build_request(
        "GET",
        &format!("/v1/repo/{REPO}/file/x?bytes=200000&abort_after=70000"),
        &[],
        b"",
    );
    let mut stream = TcpStream::connect(fake.addr()).await.unwrap();
    stream.write_all(&raw).await.unwrap();
    let mut got = Vec::new();
    // A reset is as good as an early EOF here; both mean "incomplete".
    let _ = stream.read_to_end(&mut got).await;
    let head_end = find(&got, b"\r\n\r\n").unwrap();
    assert!(std::str::from_utf8(&got[..head_end])
        .unwrap()
        .contains("content-length: 200000"));
    assert_eq!(got.len() - head_end - 4, 70_000);
}

#[tokio::test]
async fn echo_records_raw_target_and_body() {
    let fake = FakeRelace::start().await;
    let target = format!("/v1/repo/{REPO}/file/src%2Fmain.rs?x=a%20b");
    let resp = call(
        fake.addr(),
        "PUT",
        &target,
        &[
            ("Content-Type", "application/octet-stream"),
            ("X-Dup", "1"),
            ("X-Dup", "2"),
        ],
        b"hello",
    )
    .await;
    assert_eq!(resp.status, 200);
    let echo = resp.json();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["target"], target.as_str());
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["body_len"], 5);
    assert_eq!(echo["body_sha256"], sha_hex(b"hello").as_str());
    assert_eq!(echo["headers"]["x-dup"], "2");

    assert!(fake.wait_for_requests(1, Duration::from_secs(5)).await);
    assert!(!fake.wait_for_requests(2, Duration::from_millis(50)).await);
    let rec = &fake.requests()[0];
    assert_eq!(rec.target, target);
    assert_eq!(rec.body_len, Some(5));
    assert_eq!(rec.body_sha256.as_deref(), Some(sha_hex(b"hello").as_str()));
    assert_eq!(rec.header("content-type"), Some("application/octet-stream"));
    assert_eq!(rec.header_all("X-DUP"), vec!["1", "2"]);
    assert_eq!(fake.connections_accepted(), 1);
}

#[tokio::test]
async fn status_429_carries_rate_limit_headers() {
    let fake = FakeRelace::start().await;
    let resp = call(
        fake.addr(),
        "GET",
        &format!("/v1/repo/{REPO}?status=429&retry_after=3"),
        &[],
        b"",
    )
    .await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("retry-after"), Some("3"));
    assert_eq!(resp.header("x-ratelimit-limit"), Some("100"));
    assert_eq!(resp.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(resp.header("x-ratelimit-reset"), Some("60"));
    assert_eq!(resp.json()["error"], "Rate limit exceeded");

    let hop = call(
        fake.addr(),
        "GET",
        &format!("/v1/repo/{REPO}?hop=1"),
        &[],
        b"",
    )
    .await;
    assert_eq!(hop.header("x-hop-secret"), Some("1"));
    assert_eq!(hop.header("x-end-to-end"), Some("kept"));

    let missing = call(fake.addr(), "GET", "/v2/nothing", &[], b"").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "Bad Request: Route not found");
}

#[tokio::test]
async fn sse_events_arrive_as_separate_frames() {
    let fake = FakeRelace::start().await;
    let raw = build_request(
        "POST",
        &format!("/v1/repo/{REPO}/agent?sse=3&interval_ms=150"),
        &[],
        b"{}",
    );
    let started = Instant::now();
    let mut stream = TcpStream::connect(fake.addr()).await.unwrap();
    stream.write_all(&raw).await.unwrap();

    // Read until the first event is in; the later ones must not be there yet.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while find(&got, b"\"i\":0").is_none() {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "EOF before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(find(&got, b"\"i\":2").is_none(), "events were not streamed");

    stream.read_to_end(&mut got).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    let resp = parse_response(&got);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
    let text = String::from_utf8(resp.body).unwrap();
    assert_eq!(
        text,
        "event: agent\ndata: {\"i\":0}\n\nevent: agent\ndata: {\"i\":1}\n\nevent: agent\ndata: {\"i\":2}\n\n"
    );
}

#[tokio::test]
async fn reset_drops_the_connection_without_a_response() {
    let fake = FakeRelace::start().await;
    let raw = build_request("GET", &format!("/v1/repo/{REPO}?reset=1"), &[], b"");
    let mut stream = TcpStream::connect(fake.addr()).await.unwrap();
    stream.write_all(&raw).await.unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    assert_eq!(fake.request_count(), 1);
}

#[tokio::test]
async fn serves_h2c() {
    let fake = FakeRelace::start().await;
    let stream = TcpStream::connect(fake.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/v1/repo/{REPO}/file/a%2Fb", fake.addr()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let rec = &fake.requests()[0];
    assert_eq!(rec.version, "HTTP/2.0");
    assert_eq!(rec.target, format!("/v1/repo/{REPO}/file/a%2Fb"));
}
