//! SPEC §6 (forwarding) and the upstream-failure rules of SPEC §4: what reaches the
//! upstream, what comes back, and how a missing, silent or broken upstream is answered.
//! Every test runs the real gateway in-process in front of the fake Relace upstream.

mod support;

use support::*;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::raw::{build_request, find, parse_response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous bound for anything that should happen "at once" on loopback.
const PROMPTLY: Duration = Duration::from_secs(5);

fn file_path(repo: &str, rest: &str) -> String {
    format!("/v1/repo/{repo}/file/{rest}")
}

/// `GET` `REPO_A`'s file `rest` (a path, and any query) on the proxy with `token` as
/// Bearer.
async fn get_file(gw: &Gateway, rest: &str, token: &str) -> RawResponse {
    call_with_auth(gw.proxy, "GET", &file_path(REPO_A, rest), &bearer(token)).await
}

/// The recorded upstream request with exactly this target (panics if absent).
fn recorded(fake: &FakeRelace, target: &str) -> Recorded {
    let all = fake.requests();
    all.iter()
        .find(|r| r.target == target)
        .cloned()
        .unwrap_or_else(|| {
            let seen: Vec<&str> = all.iter().map(|r| r.target.as_str()).collect();
            panic!("upstream never saw {target}; it saw {seen:?}")
        })
}

/// Where a chunked body ends (index just past the terminating `0\r\n\r\n`), if it is
/// complete in `rest`.
fn chunked_end(rest: &[u8]) -> Option<usize> {
    let mut pos = 0;
    loop {
        let line_end = pos + find(&rest[pos..], b"\r\n")?;
        let size_str = std::str::from_utf8(&rest[pos..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            // No trailers are expected: the terminating empty line follows.
            return (rest.len() >= pos + 2).then_some(pos + 2);
        }
        pos += size + 2;
        if rest.len() < pos {
            return None;
        }
    }
}

/// Reads exactly one response from a connection that stays open (keep-alive): the head,
/// then a Content-Length or chunked body.
async fn read_one_response(stream: &mut TcpStream) -> support::RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(head_end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let rest = &buf[head_end + 4..];
            let done = if head.contains("\r\ntransfer-encoding: chunked") {
                chunked_end(rest).is_some()
            } else if let Some(len) = head
                .split("\r\n")
                .find_map(|l| l.strip_prefix("content-length:"))
            {
                rest.len() >= len.trim().parse::<usize>().expect("content-length")
            } else {
                panic!("keep-alive response without framing: {head}")
            };
            if done {
                return parse_response(&buf);
            }
        }
        let n = tokio::time::timeout(PROMPTLY, stream.read(&mut chunk))
            .await
            .expect("response within 5 s")
            .expect("read response");
        assert!(n > 0, "connection closed before the response was complete");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends raw bytes and reads until the peer closes or resets the connection; returns
/// every byte received (a reset is not an error here: it is one way an abort looks).
async fn raw_until_close(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut out = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.read(&mut chunk)).await {
            Err(_) => panic!("connection neither finished nor closed within 20 s"),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A port on loopback where nothing listens (bound, then released).
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}

/// A gateway in front of a fresh fake, with a token registered for `REPO_A`.
async fn setup() -> (FakeRelace, Gateway, String) {
    setup_with(&[]).await
}

/// [`setup`], with `section.key = value` settings for the gateway.
async fn setup_with(settings: &[(&str, &str)]) -> (FakeRelace, Gateway, String) {
    let fake = FakeRelace::start().await;
    let mut builder = Gateway::builder(&fake.url());
    for (key, value) in settings {
        builder = builder.set(key, value);
    }
    let gw = builder.start().await;
    let token = gw.token_for(&[REPO_A]).await;
    (fake, gw, token)
}

// ---------------------------------------------------------------------------------------
// Headers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_are_removed_and_end_to_end_headers_kept() {
    let (fake, gw, token) = setup().await;
    let target = format!("{}?via=hop", file_path(REPO_A, "src/main.py"));
    let body = br#"{"content":"print(1)"}"#;
    let request = format!(
        "PUT {target} HTTP/1.1\r\n\
         Host: scopegate.internal:8080\r\n\
         Connection: keep-alive, x-hop-secret\r\n\
         X-Hop-Secret: 1\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         TE: trailers\r\n\
         Upgrade: websocket\r\n\
         Authorization: Bearer {token}\r\n\
         X-Stainless-Lang: python\r\n\
         User-Agent: relace-python/0.1.0\r\n\
         Accept: application/json\r\n\
         Content-Type: application/json\r\n\
         X-Relace-Foo: bar, baz\r\n\
         X-Forwarded-For: 6.6.6.6\r\n\
         X-Forwarded-Proto: https\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(gw.proxy).await.expect("connect");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let r = read_one_response(&mut stream).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let rec = recorded(&fake, &target);
    for hop in [
        "connection",
        "x-hop-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "transfer-encoding",
    ] {
        assert_eq!(
            rec.header(hop),
            None,
            "hop-by-hop {hop} reached the upstream: {:?}",
            rec.headers
        );
    }
    for (name, value) in [
        ("x-stainless-lang", "python"),
        ("user-agent", "relace-python/0.1.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("x-relace-foo", "bar, baz"),
    ] {
        assert_eq!(
            rec.header_all(name),
            vec![value],
            "{name}: {:?}",
            rec.headers
        );
    }
    assert_eq!(
        rec.header_all("host"),
        vec![fake.addr().to_string()],
        "Host must be the upstream's"
    );
    assert_eq!(
        rec.header_all("x-forwarded-for"),
        vec!["127.0.0.1"],
        "a client X-Forwarded-For is replaced, not extended"
    );
    assert_eq!(rec.header_all("x-forwarded-proto"), vec!["http"]);
    assert_eq!(rec.body_len, Some(body.len() as u64));
    assert_eq!(rec.body_sha256.as_deref(), Some(sha_hex(body).as_str()));

    // The client connection was kept alive: a second request on it works too.
    let again = build_request(
        "GET",
        &file_path(REPO_A, "again"),
        &[("Authorization", &bearer(&token))],
        b"",
    );
    stream.write_all(&again).await.unwrap();
    let r2 = read_one_response(&mut stream).await;
    assert_eq!(r2.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_removed() {
    let (_fake, gw, token) = setup().await;
    for query in ["hop=1", "hop=1&bytes=1000&chunked=1", "hop=1&status=429"] {
        let r = get_file(&gw, &format!("x?{query}"), &token).await;
        assert!(r.status == 200 || r.status == 429, "{query}: {}", r.status);
        for hop in ["x-hop-secret", "keep-alive", "proxy-connection", "trailer"] {
            assert_eq!(r.header(hop), None, "{query}: {hop} reached the client");
        }
        if let Some(conn) = r.header("connection") {
            assert!(
                !conn.to_ascii_lowercase().contains("x-hop-secret"),
                "{query}: upstream Connection header forwarded: {conn}"
            );
        }
        assert_eq!(r.header("x-end-to-end"), Some("kept"), "{query}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_kept_or_generated_and_returned() {
    let (fake, gw, token) = setup().await;
    let auth = bearer(&token);

    let sent_target = format!("{}?rid=sent", file_path(REPO_A, "a"));
    let r = call(
        gw.proxy,
        "GET",
        &sent_target,
        &[("Authorization", &auth), ("X-Request-Id", "req-client-42")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("req-client-42"));
    assert_eq!(
        recorded(&fake, &sent_target).header_all("x-request-id"),
        vec!["req-client-42"]
    );

    let mut generated = Vec::new();
    for i in 0..2 {
        let target = format!("{}?rid=none{i}", file_path(REPO_A, "a"));
        let r = call_with_auth(gw.proxy, "GET", &target, &auth).await;
        assert_eq!(r.status, 200);
        let id = r.header("x-request-id").expect("generated x-request-id");
        assert!(!id.is_empty());
        assert_eq!(
            recorded(&fake, &target).header_all("x-request-id"),
            vec![id],
            "the generated id is forwarded and returned unchanged"
        );
        generated.push(id.to_owned());
    }
    assert_ne!(generated[0], generated[1], "each request gets its own id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_is_forwarded_byte_for_byte() {
    let (fake, gw, token) = setup().await;

    let bearer_value = bearer(&token);
    let target = file_path(REPO_A, "cred.txt");
    let r = call_with_auth(gw.proxy, "GET", &target, &bearer_value).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        recorded(&fake, &target).header_all("authorization"),
        vec![bearer_value.as_str()]
    );

    // git's Basic form, on a git route.
    let basic_value = basic(&token);
    let git_target = format!("/v1/repo/{REPO_A}.git/info/refs?service=git-upload-pack");
    let r = call_with_auth(gw.proxy, "GET", &git_target, &basic_value).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        recorded(&fake, &git_target).header_all("authorization"),
        vec![basic_value.as_str()]
    );
}

// ---------------------------------------------------------------------------------------
// Status, headers and bodies of the answer

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_statuses_pass_through_with_headers_and_body() {
    let (_fake, gw, token) = setup().await;
    let auth = bearer(&token);
    for (status, message) in [
        (423u16, "Locked"),
        (429, "Rate limit exceeded"),
        (500, "Internal Server Error"),
        (503, "Service Unavailable"),
        (404, "Not Found"),
        (201, "Created"),
    ] {
        let target = format!(
            "{}?status={status}&retry_after=7",
            file_path(REPO_A, "status")
        );
        let r = call_with_auth(gw.proxy, "GET", &target, &auth).await;
        assert_eq!(r.status, status, "status {status} changed");
        assert_eq!(
            r.json(),
            serde_json::json!({ "error": message }),
            "{status}"
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("retry-after"), Some("7"), "{status}");
        assert_eq!(
            r.header("x-should-retry"),
            None,
            "{status}: the gateway added x-should-retry to an upstream answer"
        );
        assert_eq!(
            r.header("cache-control"),
            None,
            "{status}: the gateway decorated an upstream answer as its own"
        );
        assert!(r.header("x-request-id").is_some(), "{status}");
        if status == 429 {
            assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
            assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
            assert_eq!(r.header("x-ratelimit-reset"), Some("60"));
        } else {
            assert_eq!(r.header("x-ratelimit-limit"), None);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_headers_and_body_reach_the_client_unchanged() {
    let (_fake, gw, token) = setup().await;

    let r = get_file(&gw, "big.bin?bytes=1000", &token).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"big.bin\"")
    );
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("content-length"), Some("1000"));
    assert_eq!(r.body.len(), 1000);
    assert_eq!(sha_hex(&r.body), pattern_sha256(1000));

    // The chunked form too (no Content-Length from the upstream).
    let r = get_file(&gw, "big.bin?bytes=300000&chunked=1", &token).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"big.bin\"")
    );
    assert_eq!(r.body.len(), 300_000);
    assert_eq!(sha_hex(&r.body), pattern_sha256(300_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_raw_target_and_body_reach_the_upstream_byte_for_byte() {
    let (fake, gw, token) = setup().await;
    let auth = bearer(&token);

    // Binary body: every byte value, in an order that is not the download pattern.
    let body: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cases = [
        (
            "PUT",
            format!("/v1/repo/{REPO_A}/file/src%2Fapp%2Fmain.py?x=1%202"),
        ),
        (
            "POST",
            format!("/v1/repo/{REPO_A}/search?q=a+b&q=%2F&empty="),
        ),
        (
            "PATCH",
            format!("/v1/repo/{REPO_A}/file/caf%C3%A9%20menu.txt"),
        ),
        (
            "DELETE",
            format!("/v1/repo/{REPO_A}/file/old.txt?recursive=true"),
        ),
    ];
    for (method, target) in &cases {
        let sent: &[u8] = if *method == "DELETE" { b"" } else { &body };
        let r = call(
            gw.proxy,
            method,
            target,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/octet-stream"),
            ],
            sent,
        )
        .await;
        assert_eq!(r.status, 200, "{method} {target}");
        let echo = r.json();
        assert_eq!(echo["method"], *method);
        assert_eq!(echo["target"], target.as_str());
        let rec = recorded(&fake, target);
        assert_eq!(rec.method, *method);
        assert_eq!(&rec.target, target);
        assert_eq!(rec.body_len, Some(sent.len() as u64), "{method} {target}");
        assert_eq!(
            rec.body_sha256.as_deref(),
            Some(sha_hex(sent).as_str()),
            "{method} {target}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Connections

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled() {
    let (fake, gw, token) = setup().await;
    let auth = bearer(&token);
    assert_eq!(fake.connections_accepted(), 0);

    let stream = TcpStream::connect(gw.proxy).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    for i in 0..20 {
        sender
            .ready()
            .await
            .expect("client connection still usable");
        let req = Request::get(format!("{}?i={i}", file_path(REPO_A, "pool")))
            .header("host", "scopegate")
            .header("authorization", &auth)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            echo["target"],
            format!("{}?i={i}", file_path(REPO_A, "pool"))
        );
    }
    assert_eq!(fake.request_count(), 20);
    let after_one_client = fake.connections_accepted();
    assert!(
        after_one_client <= 2,
        "20 sequential requests opened {after_one_client} upstream connections"
    );

    // The pool is the gateway's, not the client connection's: 10 more requests, each on
    // its own client connection, still reuse it.
    for i in 0..10 {
        let r = get_file(&gw, &format!("pool?fresh={i}"), &token).await;
        assert_eq!(r.status, 200);
    }
    let total = fake.connections_accepted();
    assert!(
        total <= 2,
        "30 sequential requests opened {total} upstream connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_client_is_forwarded() {
    let (fake, gw, token) = setup().await;
    let auth = bearer(&token);

    let stream = TcpStream::connect(gw.proxy).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });

    let body = b"h2c upload body".to_vec();
    let path = format!("/v1/repo/{REPO_A}/file/src%2Fh2.rs?x=1");
    // A real h2 client sends :scheme and :authority with every request.
    let req = Request::put(format!("http://{}{path}", gw.proxy))
        .header("authorization", &auth)
        .header("x-relace-foo", "h2")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let resp = sender.send_request(req).await.expect("h2 request");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&bytes)
    );

    let rec = recorded(&fake, &path);
    assert_eq!(rec.method, "PUT");
    assert_eq!(rec.header("authorization"), Some(auth.as_str()));
    assert_eq!(rec.header("x-relace-foo"), Some("h2"));
    assert_eq!(rec.header("host"), Some(fake.addr().to_string().as_str()));
    assert_eq!(rec.body_len, Some(body.len() as u64));
    assert_eq!(rec.body_sha256.as_deref(), Some(sha_hex(&body).as_str()));

    // A second stream on the same connection, origin-form only (no :authority).
    sender.ready().await.expect("h2 connection still usable");
    let req = Request::get(format!("{}?second=1", file_path(REPO_A, "b")))
        .header("authorization", &auth)
        .body(Full::new(Bytes::new()))
        .unwrap();
    match sender.send_request(req).await {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::OK),
        // hyper's h2 client may refuse a request without scheme/authority itself;
        // that is the client's limitation, not the gateway's.
        Err(e) => eprintln!("note: origin-form h2 request not sent by the client: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// Upstream failures (SPEC §4, last paragraph)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_a_prompt_502() {
    let port = closed_port();
    let gw = Gateway::builder(&format!("http://127.0.0.1:{port}"))
        .set("upstream.connect_timeout", "\"2s\"")
        .start()
        .await;
    let token = gw.token_for(&[REPO_A]).await;
    let auth = bearer(&token);
    let started = Instant::now();
    let r = call(
        gw.proxy,
        "PUT",
        &file_path(REPO_A, "down.txt"),
        &[("Authorization", &auth), ("X-Request-Id", "down-1")],
        b"payload",
    )
    .await;
    let elapsed = started.elapsed();
    assert_refused(&r, 502, "upstream_unavailable");
    assert_eq!(r.header("x-request-id"), Some("down-1"));
    assert!(
        elapsed < Duration::from_secs(2),
        "a refused connect took {elapsed:?} (connect_timeout is 2 s)"
    );

    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, "scopegate_upstream_responses_total{class=\"error\"}"),
        1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connect_that_hangs_is_a_502_after_connect_timeout() {
    // A listener with a backlog of 1 that never accepts: once its accept queue is full,
    // Linux drops further SYNs, so a connect neither succeeds nor fails.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    assert!(
        !fillers.is_empty(),
        "the backlog never accepted a connection"
    );
    // Precondition: the kernel really makes a connect hang now.
    let probe = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await;
    assert!(
        probe.is_err(),
        "a connect to the full backlog did not hang ({probe:?}); this kernel cannot provoke a hanging connect this way"
    );

    let gw = Gateway::builder(&format!("http://{addr}"))
        .set("upstream.connect_timeout", "\"300ms\"")
        .start()
        .await;
    let token = gw.token_for(&[REPO_A]).await;
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), get_file(&gw, "hang.txt", &token))
        .await
        .expect("a hanging connect must be answered, not waited on forever");
    let elapsed = started.elapsed();
    assert_refused(&r, 502, "upstream_unavailable");
    assert!(
        elapsed >= Duration::from_millis(250),
        "answered after {elapsed:?}: the connect did not hang, so connect_timeout was not exercised"
    );
    assert!(
        elapsed < PROMPTLY,
        "connect_timeout is 300 ms but the answer took {elapsed:?}"
    );
    drop(fillers);
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upstream_is_a_504_and_a_slow_head_within_the_timeout_is_fine() {
    let (_fake, gw, token) = setup_with(&[("upstream.response_header_timeout", "\"300ms\"")]).await;
    let started = Instant::now();
    let r = get_file(&gw, "slow?delay_ms=5000", &token).await;
    let elapsed = started.elapsed();
    assert_refused(&r, 504, "upstream_timeout");
    assert!(
        elapsed < Duration::from_secs(4),
        "the 504 took {elapsed:?}; it should come after ~300 ms, not after the upstream"
    );

    let (_fake2, gw2, token2) = setup_with(&[("upstream.response_header_timeout", "\"2s\"")]).await;
    let r = get_file(&gw2, "slowish?delay_ms=100", &token2).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_is_a_502() {
    let (_fake, gw, token) = setup().await;
    // Once on a fresh upstream connection, once on a pooled one.
    for i in 0..2 {
        let r = get_file(&gw, &format!("crash?reset=1&i={i}"), &token).await;
        assert_refused(&r, 502, "upstream_unavailable");
        let ok = get_file(&gw, &format!("crash?after={i}"), &token).await;
        assert_eq!(ok.status, 200, "the gateway recovers after a reset");
    }
}

/// Client view of a body the upstream breaks after the head, with the raw client.
async fn broken_body_raw(gw: &Gateway, token: &str, chunked: bool) {
    let query = if chunked {
        "bytes=1000000&abort_after=100000&chunked=1"
    } else {
        "bytes=1000000&abort_after=100000"
    };
    let target = format!("{}?{query}", file_path(REPO_A, "broken.bin"));
    let raw = raw_until_close(
        gw.proxy,
        &build_request("GET", &target, &[("Authorization", &bearer(token))], b""),
    )
    .await;
    let head_end = find(&raw, b"\r\n\r\n").expect("the 200 head reached the client");
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let body = &raw[head_end + 4..];
    if chunked {
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(
            chunked_end(body).is_none(),
            "an aborted chunked body ended with a terminating chunk ({} bytes)",
            body.len()
        );
    } else {
        assert!(head.contains("content-length: 1000000"), "{head}");
        assert!(
            body.len() < 1_000_000,
            "an aborted body delivered all {} bytes",
            body.len()
        );
    }
    assert!(
        !body.is_empty(),
        "the bytes sent before the failure are delivered"
    );
}

/// The same with hyper's client: the body must end in an error, not a clean end.
async fn broken_body_hyper(gw: &Gateway, token: &str, chunked: bool) {
    let query = if chunked {
        "bytes=1000000&abort_after=100000&chunked=1&c=hyper"
    } else {
        "bytes=1000000&abort_after=100000&c=hyper"
    };
    let req = Request::get(format!("{}?{query}", file_path(REPO_A, "broken.bin")))
        .header("host", "scopegate")
        .header("authorization", bearer(token))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut resp = hyper_send(gw.proxy, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut received = 0usize;
    let outcome = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match resp.body_mut().frame().await {
                None => return Ok(()),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    if let Some(d) = frame.data_ref() {
                        received += d.len();
                    }
                }
            }
        }
    })
    .await
    .expect("the broken body must end, not hang");
    assert!(
        outcome.is_err(),
        "chunked={chunked}: an aborted upstream body looked complete to the client after {received} bytes"
    );
    assert!(received < 1_000_000, "{received}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_after_the_head_aborts_the_client_stream() {
    let (_fake, gw, token) = setup().await;
    for chunked in [false, true] {
        broken_body_raw(&gw, &token, chunked).await;
        broken_body_hyper(&gw, &token, chunked).await;
    }
    // The gateway is fine afterwards.
    let r = get_file(&gw, "ok.bin?bytes=1000", &token).await;
    assert_eq!(r.status, 200);
    assert_eq!(sha_hex(&r.body), pattern_sha256(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_sse_stream_is_not_cut_by_the_header_timeout() {
    let (_fake, gw, token) = setup_with(&[("upstream.response_header_timeout", "\"300ms\"")]).await;
    let req = Request::post(format!("/v1/repo/{REPO_A}/agent?sse=3&interval_ms=700"))
        .header("host", "scopegate")
        .header("authorization", bearer(&token))
        .header("accept", "text/event-stream")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut resp = hyper_send(gw.proxy, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/event-stream"[..])
    );
    let mut text = Vec::new();
    let finished = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(frame) = resp.body_mut().frame().await {
            let frame = frame.expect("the quiet stream must not be cut");
            if let Some(d) = frame.data_ref() {
                text.extend_from_slice(d);
            }
        }
    })
    .await;
    assert!(finished.is_ok(), "the stream did not end");
    let text = String::from_utf8(text).unwrap();
    let events: Vec<&str> = text.matches("event: agent").collect();
    assert_eq!(events.len(), 3, "{text}");
    for i in 0..3 {
        assert!(text.contains(&format!("data: {{\"i\":{i}}}")), "{text}");
    }
}

// ---------------------------------------------------------------------------------------
// Metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_outcomes_are_counted_by_class() {
    let (_fake, gw, token) = setup_with(&[("upstream.response_header_timeout", "\"300ms\"")]).await;
    let auth = bearer(&token);
    let cases: [(&str, u16); 7] = [
        ("status=201", 201),
        ("x=1", 200),
        ("status=404", 404),
        ("status=429&retry_after=1", 429),
        ("status=503", 503),
        ("reset=1", 502),
        ("delay_ms=3000", 504),
    ];
    for (query, status) in cases {
        let r = get_file(&gw, &format!("m?{query}"), &token).await;
        assert_eq!(r.status, status, "{query}");
    }
    // A refusal never reaches the upstream and is not an upstream outcome.
    let refused = call_with_auth(gw.proxy, "GET", &file_path(REPO_B, "m"), &auth).await;
    assert_eq!(refused.status, 403);

    let m = gw.metrics().await;
    let class = |c: &str| {
        metric_value(
            &m,
            &format!("scopegate_upstream_responses_total{{class=\"{c}\"}}"),
        )
    };
    assert_eq!(class("2xx"), 2.0, "{m}");
    assert_eq!(class("4xx"), 2.0, "{m}");
    assert_eq!(class("5xx"), 1.0, "{m}");
    assert_eq!(class("error"), 1.0, "{m}");
    assert_eq!(class("timeout"), 1.0, "{m}");
    let decision = |d: &str| proxy_decisions(&m, d);
    assert_eq!(decision("allowed"), 5.0, "{m}");
    assert_eq!(decision("upstream_unavailable"), 1.0, "{m}");
    assert_eq!(decision("upstream_timeout"), 1.0, "{m}");
    assert_eq!(decision("repo_out_of_scope"), 1.0, "{m}");
}
