//! Operations (SPEC §2, §3, §8, §9, §10) on the real binary: the Prometheus exposition
//! parsed by a real parser, draining on SIGTERM, SIGHUP reloads of settings and TLS
//! certificates, TLS on both legs with a private CA, and environment overrides.
//!
//! Every test runs `scopegate` in a child process (signals, exit codes and logs are the
//! process's own). Waiting is on events (the fake upstream's request log, a response, the
//! exit status) or bounded polling of an observable state (`/readyz`, a metric), never a
//! fixed sleep standing in for an event.

mod support;
use support::*;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// helpers: processes, signals, polling

/// The interval of every bounded poll in this file.
const POLL_EVERY: Duration = Duration::from_millis(25);

/// Calls `probe` until it yields `Some`, at most for `within`.
async fn poll_until<T, F, Fut>(within: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe().await {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Sends `signal` (`TERM`, `HUP`, …) to the process `pid` with `kill(1)`.
fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Waits (bounded) for `child` to exit, without sending it anything.
async fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    poll_until(within, || {
        let status = child.try_wait().ok().flatten();
        async move { status }
    })
    .await
}

/// Waits (bounded) until the process's logs contain `needle`; returns the logs.
async fn logs_containing(gp: &GatewayProcess, needle: &str, within: Duration) -> String {
    poll_until(within, || {
        let logs = gp.logs();
        async move { logs.contains(needle).then_some(logs) }
    })
    .await
    .unwrap_or_else(|| panic!("logs never contained {needle:?}:\n{}", gp.logs()))
}

/// Every log line as JSON (JSON mode: every line must be JSON).
fn json_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"))
        })
        .collect()
}

/// The JSON log lines whose `message` contains `needle`.
fn lines_with_message(logs: &str, needle: &str) -> Vec<Value> {
    json_lines(logs)
        .into_iter()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.contains(needle)))
        .collect()
}

/// Writes `bytes` on a fresh connection to `addr` and reads until the peer closes.
/// Every failure (connect, write, read) is returned, never a panic.
async fn try_exchange(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(bytes).await?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await?;
    Ok(out)
}

/// A request on a fresh connection, `None` when no complete response came back.
async fn try_call(addr: SocketAddr, method: &str, target: &str) -> Option<RawResponse> {
    let raw = support::raw::build_request(method, target, &[], b"");
    let answer = tokio::time::timeout(Duration::from_secs(5), try_exchange(addr, &raw))
        .await
        .ok()?
        .ok()?;
    support::raw::find(&answer, b"\r\n\r\n")?;
    Some(support::raw::parse_response(&answer))
}

/// The `/metrics` text, `None` if the admin listener did not answer 200.
async fn scrape(admin: SocketAddr) -> Option<String> {
    let r = try_call(admin, "GET", "/metrics").await?;
    (r.status == 200).then(|| String::from_utf8(r.body).expect("utf-8 metrics"))
}

/// Polls `/metrics` until `name_and_labels` reads `want`; panics with the last value.
async fn wait_metric(admin: SocketAddr, name_and_labels: &str, want: f64, within: Duration) {
    let found = poll_until(within, || async move {
        let text = scrape(admin).await?;
        (metric_value(&text, name_and_labels) == want).then_some(())
    })
    .await;
    if found.is_none() {
        let last = scrape(admin)
            .await
            .map(|t| metric_value(&t, name_and_labels));
        panic!("{name_and_labels} never reached {want} within {within:?}; last value {last:?}");
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("utf-8 temp path").to_owned()
}

fn admin_register(token: &str, repo_ids: &[&str], expires_at: Option<&str>) -> Value {
    serde_json::json!({
        "token": token,
        "name": "ops",
        "repo_ids": repo_ids,
        "expires_at": expires_at,
    })
}

/// Registers a fresh token for `REPO_A` on the process's admin listener.
async fn registered_token(admin: SocketAddr) -> String {
    let token = new_token();
    let r = register_at(admin, &admin_register(&token, &[REPO_A], None)).await;
    assert_eq!(r.status, 201, "register: {}", body_text(&r));
    token
}

// ---------------------------------------------------------------------------------------
// helpers: certificates

/// A TLS handshake with `addr` as `127.0.0.1`.
async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// A certificate and key written to `dir/tls.crt` and `dir/tls.key` (rewritten in place
/// on rotation, as a mounted Kubernetes secret would be).
fn write_pair(dir: &Path, (cert, key): &(String, String)) -> (PathBuf, PathBuf) {
    let cert_path = dir.join("tls.crt");
    let key_path = dir.join("tls.key");
    std::fs::write(&cert_path, cert).expect("write cert");
    std::fs::write(&key_path, key).expect("write key");
    (cert_path, key_path)
}

/// `GET target` with `authorization` on an HTTP/1.1 connection already established.
async fn h1_get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    target: &str,
    authorization: &str,
) -> (u16, Bytes) {
    let req = Request::get(target)
        .header("host", "127.0.0.1")
        .header("authorization", authorization)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = sender
        .send_request(req)
        .await
        .expect("response on the connection");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body)
}

// ---------------------------------------------------------------------------------------
// helpers: the Prometheus text parser (Python prometheus_client)

/// One metric family as `prometheus_client.parser` reports it.
#[derive(Debug, serde::Deserialize)]
struct Family {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    samples: Vec<Sample>,
}

#[derive(Debug, serde::Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

const PARSE_SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
families = []
for family in text_string_to_metric_families(sys.stdin.read()):
    families.append({
        "name": family.name,
        "type": family.type,
        "samples": [
            {"name": s.name, "labels": dict(s.labels), "value": s.value}
            for s in family.samples
        ],
    })
print(json.dumps(families))
"#;

