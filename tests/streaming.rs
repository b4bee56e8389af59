//! SPEC §6, first bullet: bodies stream both ways without buffering, memory per request
//! stays bounded whatever the body size, and SSE events reach the client as they come.
//!
//! Memory is measured on the real binary in a child process (`GatewayProcess`), whose
//! resident set size is read from `/proc` while hundreds of MiB flow through it. The
//! fake upstream and the client run in this test process, so their memory is not
//! counted.

mod support;

use support::*;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

const MIB: u64 = 1024 * 1024;
/// Allowed growth of the gateway's RSS over its idle value while one large body flows.
/// A gateway that buffered the body would grow by the body's size (128–256 MiB).
const RSS_BUDGET_KIB: u64 = 64 * 1024;
const UPLOAD_CHUNK: usize = 64 * 1024;
const SAMPLE_EVERY: u64 = 16 * MIB;

/// The heavy tests share two cores; running them one at a time keeps each one's RSS and
/// timing its own.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts the real binary in front of `fake` and registers a token for `REPO_A`.
async fn spawn_gateway(fake: &FakeRelace) -> (GatewayProcess, String) {
    let gp = GatewayProcess::spawn(&Gateway::builder(&fake.url()));
    let token = new_token();
    let body = serde_json::json!({ "token": token, "name": "streaming", "repo_ids": [REPO_A] });
    let r = register_at(gp.admin, &body).await;
    assert_eq!(r.status, 201, "register: {}", body_text(&r));
    (gp, token)
}

/// One small download so the gateway's pools, buffers and runtime threads exist before
/// the idle RSS is taken.
async fn warm_up(gp: &GatewayProcess, token: &str) {
    let target = format!("/v1/repo/{REPO_A}/warm?bytes=1048576");
    let r = call_with_auth(gp.proxy, "GET", &target, &bearer(token)).await;
    assert_eq!(r.status, 200);
    assert_eq!(sha_hex(&r.body), pattern_sha256(MIB));
}

/// A request body fed lazily from a channel: nothing exists before the producer makes
/// it. With `len`, it advertises an exact size (hyper then sends Content-Length);
/// without, hyper sends it chunked.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
    remaining: Option<u64>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|chunk| {
            chunk.map(|c| {
                if let Some(r) = self.remaining.as_mut() {
                    *r = r.saturating_sub(c.len() as u64);
                }
                Ok(Frame::data(c))
            })
        })
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Pseudo-random source block; upload chunk `i` is a window into it at an offset that
/// depends on `i`, so a reordered, dropped or duplicated chunk changes the hash.
fn upload_block() -> &'static Bytes {
    static BLOCK: OnceLock<Bytes> = OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut v = Vec::with_capacity(UPLOAD_CHUNK + 8192);
        while v.len() < UPLOAD_CHUNK + 8192 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.truncate(UPLOAD_CHUNK + 8192);
        v.into()
    })
}

fn upload_chunk(i: u64, len: usize) -> Bytes {
    let off = (i.wrapping_mul(7919) % 8192) as usize;
    upload_block().slice(off..off + len)
}

struct UploadReport {
    sha256: String,
    len: u64,
    peak_rss_kib: u64,
    /// Whether the upstream had the request head while the client was still sending.
    head_seen_mid_upload: bool,
}