/// The interpreter that has `prometheus_client`: `$SCOPEGATE_TEST_PYTHON`, else the
/// repository's `.venv` (both made by `scripts/test`). Never skips: without one the test
/// fails and says how to get it.
fn python_with_prometheus_client() -> PathBuf {
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("SCOPEGATE_TEST_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    for candidate in candidates {
        let works = Command::new(&candidate)
            .args(["-c", "import prometheus_client.parser"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if works {
            return candidate;
        }
        tried.push(candidate.display().to_string());
    }
    panic!(
        "no Python with prometheus_client (tried {tried:?}): run scripts/test, which creates \
         .venv with prometheus-client and sets SCOPEGATE_TEST_PYTHON"
    );
}

/// Parses Prometheus text with `prometheus_client.parser.text_string_to_metric_families`.
fn parse_with_prometheus_client(text: &str) -> Vec<Family> {
    let python = python_with_prometheus_client();
    let mut child = Command::new(&python)
        .args(["-c", PARSE_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    let mut stdin = child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, text.as_bytes()).expect("write to python");
    drop(stdin);
    let out = child.wait_with_output().expect("python output");
    assert!(
        out.status.success(),
        "prometheus_client could not parse /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser output is JSON")
}

/// What SPEC §9 fixes for one family: its type and its labels' closed value sets.
struct FamilySpec {
    /// The family name as `prometheus_client` reports it (counters lose `_total`).
    family: &'static str,
    /// The name in the exposition (what SPEC §9 writes).
    exposed: &'static str,
    kind: &'static str,
    labels: &'static [(&'static str, &'static [&'static str])],
}

const LISTENERS: &[&str] = &["proxy", "admin"];
/// `allowed`, every `code` of SPEC §4, and the two upstream failures.
const DECISIONS: &[&str] = &[
    "allowed",
    "bad_path",
    "missing_credentials",
    "malformed_credentials",
    "account_key_forbidden",
    "route_not_allowed",
    "unknown_token",
    "token_revoked",
    "token_expired",
    "repo_out_of_scope",
    "operation_not_allowed",
    "scope_unavailable",
    "upstream_unavailable",
    "upstream_timeout",
    "bad_request",
];
/// SPEC §9: `2xx`…`5xx`, `error`, `timeout`, and nothing else.
const CLASSES: &[&str] = &["2xx", "3xx", "4xx", "5xx", "error", "timeout"];
const SOURCES: &[&str] = &["mint", "admin", "introspection"];

const SPEC_FAMILIES: &[FamilySpec] = &[
    FamilySpec {
        family: "scopegate_requests",
        exposed: "scopegate_requests_total",
        kind: "counter",
        labels: &[("listener", LISTENERS), ("decision", DECISIONS)],
    },
    FamilySpec {
        family: "scopegate_request_duration_seconds",
        exposed: "scopegate_request_duration_seconds",
        kind: "histogram",
        labels: &[
            ("listener", LISTENERS),
            ("outcome", &["forwarded", "refused"]),
        ],
    },
    FamilySpec {
        family: "scopegate_upstream_duration_seconds",
        exposed: "scopegate_upstream_duration_seconds",
        kind: "histogram",
        labels: &[],
    },
    FamilySpec {
        family: "scopegate_upstream_responses",
        exposed: "scopegate_upstream_responses_total",
        kind: "counter",
        labels: &[("class", CLASSES)],
    },
    FamilySpec {
        family: "scopegate_scope_lookups",
        exposed: "scopegate_scope_lookups_total",
        kind: "counter",
        labels: &[
            ("tier", &["cache", "store", "introspection"]),
            ("result", &["hit", "miss", "error"]),
        ],
    },
    FamilySpec {
        family: "scopegate_scope_entries",
        exposed: "scopegate_scope_entries",
        kind: "gauge",
        labels: &[],
    },
    FamilySpec {
        family: "scopegate_tokens_learned",
        exposed: "scopegate_tokens_learned_total",
        kind: "counter",
        labels: &[("source", SOURCES)],
    },
    FamilySpec {
        family: "scopegate_tokens_revoked",
        exposed: "scopegate_tokens_revoked_total",
        kind: "counter",
        labels: &[("source", SOURCES)],
    },
    FamilySpec {
        family: "scopegate_inflight_requests",
        exposed: "scopegate_inflight_requests",
        kind: "gauge",
        labels: &[("listener", LISTENERS)],
    },
    FamilySpec {
        family: "scopegate_body_bytes",
        exposed: "scopegate_body_bytes_total",
        kind: "counter",
        labels: &[("direction", &["request", "response"])],
    },
    FamilySpec {
        family: "scopegate_build_info",
        exposed: "scopegate_build_info",
        kind: "gauge",
        labels: &[("version", &[env!("CARGO_PKG_VERSION")])],
    },
    FamilySpec {
        family: "scopegate_config_reloads",
        exposed: "scopegate_config_reloads_total",
        kind: "counter",
        labels: &[("result", &["success", "failure"])],
    },
];

/// The parsed families by name, with lookups of one sample's value.
struct Exposition(BTreeMap<String, Family>);

impl Exposition {
    fn family(&self, name: &str) -> &Family {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("family {name} missing from /metrics"))
    }

    /// The value of the sample `sample` whose labels are exactly `labels`.
    fn value(&self, family: &str, sample: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.family(family)
            .samples
            .iter()
            .find(|s| s.name == sample && s.labels == want)
            .unwrap_or_else(|| panic!("no sample {sample}{want:?} in {family}"))
            .value
    }
}

/// Checks a histogram series: buckets from 0.0001 s to 60 s plus `+Inf`, cumulative,
/// `+Inf` equal to `_count`; returns `_count`.
fn histogram_series(exp: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut buckets: Vec<(f64, f64)> = exp
        .family(family)
        .samples
        .iter()
        .filter(|s| s.name == format!("{family}_bucket"))
        .filter(|s| {
            let mut without_le = s.labels.clone();
            without_le.remove("le");
            without_le == want
        })
        .map(|s| {
            let le = s.labels.get("le").expect("le label on a bucket");
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or_else(|_| panic!("bad le {le:?}"))
            };
            (bound, s.value)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let what = format!("{family}{want:?}");
    assert!(buckets.len() >= 3, "{what}: buckets {buckets:?}");
    let finite: Vec<f64> = buckets
        .iter()
        .map(|b| b.0)
        .filter(|b| b.is_finite())
        .collect();
    assert_eq!(finite.first(), Some(&0.0001), "{what}: smallest bucket");
    assert_eq!(finite.last(), Some(&60.0), "{what}: largest finite bucket");
    assert_eq!(
        buckets.last().map(|b| b.0),
        Some(f64::INFINITY),
        "{what}: +Inf bucket"
    );
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{what}: buckets are not cumulative: {buckets:?}"
    );
    let count = exp.value(family, &format!("{family}_count"), labels);
    let sum = exp.value(family, &format!("{family}_sum"), labels);
    assert_eq!(
        buckets.last().map(|b| b.1),
        Some(count),
        "{what}: +Inf vs _count"
    );
    assert!(sum >= 0.0, "{what}: _sum {sum}");
    count
}