/// Produces `total` bytes into `tx` in 64 KiB chunks, hashing them as they go and
/// sampling the gateway's RSS every 16 MiB. Halfway through it stops until the fake
/// upstream has received the request head: a gateway that collected the body before
/// forwarding would never get it there, and the wait would time out.
async fn produce(
    tx: mpsc::Sender<Bytes>,
    total: u64,
    gateway_pid: u32,
    fake: &FakeRelace,
    requests_before: usize,
) -> UploadReport {
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    let mut next_sample = SAMPLE_EVERY;
    let mut peak = rss_kib_of(gateway_pid);
    let mut head_seen_mid_upload = false;
    let mut checked_midway = false;
    let mut i = 0u64;
    while sent < total {
        if !checked_midway && sent >= total / 2 {
            checked_midway = true;
            // The producer sends nothing more until this returns, so a gateway that
            // waited for the whole body would never forward the head.
            head_seen_mid_upload = fake
                .wait_for_requests(requests_before + 1, Duration::from_secs(10))
                .await;
            assert!(
                head_seen_mid_upload,
                "the upstream did not get the request while half the body was still unsent: the gateway buffers uploads"
            );
            let rec = &fake.requests()[requests_before];
            assert_eq!(
                rec.body_len, None,
                "the upstream had the whole body before the client finished sending it"
            );
        }
        let len = (total - sent).min(UPLOAD_CHUNK as u64) as usize;
        let chunk = upload_chunk(i, len);
        hasher.update(&chunk);
        tx.send(chunk)
            .await
            .expect("the gateway stopped reading the upload");
        sent += len as u64;
        i += 1;
        if sent >= next_sample {
            peak = peak.max(rss_kib_of(gateway_pid));
            next_sample += SAMPLE_EVERY;
        }
    }
    drop(tx);
    UploadReport {
        sha256: hex(&hasher.finalize()),
        len: sent,
        peak_rss_kib: peak.max(rss_kib_of(gateway_pid)),
        head_seen_mid_upload,
    }
}