// ---------------------------------------------------------------------------------------
// 1. metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spec_metric_is_exposed_and_parses_as_prometheus_text() {
    // Fail fast (before any workload) when the parser is missing.
    python_with_prometheus_client();
    let fake = FakeRelace::start().await;
    let gp = GatewayProcess::spawn_with_log_filter(&Gateway::builder(&fake.url()), "info");
    let admin_auth = bearer(ADMIN_TOKEN);

    // Admin registrations: one live, one revoked, one already expired.
    let live = registered_token(gp.admin).await;
    let revoked = registered_token(gp.admin).await;
    let r = call_with_auth(
        gp.admin,
        "DELETE",
        &format!("/admin/tokens/{}", token_id(&revoked)),
        &admin_auth,
    )
    .await;
    assert_eq!(r.status, 204, "revoke: {}", body_text(&r));
    let expired = new_token();
    let r = register_at(
        gp.admin,
        &admin_register(&expired, &[REPO_A], Some("2001-01-01T00:00:00Z")),
    )
    .await;
    assert_eq!(r.status, 201, "register expired: {}", body_text(&r));
    // A mint through the admin listener's passthrough.
    let mint_body =
        serde_json::json!({"name": "minted", "repo_ids": [REPO_A], "ttl_seconds": 600}).to_string();
    let mint = post_json(
        gp.admin,
        "/v1/repo_token",
        &bearer(ACCOUNT_KEY),
        mint_body.as_bytes(),
    )
    .await;
    assert_eq!(mint.status, 200, "mint: {}", body_text(&mint));
    let minted = mint.json()["token"].as_str().expect("token").to_owned();
    let unknown = new_token();

    // Forwarded proxy requests; the response bytes they carried are counted here.
    let mut response_bytes = mint.body.len() as u64;
    let mut allowed = 0u64;
    let upload = vec![0x5au8; 100_000];
    let forwarded = [
        ("GET", file_url(REPO_A), bearer(&live), Vec::new(), 200),
        ("GET", file_url(REPO_A), bearer(&minted), Vec::new(), 200),
        (
            "POST",
            format!("/v1/repo/{REPO_A}/file/upload.bin"),
            bearer(&live),
            upload.clone(),
            200,
        ),
        (
            "GET",
            format!("/v1/repo/{REPO_A}/file/x?status=500"),
            bearer(&live),
            Vec::new(),
            500,
        ),
    ];
    for (method, target, auth, body, status) in &forwarded {
        let r = call(gp.proxy, method, target, &[("Authorization", auth)], body).await;
        assert_eq!(r.status, *status, "{method} {target}: {}", body_text(&r));
        if !body.is_empty() {
            assert_eq!(
                r.json()["body_len"],
                body.len(),
                "upload reached the fake whole"
            );
        }
        response_bytes += r.body.len() as u64;
        allowed += 1;
    }

    // Refusals of several codes, counted per code.
    let mut refused: BTreeMap<&str, u64> = BTreeMap::new();
    let out_of_scope = format!("/v1/repo/{REPO_B}/file/src/main.rs");
    let git_refs = format!("/v1/repo/{REPO_A}.git/info/refs?service=git-upload-pack");
    let refusals: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        (
            "GET",
            out_of_scope.clone(),
            Some(bearer(&live)),
            403,
            "repo_out_of_scope",
        ),
        (
            "GET",
            out_of_scope.clone(),
            Some(bearer(&live)),
            403,
            "repo_out_of_scope",
        ),
        (
            "GET",
            out_of_scope,
            Some(bearer(&minted)),
            403,
            "repo_out_of_scope",
        ),
        ("GET", file_url(REPO_A), None, 401, "missing_credentials"),
        ("GET", git_refs, None, 401, "missing_credentials"),
        (
            "GET",
            file_url(REPO_A),
            Some("Bearer rlcr-short".into()),
            401,
            "malformed_credentials",
        ),
        (
            "GET",
            file_url(REPO_A),
            Some(bearer(ACCOUNT_KEY)),
            403,
            "account_key_forbidden",
        ),
        (
            "GET",
            "/v1/repo".into(),
            Some(bearer(&live)),
            403,
            "route_not_allowed",
        ),
        (
            "GET",
            format!("/v1/repo/{REPO_A}/file/../x"),
            Some(bearer(&live)),
            400,
            "bad_path",
        ),
        (
            "GET",
            file_url(REPO_A),
            Some(bearer(&unknown)),
            401,
            "unknown_token",
        ),
        (
            "GET",
            file_url(REPO_A),
            Some(bearer(&revoked)),
            401,
            "token_revoked",
        ),
        (
            "GET",
            file_url(REPO_A),
            Some(bearer(&expired)),
            401,
            "token_expired",
        ),
        (
            "POST",
            format!("/v1/repo/{REPO_A}/git"),
            Some(bearer(&live)),
            403,
            "operation_not_allowed",
        ),
    ];
    for (method, target, auth, status, code) in &refusals {
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let r = call(gp.proxy, method, target, &headers, b"").await;
        assert_refused(&r, *status, code);
        *refused.entry(code).or_default() += 1;
    }
    let refused_total: u64 = refused.values().sum();
    // Scope lookups: every request that passed rows 1–5 with a repo token.
    let lookups = allowed + refused_total
        - [
            "missing_credentials",
            "malformed_credentials",
            "account_key_forbidden",
            "route_not_allowed",
            "bad_path",
        ]
        .iter()
        .map(|c| refused.get(c).copied().unwrap_or(0))
        .sum::<u64>();
    assert_eq!(
        fake.request_count(),
        1 + forwarded.len(),
        "only the mint and the forwarded requests reached the upstream"
    );

    // A request is counted when its response body ends; scrape once every one of them is.
    let want_proxy = (allowed + refused_total) as f64;
    let text = poll_until(Duration::from_secs(5), || async move {
        let text = scrape(gp.admin).await?;
        let total: f64 = DECISIONS
            .iter()
            .map(|d| {
                metric_value(
                    &text,
                    &format!("scopegate_requests_total{{decision=\"{d}\",listener=\"proxy\"}}"),
                )
            })
            .sum();
        (total == want_proxy).then_some(text)
    })
    .await
    .unwrap_or_else(|| panic!("proxy requests never added up to {want_proxy}"));

    // A real parser accepts the whole exposition.
    let families = parse_with_prometheus_client(&text);
    let exp = Exposition(families.into_iter().map(|f| (f.name.clone(), f)).collect());

    // Every SPEC §9 family, with its type, exact label names and closed label values.
    for spec in SPEC_FAMILIES {
        let family = exp.family(spec.family);
        assert_eq!(family.kind, spec.kind, "type of {}", spec.exposed);
        assert!(
            !family.samples.is_empty(),
            "{} has no samples",
            spec.exposed
        );
        let label_names: BTreeSet<&str> = spec.labels.iter().map(|(n, _)| *n).collect();
        for sample in &family.samples {
            let sample_ok = match spec.kind {
                "histogram" => ["_bucket", "_count", "_sum"]
                    .iter()
                    .any(|suffix| sample.name == format!("{}{suffix}", spec.exposed)),
                _ => sample.name == spec.exposed,
            };
            assert!(
                sample_ok,
                "{}: unexpected sample {}",
                spec.exposed, sample.name
            );
            let mut names: BTreeSet<&str> = sample.labels.keys().map(String::as_str).collect();
            if sample.name.ends_with("_bucket") {
                assert!(names.remove("le"), "{}: bucket without le", spec.exposed);
            }
            assert_eq!(names, label_names, "{}: label names", spec.exposed);
            for (name, allowed_values) in spec.labels {
                let value = sample.labels[*name].as_str();
                assert!(
                    allowed_values.contains(&value),
                    "{}: {name}={value:?} is not in the closed set {allowed_values:?}",
                    spec.exposed
                );
            }
        }
    }

    // Request counts match the workload, code by code.
    let requests = |listener: &str, decision: &str| {
        exp.value(
            "scopegate_requests",
            "scopegate_requests_total",
            &[("listener", listener), ("decision", decision)],
        )
    };
    for decision in DECISIONS {
        let want = match *decision {
            "allowed" => allowed,
            code => refused.get(code).copied().unwrap_or(0),
        };
        assert_eq!(
            requests("proxy", decision),
            want as f64,
            "requests_total{{listener=proxy,decision={decision}}}"
        );
        let admin_want = if *decision == "allowed" { 1.0 } else { 0.0 };
        assert_eq!(
            requests("admin", decision),
            admin_want,
            "requests_total{{listener=admin,decision={decision}}} (the mint)"
        );
    }

    // Durations: one observation per request, by listener and outcome.
    let duration = "scopegate_request_duration_seconds";
    for (listener, outcome, want) in [
        ("proxy", "forwarded", allowed),
        ("proxy", "refused", refused_total),
        ("admin", "forwarded", 1),
        ("admin", "refused", 0),
    ] {
        let count = histogram_series(
            &exp,
            duration,
            &[("listener", listener), ("outcome", outcome)],
        );
        assert_eq!(
            count, want as f64,
            "{duration}{{{listener},{outcome}}}_count"
        );
    }
    let upstream_sends = allowed + 1;
    let count = histogram_series(&exp, "scopegate_upstream_duration_seconds", &[]);
    assert_eq!(
        count, upstream_sends as f64,
        "one upstream head per forward and the mint"
    );

    let class = |c: &str| {
        exp.value(
            "scopegate_upstream_responses",
            "scopegate_upstream_responses_total",
            &[("class", c)],
        )
    };
    assert_eq!(class("2xx"), (upstream_sends - 1) as f64, "2xx");
    assert_eq!(class("5xx"), 1.0, "5xx (status=500)");
    for c in ["3xx", "4xx", "error", "timeout"] {
        assert_eq!(class(c), 0.0, "class {c}");
    }

    let lookup = |tier: &str, result: &str| {
        exp.value(
            "scopegate_scope_lookups",
            "scopegate_scope_lookups_total",
            &[("tier", tier), ("result", result)],
        )
    };
    let cache_lookups: f64 = ["hit", "miss", "error"]
        .iter()
        .map(|r| lookup("cache", r))
        .sum();
    assert_eq!(
        cache_lookups, lookups as f64,
        "every scope lookup starts at the cache"
    );
    assert!(
        lookup("cache", "miss") >= 1.0,
        "the unknown token missed the cache"
    );
    let store_lookups: f64 = ["hit", "miss", "error"]
        .iter()
        .map(|r| lookup("store", r))
        .sum();
    assert_eq!(
        store_lookups,
        lookup("cache", "miss"),
        "every cache miss asks the store"
    );
    assert!(
        lookup("store", "miss") >= 1.0,
        "the unknown token missed the store"
    );
    let introspections: f64 = ["hit", "miss", "error"]
        .iter()
        .map(|r| lookup("introspection", r))
        .sum();
    assert_eq!(
        introspections, 0.0,
        "introspection is off without an API key"
    );

    // Live, expired (not yet swept) and minted tokens are entries; the revoked one is not.
    let entries = exp.value("scopegate_scope_entries", "scopegate_scope_entries", &[]);
    assert!(
        (2.0..=3.0).contains(&entries),
        "scope_entries {entries}: live + minted (+ the expired one until swept)"
    );

    let learned = |s: &str| {
        exp.value(
            "scopegate_tokens_learned",
            "scopegate_tokens_learned_total",
            &[("source", s)],
        )
    };
    assert_eq!(learned("admin"), 3.0, "three registrations");
    assert_eq!(learned("mint"), 1.0, "one mint");
    assert_eq!(learned("introspection"), 0.0);
    let revocations = |s: &str| {
        exp.value(
            "scopegate_tokens_revoked",
            "scopegate_tokens_revoked_total",
            &[("source", s)],
        )
    };
    assert_eq!(revocations("admin"), 1.0, "one admin revocation");
    assert_eq!(revocations("mint") + revocations("introspection"), 0.0);

    for listener in LISTENERS {
        let inflight = exp.value(
            "scopegate_inflight_requests",
            "scopegate_inflight_requests",
            &[("listener", listener)],
        );
        assert_eq!(inflight, 0.0, "nothing in flight on {listener}");
    }

    let bytes = |d: &str| {
        exp.value(
            "scopegate_body_bytes",
            "scopegate_body_bytes_total",
            &[("direction", d)],
        )
    };
    assert_eq!(
        bytes("request"),
        (upload.len() + mint_body.len()) as f64,
        "request bytes: the upload and the mint body"
    );
    assert_eq!(
        bytes("response"),
        response_bytes as f64,
        "response bytes: every forwarded body and the mint answer"
    );

    let build = exp.value(
        "scopegate_build_info",
        "scopegate_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
    );
    assert_eq!(build, 1.0, "build_info");
    for result in ["success", "failure"] {
        let reloads = exp.value(
            "scopegate_config_reloads",
            "scopegate_config_reloads_total",
            &[("result", result)],
        );
        assert_eq!(reloads, 0.0, "no reload happened ({result})");
    }

    // No secret and no repo id, in the exposition or in any log line.
    let (status, logs) = tokio::task::spawn_blocking(move || gp.stop(Duration::from_secs(10)))
        .await
        .expect("join");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit status; logs:\n{logs}"
    );
    json_lines(&logs);
    assert!(
        logs.contains("\"decision\":\"repo_out_of_scope\"") && logs.contains(&token_id(&live)),
        "access log lines missing (RUST_LOG=info):\n{logs}"
    );
    let mut forbidden: Vec<(String, String)> = vec![
        ("repo id A".into(), REPO_A.into()),
        ("repo id B".into(), REPO_B.into()),
        ("account key".into(), ACCOUNT_KEY.into()),
        ("admin token".into(), ADMIN_TOKEN.into()),
    ];
    for (what, token) in [
        ("live", &live),
        ("revoked", &revoked),
        ("expired", &expired),
        ("minted", &minted),
        ("unknown", &unknown),
    ] {
        let digest = scopegate::scope::TokenDigest::of(token).to_hex();
        let body = token.strip_prefix("rlcr-").expect("rlcr- prefix");
        forbidden.push((format!("{what} token"), token.clone()));
        forbidden.push((format!("{what} token body"), body.to_owned()));
        forbidden.push((format!("{what} token digest"), digest));
    }
    for (what, needle) in &forbidden {
        assert!(!text.contains(needle.as_str()), "{what} found in /metrics");
        assert!(!logs.contains(needle.as_str()), "{what} found in the logs");
    }
}

// ---------------------------------------------------------------------------------------
// 2. and 3. draining on SIGTERM

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_response_finish_while_readyz_is_503() {
    let fake = FakeRelace::start().await;
    let builder = Gateway::builder(&fake.url()).set("proxy.shutdown_grace", &toml_str("10s"));
    let mut gp = GatewayProcess::spawn(&builder);
    let token = registered_token(gp.admin).await;
    let ready = call(gp.admin, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "ready before SIGTERM");

    let target = format!("/v1/repo/{REPO_A}/x?delay_ms=3000");
    let proxy = gp.proxy;
    let in_flight = {
        let (target, auth) = (target.clone(), bearer(&token));
        tokio::spawn(
            async move { call(proxy, "GET", &target, &[("Authorization", &auth)], b"").await },
        )
    };
    assert!(
        fake.wait_for_requests(1, Duration::from_secs(5)).await,
        "the slow request never reached the upstream"
    );
    let signalled = Instant::now();
    send_signal(gp.child.id(), "TERM");

    // /readyz turns 503 at once, while the admin listener keeps serving.
    let not_ready = poll_until(Duration::from_secs(2), || async move {
        let r = try_call(gp.admin, "GET", "/readyz").await?;
        (r.status == 503).then_some(())
    })
    .await;
    assert!(
        not_ready.is_some(),
        "/readyz did not turn 503 within 2 s of SIGTERM"
    );
    assert!(
        !in_flight.is_finished(),
        "the in-flight request finished before the drain was observed; the test proves nothing"
    );

    // The proxy listener no longer serves new connections: refused, or closed unanswered.
    let probe = support::raw::build_request("GET", "/healthz", &[], b"");
    let unserved = poll_until(Duration::from_secs(1), || {
        let probe = probe.clone();
        async move {
            match tokio::time::timeout(Duration::from_secs(2), try_exchange(proxy, &probe)).await {
                Ok(Err(_)) => Some("refused or reset"),
                Ok(Ok(bytes)) if bytes.is_empty() => Some("closed without a response"),
                // Answered: the listener still accepts.
                Ok(Ok(_)) => None,
                // Accepted and left hanging is not "stopped accepting" either.
                Err(_) => None,
            }
        }
    })
    .await;
    assert!(
        unserved.is_some(),
        "a new proxy connection was still served after SIGTERM"
    );

    // The in-flight request completes with its whole answer.
    let r = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the in-flight request did not complete within 10 s")
        .expect("the in-flight request failed (connection cut?)");
    assert_eq!(r.status, 200, "{}", body_text(&r));
    let echoed = r.json();
    assert_eq!(
        echoed["target"],
        target.as_str(),
        "the whole echo body arrived"
    );
    assert_eq!(echoed["method"], "GET");

    // Then the process exits 0, well inside the grace period.
    let status = wait_exit(&mut gp.child, Duration::from_secs(15))
        .await
        .expect("scopegate did not exit within 15 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status; logs:\n{}", gp.logs());
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exit took the whole grace period although the request finished after ~3 s"
    );
    let logs = logs_containing(&gp, "\"message\":\"stopped\"", Duration::from_secs(5)).await;
    assert_eq!(
        lines_with_message(&logs, "shutting down").len(),
        1,
        "drain start message:\n{logs}"
    );
    assert_eq!(
        lines_with_message(&logs, "all proxy connections drained").len(),
        1,
        "drain end message:\n{logs}"
    );
    assert!(
        lines_with_message(&logs, "grace period over").is_empty(),
        "nothing was cut:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_cuts_streams_still_open_and_logs_them() {
    let fake = FakeRelace::start().await;
    let builder = Gateway::builder(&fake.url()).set("proxy.shutdown_grace", &toml_str("1s"));
    let mut gp = GatewayProcess::spawn(&builder);
    let token = registered_token(gp.admin).await;

    // 100 events 200 ms apart: a 20 s stream.
    let req = Request::get(format!(
        "/v1/repo/{REPO_A}/runs/1/events?sse=100&interval_ms=200"
    ))
    .header("host", "scopegate")
    .header("authorization", bearer(&token))
    .body(Empty::<Bytes>::new())
    .expect("request");
    let resp = hyper_send(gp.proxy, req).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("no first event within 5 s")
        .expect("stream ended before the first event")
        .expect("first frame");
    let first = first.into_data().expect("a data frame");
    assert!(
        String::from_utf8_lossy(&first).contains("event: agent"),
        "first frame: {first:?}"
    );

    send_signal(gp.child.id(), "TERM");
    let signalled = Instant::now();
    let mut events = 1usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let ended = loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => panic!("the stream was still open 5 s after SIGTERM with a 1 s grace"),
            Ok(None) => break Ok(()),
            Ok(Some(Err(error))) => break Err(error),
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    events += String::from_utf8_lossy(data)
                        .matches("event: agent")
                        .count();
                }
            }
        }
    };
    let cut_after = signalled.elapsed();
    assert!(
        events < 100,
        "the stream ran to completion ({events} events)"
    );
    assert!(
        ended.is_err(),
        "a stream cut by the grace period ended like a complete body after {events} events"
    );
    assert!(
        cut_after >= Duration::from_millis(900),
        "the stream was cut {cut_after:?} after SIGTERM, before the 1 s grace"
    );

    let status = wait_exit(&mut gp.child, Duration::from_secs(10))
        .await
        .expect("scopegate did not exit within 10 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status; logs:\n{}", gp.logs());
    let logs = logs_containing(&gp, "\"message\":\"stopped\"", Duration::from_secs(5)).await;
    let warnings = lines_with_message(&logs, "grace period over");
    assert_eq!(warnings.len(), 1, "one grace-period warning:\n{logs}");
    let warning = &warnings[0];
    assert_eq!(warning["level"], "WARN", "{warning}");
    let open = warning["open_requests"]
        .as_i64()
        .unwrap_or_else(|| panic!("open_requests missing: {warning}"));
    assert!(open >= 1, "open_requests {open}: the SSE stream was open");
}