/// Uploads `total` bytes through the gateway process, chunked or with Content-Length,
/// and checks what the upstream received; returns (idle RSS, peak RSS, duration).
async fn upload(total: u64, with_length: bool) -> (u64, u64, Duration) {
    let fake = FakeRelace::start().await;
    let (gp, token) = spawn_gateway(&fake).await;
    warm_up(&gp, &token).await;
    let idle = gp.rss_kib();
    let requests_before = fake.request_count();

    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let target = format!("/v1/repo/{REPO_A}/file/big.bin?with_length={with_length}");
    let mut req = Request::put(&target)
        .header("host", "scopegate")
        .header("authorization", bearer(&token))
        .header("content-type", "application/octet-stream");
    if with_length {
        req = req.header("content-length", total);
    }
    let req = req
        .body(ChannelBody {
            rx,
            remaining: with_length.then_some(total),
        })
        .unwrap();

    let started = Instant::now();
    let exchange = async {
        let resp = hyper_send(gp.proxy, req).await;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("echo body")
            .to_bytes();
        (status, body)
    };
    let ((status, body), report) = tokio::time::timeout(Duration::from_secs(90), async {
        tokio::join!(
            exchange,
            produce(tx, total, gp.child.id(), &fake, requests_before)
        )
    })
    .await
    .expect("upload finished within 90 s");
    let elapsed = started.elapsed();

    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert!(
        report.head_seen_mid_upload,
        "the upstream did not see the request before the client finished: the gateway buffers uploads"
    );
    let echo: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
    assert_eq!(report.len, total);
    assert_eq!(echo["body_len"], total, "{echo}");
    assert_eq!(echo["body_sha256"], report.sha256.as_str(), "{echo}");

    let rec = fake.requests().pop().expect("the upload was recorded");
    assert_eq!(rec.target, target);
    assert_eq!(rec.body_len, Some(total));
    if with_length {
        let expected = total.to_string();
        assert_eq!(
            rec.header("content-length"),
            Some(expected.as_str()),
            "Content-Length is end-to-end and reaches the upstream"
        );
    } else {
        assert_eq!(
            rec.header("content-length"),
            None,
            "the gateway cannot know a chunked body's length without buffering it"
        );
    }

    let growth = report.peak_rss_kib.saturating_sub(idle);
    eprintln!(
        "upload {total} bytes (content-length: {with_length}): idle RSS {idle} KiB, peak {} KiB, growth {growth} KiB, {elapsed:?}",
        report.peak_rss_kib
    );
    (idle, report.peak_rss_kib, elapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_256_mib_streams_in_bounded_memory() {
    let _serial = SERIAL.lock().await;
    const TOTAL: u64 = 256 * MIB;
    let fake = FakeRelace::start().await;
    let (gp, token) = spawn_gateway(&fake).await;
    warm_up(&gp, &token).await;
    let idle = gp.rss_kib();

    let req = Request::get(format!("/v1/repo/{REPO_A}/big?bytes={TOTAL}"))
        .header("host", "scopegate")
        .header("authorization", bearer(&token))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let started = Instant::now();
    let mut resp = hyper_send(gp.proxy, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(TOTAL.to_string().as_str())
    );

    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut next_sample = SAMPLE_EVERY;
    let mut peak = idle;
    let mut samples = 0;
    tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(frame) = resp.body_mut().frame().await {
            let frame = frame.expect("download body");
            if let Some(data) = frame.data_ref() {
                hasher.update(data);
                received += data.len() as u64;
                if received >= next_sample {
                    peak = peak.max(gp.rss_kib());
                    samples += 1;
                    next_sample += SAMPLE_EVERY;
                }
            }
        }
    })
    .await
    .expect("download finished within 90 s");
    let elapsed = started.elapsed();
    peak = peak.max(gp.rss_kib());

    assert_eq!(received, TOTAL);
    assert!(samples >= 15, "only {samples} RSS samples");
    assert_eq!(hex(&hasher.finalize()), pattern_sha256(TOTAL));
    let growth = peak.saturating_sub(idle);
    eprintln!(
        "download 256 MiB: idle RSS {idle} KiB, peak {peak} KiB, growth {growth} KiB, {elapsed:?}"
    );
    assert!(
        growth < RSS_BUDGET_KIB,
        "gateway RSS grew by {growth} KiB during a 256 MiB download (idle {idle} KiB, peak {peak} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_128_mib_streams_in_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let (idle, peak, _) = upload(128 * MIB, false).await;
    let growth = peak.saturating_sub(idle);
    assert!(
        growth < RSS_BUDGET_KIB,
        "gateway RSS grew by {growth} KiB during a 128 MiB upload (idle {idle} KiB, peak {peak} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_50_mb_with_content_length_streams_in_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let (idle, peak, _) = upload(50_000_000, true).await;
    let growth = peak.saturating_sub(idle);
    // 50 MB is 47.7 MiB: a buffering gateway would grow by at least that much.
    assert!(
        growth < 32 * 1024,
        "gateway RSS grew by {growth} KiB during a 50 MB upload (idle {idle} KiB, peak {peak} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_reach_the_client_as_they_come() {
    let _serial = SERIAL.lock().await;
    let fake = FakeRelace::start().await;
    let (gp, token) = spawn_gateway(&fake).await;

    let req = Request::post(format!("/v1/repo/{REPO_A}/agent?sse=5&interval_ms=200"))
        .header("host", "scopegate")
        .header("authorization", bearer(&token))
        .header("accept", "text/event-stream")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut resp = hyper_send(gp.proxy, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/event-stream"[..])
    );

    let mut arrivals: Vec<Instant> = Vec::new();
    let mut text = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(frame) = resp.body_mut().frame().await {
            let frame = frame.expect("SSE body");
            if let Some(data) = frame.data_ref() {
                let now = Instant::now();
                let chunk = std::str::from_utf8(data).expect("UTF-8 events");
                for _ in chunk.matches("event: ") {
                    arrivals.push(now);
                }
                text.push_str(chunk);
            }
        }
        Instant::now()
    })
    .await
    .expect("the SSE stream ended within 20 s");

    assert_eq!(arrivals.len(), 5, "{text}");
    for i in 0..5 {
        assert!(text.contains(&format!("data: {{\"i\":{i}}}")), "{text}");
    }
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("SSE inter-arrival gaps: {gaps:?}");
    for (i, gap) in gaps.iter().enumerate() {
        assert!(
            *gap >= Duration::from_millis(100),
            "events {i} and {} arrived {gap:?} apart (sent 200 ms apart): they were held back",
            i + 1
        );
    }
    let head_start = ended - arrivals[0];
    assert!(
        head_start >= Duration::from_millis(500),
        "the first event arrived only {head_start:?} before the stream ended"
    );
}