// ---------------------------------------------------------------------------------------
// 4. and 5. SIGHUP reload

/// Rewrites the running process's config file.
fn rewrite_config(gp: &GatewayProcess, text: &str) {
    std::fs::write(gp.config_dir.path().join("scopegate.toml"), text).expect("rewrite config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_applies_allow_account_keys_and_keeps_old_config_on_error() {
    let fake = FakeRelace::start().await;
    let builder = Gateway::builder(&fake.url()).set("proxy.allow_account_keys", "false");
    let gp = GatewayProcess::spawn(&builder);
    let pid = gp.child.id();
    let target = file_url(REPO_A);
    let account = bearer(ACCOUNT_KEY);
    let success = "scopegate_config_reloads_total{result=\"success\"}";
    let failure = "scopegate_config_reloads_total{result=\"failure\"}";
    let within = Duration::from_secs(5);

    let r = call_with_auth(gp.proxy, "GET", &target, &account).await;
    assert_refused(&r, 403, "account_key_forbidden");

    // The same file with allow_account_keys = true (listeners stay "127.0.0.1:0").
    let allowing = Gateway::builder(&fake.url()).set("proxy.allow_account_keys", "true");
    let allowing_toml = allowing.toml("127.0.0.1:0", "127.0.0.1:0");
    rewrite_config(&gp, &allowing_toml);
    send_signal(pid, "HUP");
    let forwarded = poll_until(within, || {
        let (target, account) = (target.clone(), account.clone());
        async move {
            let r = call_with_auth(gp.proxy, "GET", &target, &account).await;
            (r.status == 200).then_some(r)
        }
    })
    .await
    .expect("the account key was not forwarded within 5 s of SIGHUP");
    assert_eq!(
        forwarded.json()["headers"]["authorization"],
        account.as_str()
    );
    wait_metric(gp.admin, success, 1.0, within).await;
    wait_metric(gp.admin, failure, 0.0, within).await;

    // Still forwarded (the old config stays) after each refused reload.
    let still_forwarded = |what: &'static str| {
        let (target, account) = (target.clone(), account.clone());
        async move {
            let r = call_with_auth(gp.proxy, "GET", &target, &account).await;
            assert_eq!(r.status, 200, "after {what}: {}", body_text(&r));
        }
    };

    // Invalid TOML.
    rewrite_config(
        &gp,
        "[proxy]\nallow_account_keys = false\n[upstream\nurl = ",
    );
    send_signal(pid, "HUP");
    wait_metric(gp.admin, failure, 1.0, within).await;
    still_forwarded("invalid TOML").await;
    let logs = logs_containing(&gp, "not valid TOML", within).await;
    let refused = lines_with_message(&logs, "config reload refused");
    assert!(
        refused.iter().any(|l| l["level"] == "ERROR"
            && l["problem"]
                .as_str()
                .is_some_and(|p| p.contains("not valid TOML"))),
        "an error log for the invalid TOML:\n{logs}"
    );

    // Valid TOML with a bad value: nothing of it applies, not even the valid keys.
    let bad_value = Gateway::builder(&fake.url())
        .set("proxy.allow_account_keys", "false")
        .set("upstream.connect_timeout", &toml_str("soon"))
        .toml("127.0.0.1:0", "127.0.0.1:0");
    rewrite_config(&gp, &bad_value);
    send_signal(pid, "HUP");
    wait_metric(gp.admin, failure, 2.0, within).await;
    still_forwarded("a bad connect_timeout").await;
    let logs = logs_containing(&gp, "upstream.connect_timeout", within).await;
    let refused = lines_with_message(&logs, "config reload refused");
    assert!(
        refused.iter().any(|l| l["level"] == "ERROR"
            && l["problem"]
                .as_str()
                .is_some_and(|p| p.contains("upstream.connect_timeout") && p.contains("soon"))),
        "an error log naming upstream.connect_timeout:\n{logs}"
    );
    wait_metric(gp.admin, success, 1.0, within).await;

    // A valid change of a restart-only key: accepted, with a warning that it needs a
    // restart.
    let new_timeout = allowing
        .set("upstream.connect_timeout", &toml_str("2s"))
        .toml("127.0.0.1:0", "127.0.0.1:0");
    rewrite_config(&gp, &new_timeout);
    send_signal(pid, "HUP");
    wait_metric(gp.admin, success, 2.0, within).await;
    wait_metric(gp.admin, failure, 2.0, within).await;
    still_forwarded("a valid reload").await;
    let logs = logs_containing(&gp, "only a restart applies it", within).await;
    let warned = json_lines(&logs).into_iter().any(|l| {
        l["level"] == "WARN"
            && l["key"] == "upstream.connect_timeout"
            && l["message"].as_str().is_some_and(|m| m.contains("restart"))
    });
    assert!(warned, "a warning naming upstream.connect_timeout:\n{logs}");
    // Only that key was reported: the listeners said port 0 both times.
    let restart_keys: Vec<Value> = lines_with_message(&logs, "only a restart applies it")
        .into_iter()
        .map(|l| l["key"].clone())
        .collect();
    assert_eq!(
        restart_keys,
        vec![Value::from("upstream.connect_timeout")],
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_proxy_tls_certificate() {
    let fake = FakeRelace::start().await;
    let (ca1, ca2) = (
        Ca::new("scopegate test CA 1"),
        Ca::new("scopegate test CA 2"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_path, key_path) = write_pair(dir.path(), &ca1.leaf());
    let builder = Gateway::builder(&fake.url())
        .set("proxy.tls_cert", &toml_str(&path_str(&cert_path)))
        .set("proxy.tls_key", &toml_str(&path_str(&key_path)));
    let gp = GatewayProcess::spawn(&builder);
    let token = registered_token(gp.admin).await;
    let auth = bearer(&token);
    let target = file_url(REPO_A);
    let trusts_ca1 = ca1.connector(&[b"http/1.1"]);
    let trusts_ca2 = ca2.connector(&[b"http/1.1"]);

    // Before: CA 1 clients connect, CA 2 clients do not; a keep-alive connection is open.
    let tls = tls_connect(&trusts_ca1, gp.proxy)
        .await
        .expect("a client trusting CA 1 connects before the rotation");
    let (mut kept, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let (status, _) = h1_get(&mut kept, &target, &auth).await;
    assert_eq!(status, 200, "first request on the keep-alive connection");
    assert!(
        tls_connect(&trusts_ca2, gp.proxy).await.is_err(),
        "a client trusting only CA 2 must fail before the rotation"
    );

    // Rotate the files in place, then SIGHUP.
    write_pair(dir.path(), &ca2.leaf());
    send_signal(gp.child.id(), "HUP");
    let rotated = poll_until(Duration::from_secs(5), || {
        let connector = trusts_ca2.clone();
        async move { tls_connect(&connector, gp.proxy).await.ok() }
    })
    .await
    .expect("no handshake with a client trusting CA 2 within 5 s of SIGHUP");
    // The new certificate serves requests too.
    let (mut fresh, conn) = hyper::client::conn::http1::handshake(TokioIo::new(rotated))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let (status, _) = h1_get(&mut fresh, &target, &auth).await;
    assert_eq!(status, 200, "a request over the rotated certificate");
    wait_metric(
        gp.admin,
        "scopegate_config_reloads_total{result=\"success\"}",
        1.0,
        Duration::from_secs(5),
    )
    .await;

    // New connections trusting only CA 1 now fail the handshake…
    for _ in 0..3 {
        assert!(
            tls_connect(&trusts_ca1, gp.proxy).await.is_err(),
            "a client trusting only CA 1 still completed a handshake after the rotation"
        );
    }
    // …while the connection opened before the reload keeps working.
    let (status, body) = h1_get(&mut kept, &target, &auth).await;
    assert_eq!(
        status,
        200,
        "second request on the pre-rotation connection: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(fake.request_count(), 3, "three forwarded requests");
}

// ---------------------------------------------------------------------------------------
// 6. TLS on both legs with a private CA

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_client_through_tls_listener_to_https_upstream_with_private_ca_negotiates_h2() {
    let ca = Ca::new("scopegate private CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write CA");
    let (upstream_cert, upstream_key) = ca.leaf();
    let upstream = tls_upstream(server_config(&upstream_cert, &upstream_key)).await;
    let (cert_path, key_path) = write_pair(dir.path(), &ca.leaf());

    let builder = Gateway::builder(&format!("https://127.0.0.1:{}", upstream.port()))
        .set("upstream.ca_file", &toml_str(&path_str(&ca_path)))
        .set("proxy.tls_cert", &toml_str(&path_str(&cert_path)))
        .set("proxy.tls_key", &toml_str(&path_str(&key_path)));
    let gp = GatewayProcess::spawn(&builder);
    let token = registered_token(gp.admin).await;

    let tls = tls_connect(&ca.connector(&[b"h2"]), gp.proxy)
        .await
        .expect("TLS handshake with the proxy listener (leaf of the private CA)");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "ALPN h2 on the client leg"
    );
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let path = format!("/v1/repo/{REPO_A}/file/a.txt");
    let req = Request::get(format!("https://127.0.0.1{path}"))
        .header("authorization", bearer(&token))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("h2 response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let seen: Value = serde_json::from_slice(&body).expect("upstream's JSON");
    assert_eq!(
        seen["version"], "HTTP/2.0",
        "ALPN h2 on the upstream leg: {seen}"
    );
    assert_eq!(seen["path"], path.as_str());
    assert_eq!(seen["authorization"], bearer(&token).as_str());
}

// ---------------------------------------------------------------------------------------
// 7. environment overrides

/// The binary started with extra environment variables (GatewayProcess takes none).
struct EnvGateway {
    child: Child,
    proxy: SocketAddr,
    logs: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl EnvGateway {
    fn spawn(toml: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("scopegate.toml");
        std::fs::write(&path, toml).expect("write config");
        let mut command = Command::new(env!("CARGO_BIN_EXE_scopegate"));
        command
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn,scopegate=info,scopegate::access=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Only this test's overrides: nothing inherited may change the config.
        for (name, _) in std::env::vars() {
            if name.starts_with("SCOPEGATE_") && name != "SCOPEGATE_TEST_PYTHON" {
                command.env_remove(name);
            }
        }
        command.env("SCOPEGATE_LOG_FORMAT", "json");
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("spawn scopegate");
        let logs = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let proxy = loop {
            let line = match lines.next() {
                Some(Ok(line)) => line,
                other => {
                    let _ = child.kill();
                    panic!(
                        "scopegate exited before listening ({other:?}):\n{}",
                        logs.lock().map(|l| l.clone()).unwrap_or_default()
                    )
                }
            };
            if let Ok(mut all) = logs.lock() {
                all.push_str(&line);
                all.push('\n');
            }
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["message"] == "scopegate listening" {
                break v["proxy"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .expect("proxy address in the listening line");
            }
        };
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(mut all) = sink.lock() {
                    all.push_str(&line);
                    all.push('\n');
                }
            }
        });
        Self {
            child,
            proxy,
            logs,
            _dir: dir,
        }
    }
}

impl Drop for EnvGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_override_beats_the_file() {
    let fake = FakeRelace::start().await;
    let builder = Gateway::builder(&fake.url()).set("proxy.allow_account_keys", "false");
    let toml = builder.toml("127.0.0.1:0", "127.0.0.1:0");
    assert!(toml.contains("allow_account_keys = false"), "{toml}");
    let target = file_url(REPO_A);
    let account = bearer(ACCOUNT_KEY);

    // The file alone refuses account keys…
    let plain = GatewayProcess::spawn(&builder);
    let r = call_with_auth(plain.proxy, "GET", &target, &account).await;
    assert_refused(&r, 403, "account_key_forbidden");
    drop(plain);

    // …the environment variable wins over it.
    let gw = EnvGateway::spawn(&toml, &[("SCOPEGATE_PROXY__ALLOW_ACCOUNT_KEYS", "true")]);
    let r = call_with_auth(gw.proxy, "GET", &target, &account).await;
    assert_eq!(
        r.status,
        200,
        "{}; logs:\n{}",
        body_text(&r),
        gw.logs.lock().map(|l| l.clone()).unwrap_or_default()
    );
    assert_eq!(r.json()["headers"]["authorization"], account.as_str());
    assert_eq!(
        fake.request_count(),
        1,
        "only the overridden gateway forwarded"
    );
}
