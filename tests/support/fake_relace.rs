//! A fake Relace upstream for scopegate's integration tests.
//!
//! It imitates the parts of `api.relace.run/v1` the gateway touches (see
//! `/work/shared/RELACE_API.md` §a and §c): account-key routes for repo tokens
//! and the repo list, plus a catch-all `/v1/repo/...` that echoes what it
//! received. It deliberately does **not** authorize repo routes: the gateway
//! under test must do that, and the fake only records what got through.
//!
//! Repo routes take behaviour switches as query parameters (`bytes=`, `sse=`,
//! `status=`, `delay_ms=`, `reset=`, `abort_after=`, `hop=`, ...) so tests can
//! provoke large downloads, event streams, upstream errors, timeouts and broken
//! connections without a second fake.
//!
//! Bodies are streamed both ways (hashed incrementally on the way in, generated
//! lazily on the way out) so 128 MiB transfers run in constant memory.
//!
//! This file is self-contained so that tests (`mod fake_relace;`) and the
//! `fake-relace` example (`#[path = ...]`) can both include it.

// Each includer uses a different subset of the API.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// The only account key the fake accepts on account routes.
pub const ACCOUNT_KEY: &str = "rlc-testaccountkey0000000000000000000";

/// Size of each generated download chunk (`bytes=`).
const CHUNK: usize = 64 * 1024;
/// Account routes parse JSON; anything bigger than this is not a real token
/// request, and buffering it would defeat the constant-memory goal.
const JSON_LIMIT: usize = 1024 * 1024;
/// The download pattern repeats every 251 bytes (a prime, so it never lines up
/// with chunk or buffer boundaries and misplaced bytes show up in the hash).
const PATTERN_PERIOD: u64 = 251;
/// How long an `abort_after=` body waits, after its last byte, before failing.
const ABORT_GRACE: Duration = Duration::from_millis(200);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RespBody = UnsyncBoxBody<Bytes, BoxError>;

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Request target exactly as received (path and query, no decoding).
    pub target: String,
    /// `"HTTP/1.1"`, `"HTTP/2.0"`, ...
    pub version: String,
    /// Lower-case names, values lossy UTF-8.
    pub headers: Vec<(String, String)>,
    /// `None` until the request body has been read completely.
    pub body_len: Option<u64>,
    /// Lowercase hex SHA-256 of the body; `None` until it has been read completely.
    pub body_sha256: Option<String>,
}

impl Recorded {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All values of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// SHA-256 (lowercase hex) of the `bytes=n` download body, so tests can check
/// what arrived without materialising the expected bytes.
pub fn pattern_sha256(n: u64) -> String {
    let mut hasher = Sha256::new();
    let mut pos = 0u64;
    while pos < n {
        let len = (n - pos).min(CHUNK as u64) as usize;
        hasher.update(pattern_chunk(pos, len));
        pos += len as u64;
    }
    hex(&hasher.finalize())
}

#[derive(Clone)]
struct Token {
    name: String,
    repo_ids: Vec<String>,
    expires_at: Option<OffsetDateTime>,
}

impl Token {
    fn is_live(&self, now: OffsetDateTime) -> bool {
        // `Option::is_none_or` is newer than the crate's MSRV.
        match self.expires_at {
            Some(t) => t > now,
            None => true,
        }
    }

    fn expires_at_json(&self) -> Value {
        self.expires_at
            .and_then(|t| t.format(&Rfc3339).ok())
            .map_or(Value::Null, Value::String)
    }
}

#[derive(Default)]
struct Inner {
    requests: Vec<Recorded>,
    tokens: HashMap<String, Token>,
    /// `GET /v1/repo_token/<token>` answers this late (decided first, sent after).
    token_lookup_delay: Duration,
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
    /// Woken whenever a request is recorded, for `wait_for_requests`.
    notify: Notify,
    connections: AtomicUsize,
}

impl Shared {
    /// A panic elsewhere (e.g. a failing assertion in a test thread) must not
    /// turn every later call into a second panic, so poisoning is ignored: the
    /// data is only ever mutated by short, non-panicking critical sections.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_head(&self, parts: &http::request::Parts) -> usize {
        let rec = Recorded {
            method: parts.method.as_str().to_owned(),
            target: raw_target(parts),
            version: format!("{:?}", parts.version),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body_len: None,
            body_sha256: None,
        };
        let idx = {
            let mut inner = self.lock();
            inner.requests.push(rec);
            inner.requests.len() - 1
        };
        self.notify.notify_waiters();
        idx
    }

    fn record_body(&self, idx: usize, drained: &Drained) {
        let mut inner = self.lock();
        if let Some(rec) = inner.requests.get_mut(idx) {
            rec.body_len = Some(drained.len);
            rec.body_sha256 = Some(drained.sha256.clone());
        }
    }

    /// Store a new token and return its secret together with what was stored.
    fn insert_token(
        &self,
        name: String,
        repo_ids: Vec<String>,
        ttl: Option<u64>,
    ) -> (String, Token) {
        let secret = new_token();
        let token = Token {
            name,
            repo_ids,
            expires_at: ttl.and_then(expiry_from_ttl),
        };
        self.lock().tokens.insert(secret.clone(), token.clone());
        (secret, token)
    }
}

/// A running fake upstream. Dropping it stops the server and every open
/// connection.
pub struct FakeRelace {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Drop for FakeRelace {
    fn drop(&mut self) {
        // The connection tasks live in a JoinSet owned by the accept task, so
        // aborting it tears down in-flight connections too.
        self.accept.abort();
    }
}

impl FakeRelace {
    /// Start on an ephemeral loopback port.
    pub async fn start() -> FakeRelace {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind 127.0.0.1:0 for the fake Relace upstream")
    }

    pub async fn start_on(addr: SocketAddr) -> std::io::Result<FakeRelace> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FakeRelace {
            addr,
            shared,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL without `/v1` (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// TCP connections accepted so far (lets tests prove connection pooling).
    pub fn connections_accepted(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Create a repo token directly in the fake's table (no HTTP round trip).
    /// Repo ids are stored verbatim, unlike `POST /v1/repo_token`, which
    /// validates and normalises them.
    pub fn mint(&self, name: &str, repo_ids: &[&str], ttl_seconds: Option<u64>) -> String {
        self.shared
            .insert_token(
                name.to_owned(),
                repo_ids.iter().map(|s| (*s).to_owned()).collect(),
                ttl_seconds,
            )
            .0
    }

    /// Whether `token` exists and has not expired.
    /// Every `GET /v1/repo_token/<token>` received (the gateway's introspections and
    /// re-confirmations).
    pub fn token_lookups(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.target.starts_with("/v1/repo_token/"))
            .collect()
    }

    /// How many requests reached the repo routes (forwarded sandbox requests).
    pub fn repo_requests(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.target.starts_with("/v1/repo/"))
            .count()
    }

    /// Makes token lookups (introspection) answer `delay` late: the answer is decided when
    /// the request arrives, as a slow upstream's would be.
    pub fn set_token_lookup_delay(&self, delay: Duration) {
        self.shared.lock().token_lookup_delay = delay;
    }

    pub fn has_token(&self, token: &str) -> bool {
        let now = OffsetDateTime::now_utc();
        self.shared
            .lock()
            .tokens
            .get(token)
            .is_some_and(|t| t.is_live(now))
    }

    /// Wait until at least `n` requests have been recorded. Returns false on
    /// timeout.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        loop {
            // Register interest before checking the count so a request that
            // lands between the check and the await still wakes us.
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.request_count() >= n {
                return true;
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return self.request_count() >= n;
                    }
                }
                None => notified.await,
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // `auto` sniffs the HTTP/2 preface, so one listener serves HTTP/1.1 and h2c.
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(_) => {
                        // Transient accept errors (EMFILE, ECONNABORTED) must
                        // not kill the fake mid-test; back off and keep going.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let builder = builder.clone();
                let shared = shared.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    // Errors here are expected (`reset=1`, `abort_after=`,
                    // clients hanging up) and carry no information for tests.
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = conns.join_next() => {}
        }
    }
}

enum Route<'a> {
    TokenCreate,
    Token(&'a str),
    RepoList,
    Repo,
    NotFound,
}

fn route(path: &str) -> Route<'_> {
    match path {
        "/v1/repo_token" => Route::TokenCreate,
        "/v1/repo" => Route::RepoList,
        _ => {
            if let Some(token) = path.strip_prefix("/v1/repo_token/") {
                if token.is_empty() || token.contains('/') {
                    Route::NotFound
                } else {
                    Route::Token(token)
                }
            } else if path
                .strip_prefix("/v1/repo/")
                .is_some_and(|r| !r.is_empty())
            {
                Route::Repo
            } else {
                Route::NotFound
            }
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, BoxError> {
    let (parts, body) = req.into_parts();
    let idx = shared.record_head(&parts);
    let path = parts.uri.path().to_owned();
    match route(&path) {
        Route::Repo => handle_repo(&shared, idx, &parts, body).await,
        Route::NotFound => {
            drain_and_record(&shared, idx, body, None).await?;
            Ok(json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "Bad Request: Route not found"}),
            ))
        }
        account => {
            let keep = matches!(account, Route::TokenCreate).then_some(JSON_LIMIT);
            let drained = drain_and_record(&shared, idx, body, keep).await?;
            if !authorized(&parts.headers) {
                let mut resp = json_response(
                    StatusCode::UNAUTHORIZED,
                    &json!({"error": "Invalid authentication credentials"}),
                );
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return Ok(resp);
            }
            Ok(match (account, &parts.method) {
                (Route::TokenCreate, &Method::POST) => create_token(&shared, &drained),
                (Route::TokenCreate, _) => method_not_allowed("POST"),
                (Route::Token(token), &Method::GET) => {
                    let answer = get_token(&shared, token);
                    let delay = shared.lock().token_lookup_delay;
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    answer
                }
                (Route::Token(token), &Method::DELETE) => delete_token(&shared, token),
                (Route::Token(_), _) => method_not_allowed("GET, DELETE"),
                (Route::RepoList, &Method::GET) => {
                    json_response(StatusCode::OK, &json!({"items": [], "total_items": 0}))
                }
                (Route::RepoList, _) => method_not_allowed("GET"),
                // Repo and NotFound were handled above.
                (Route::Repo | Route::NotFound, _) => json_response(
                    StatusCode::NOT_FOUND,
                    &json!({"error": "Bad Request: Route not found"}),
                ),
            })
        }
    }
}

fn authorized(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    // Two Authorization headers are ambiguous; a real edge would refuse them.
    let (Some(value), None) = (values.next(), values.next()) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let Some((scheme, credential)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && credential.trim() == ACCOUNT_KEY
}

fn create_token(shared: &Shared, drained: &Drained) -> Response<RespBody> {
    let Some(bytes) = drained.kept.as_deref() else {
        return json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({"error": "Payload too large"}),
        );
    };
    let request = match parse_token_request(bytes) {
        Ok(r) => r,
        Err((loc, msg)) => {
            // FastAPI/pydantic-style validation error, as the origin sends.
            return json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({"detail": [{"type": "value_error", "loc": loc, "msg": msg}]}),
            );
        }
    };
    let (secret, minted) = shared.insert_token(request.name, request.repo_ids, request.ttl);
    json_response(
        StatusCode::OK,
        &json!({
            "name": minted.name,
            "token": secret,
            "repo_ids": minted.repo_ids,
            "expires_at": minted.expires_at_json(),
        }),
    )
}

struct TokenRequest {
    name: String,
    repo_ids: Vec<String>,
    ttl: Option<u64>,
}

type ValidationError = (Vec<&'static str>, String);

fn parse_token_request(bytes: &[u8]) -> Result<TokenRequest, ValidationError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| (vec!["body"], format!("JSON decode error: {e}")))?;
    let Value::Object(obj) = value else {
        return Err((vec!["body"], "Input should be an object".into()));
    };
    let name = match obj.get("name") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err((vec!["body", "name"], "Input should be a string".into())),
        None => return Err((vec!["body", "name"], "Field required".into())),
    };
    let repo_ids = match obj.get("repo_ids") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .and_then(|s| uuid::Uuid::parse_str(s).ok())
                    // Normalise like pydantic's UUID type does on output.
                    .map(|u| u.hyphenated().to_string())
                    .ok_or_else(|| {
                        (
                            vec!["body", "repo_ids"],
                            "Input should be a valid UUID".to_owned(),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err((
                vec!["body", "repo_ids"],
                "Input should be a valid list".into(),
            ))
        }
        None => return Err((vec!["body", "repo_ids"], "Field required".into())),
    };
    let ttl = match obj.get("ttl_seconds") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            // A TTL that cannot be represented as a date is a client error,
            // not something to silently turn into "never expires".
            Some(n) if expiry_from_ttl(n).is_some() => Some(n),
            _ => {
                return Err((
                    vec!["body", "ttl_seconds"],
                    "Input should be a valid non-negative integer".into(),
                ))
            }
        },
    };
    Ok(TokenRequest {
        name,
        repo_ids,
        ttl,
    })
}

fn get_token(shared: &Shared, token: &str) -> Response<RespBody> {
    let now = OffsetDateTime::now_utc();
    let inner = shared.lock();
    match inner.tokens.get(token).filter(|t| t.is_live(now)) {
        Some(t) => json_response(
            StatusCode::OK,
            &json!({"name": t.name, "repo_ids": t.repo_ids, "expires_at": t.expires_at_json()}),
        ),
        None => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

fn delete_token(shared: &Shared, token: &str) -> Response<RespBody> {
    let now = OffsetDateTime::now_utc();
    let removed = shared.lock().tokens.remove(token);
    match removed {
        Some(t) if t.is_live(now) => empty_response(StatusCode::NO_CONTENT),
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

/// Behaviour switches read from a repo route's query string.
#[derive(Default)]
struct Switches {
    bytes: Option<u64>,
    chunked: bool,
    sse: Option<u64>,
    interval_ms: u64,
    status: Option<u16>,
    retry_after: Option<HeaderValue>,
    delay_ms: u64,
    reset: bool,
    abort_after: Option<u64>,
    hop: bool,
}

fn parse_switches(query: &str) -> Result<Switches, String> {
    fn num(key: &str, value: &str) -> Result<u64, String> {
        value
            .parse()
            .map_err(|_| format!("query parameter {key} must be a non-negative integer"))
    }
    fn flag(key: &str, value: &str) -> Result<bool, String> {
        match value {
            "1" | "true" => Ok(true),
            "0" | "false" => Ok(false),
            _ => Err(format!("query parameter {key} must be 0 or 1")),
        }
    }
    let mut sw = Switches::default();
    // Deliberately naive (no percent-decoding): tests control these values and
    // unrelated parameters (`service=`, `commit=`, ...) must pass untouched.
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "bytes" => sw.bytes = Some(num(key, value)?),
            "chunked" => sw.chunked = flag(key, value)?,
            "sse" => sw.sse = Some(num(key, value)?),
            "interval_ms" => sw.interval_ms = num(key, value)?,
            "status" => {
                let s = num(key, value)?;
                // 1xx is not a final response, and >599 is not HTTP.
                if !(200..=599).contains(&s) {
                    return Err("query parameter status must be in 200..=599".into());
                }
                sw.status = Some(s as u16);
            }
            "retry_after" => {
                sw.retry_after = Some(
                    HeaderValue::from_str(value)
                        .map_err(|_| "query parameter retry_after is not a valid header value")?,
                )
            }
            "delay_ms" => sw.delay_ms = num(key, value)?,
            "reset" => sw.reset = flag(key, value)?,
            "abort_after" => sw.abort_after = Some(num(key, value)?),
            "hop" => sw.hop = flag(key, value)?,
            _ => {}
        }
    }
    Ok(sw)
}

async fn handle_repo(
    shared: &Shared,
    idx: usize,
    parts: &http::request::Parts,
    body: Incoming,
) -> Result<Response<RespBody>, BoxError> {
    let sw = match parse_switches(parts.uri.query().unwrap_or("")) {
        Ok(sw) => sw,
        Err(msg) => {
            drain_and_record(shared, idx, body, None).await?;
            return Ok(json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "error": msg }),
            ));
        }
    };
    if sw.reset {
        // The body is left unread on purpose: a real crash does not wait for
        // the upload. Returning an error makes hyper close the HTTP/1
        // connection without writing anything (HTTP/2: the stream is reset).
        tokio::time::sleep(Duration::from_millis(sw.delay_ms)).await;
        return Err("reset requested by reset=1".into());
    }
    let drained = drain_and_record(shared, idx, body, None).await?;
    if sw.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(sw.delay_ms)).await;
    }

    let mut resp = if let Some(status) = sw.status {
        status_response(status, &sw)
    } else if let Some(events) = sw.sse {
        sse_response(events, Duration::from_millis(sw.interval_ms))
    } else if let Some(len) = sw.bytes {
        bytes_response(len, sw.chunked, sw.abort_after)
    } else {
        echo_response(parts, &drained)
    };

    if sw.hop {
        // Hop-by-hop headers the gateway must strip, plus one end-to-end
        // header it must keep; `x-hop-secret` is hop-by-hop only because
        // `Connection` names it.
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop-secret"));
        h.insert("x-hop-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        h.insert(header::TRAILER, HeaderValue::from_static("X-Foo"));
    }
    Ok(resp)
}

fn status_response(status: u16, sw: &Switches) -> Response<RespBody> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = if code == StatusCode::NO_CONTENT || code == StatusCode::NOT_MODIFIED {
        // These statuses cannot carry a body.
        empty_response(code)
    } else {
        let msg = match code {
            // Matches the edge's wording (RELACE_API.md §d).
            StatusCode::TOO_MANY_REQUESTS => "Rate limit exceeded".to_owned(),
            _ => code
                .canonical_reason()
                .map_or_else(|| format!("Status {status}"), str::to_owned),
        };
        json_response(code, &json!({ "error": msg }))
    };
    let h = resp.headers_mut();
    if let Some(retry_after) = &sw.retry_after {
        h.insert(header::RETRY_AFTER, retry_after.clone());
    }
    if code == StatusCode::TOO_MANY_REQUESTS {
        h.insert("x-ratelimit-limit", HeaderValue::from_static("100"));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        h.insert("x-ratelimit-reset", HeaderValue::from_static("60"));
    }
    resp
}

fn sse_response(events: u64, interval: Duration) -> Response<RespBody> {
    let body = SseBody {
        total: events,
        sent: 0,
        interval,
        sleep: None,
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body.boxed_unsync())
        .expect("static")
}

fn bytes_response(len: u64, chunked: bool, abort_after: Option<u64>) -> Response<RespBody> {
    // Only a cut that leaves bytes unsent is an abort; otherwise the body
    // would be complete and the error meaningless.
    let (stop_at, fail) = match abort_after {
        Some(n) if n < len => (n, true),
        _ => (len, false),
    };
    let body = PatternBody {
        total: len,
        sent: 0,
        stop_at,
        fail,
        failed: false,
        grace: None,
        exact: !chunked,
    };
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(
            header::CONTENT_DISPOSITION,
            "attachment; filename=\"big.bin\"",
        );
    if !chunked {
        builder = builder.header(header::CONTENT_LENGTH, len);
    }
    builder.body(body.boxed_unsync()).expect("static")
}

fn echo_response(parts: &http::request::Parts, drained: &Drained) -> Response<RespBody> {
    let mut headers = serde_json::Map::new();
    for (name, value) in &parts.headers {
        // Later values overwrite earlier ones: "last wins".
        headers.insert(
            name.as_str().to_owned(),
            Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()),
        );
    }
    json_response(
        StatusCode::OK,
        &json!({
            "method": parts.method.as_str(),
            "target": raw_target(parts),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_len": drained.len,
            "body_sha256": drained.sha256,
        }),
    )
}

fn method_not_allowed(allow: &'static str) -> Response<RespBody> {
    let mut resp = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"error": "Method Not Allowed"}),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

fn json_response(status: StatusCode, value: &Value) -> Response<RespBody> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed_unsync();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("static")
}

fn empty_response(status: StatusCode) -> Response<RespBody> {
    let body = Empty::new().map_err(|never| match never {}).boxed_unsync();
    Response::builder()
        .status(status)
        .body(body)
        .expect("static")
}

/// The request target as it came off the wire.
fn raw_target(parts: &http::request::Parts) -> String {
    let uri = &parts.uri;
    match (uri.scheme(), uri.path_and_query()) {
        // HTTP/1 absolute-form (`GET http://host/path`): that *is* the target.
        // (For HTTP/2 hyper synthesises scheme/authority from pseudo-headers,
        // so only `:path` is the target there.)
        (Some(_), _) if parts.version != Version::HTTP_2 => uri.to_string(),
        (_, Some(pq)) => pq.as_str().to_owned(),
        // Authority-form (CONNECT).
        _ => uri.to_string(),
    }
}

struct Drained {
    len: u64,
    sha256: String,
    /// The body bytes when buffering was requested and the body fit.
    kept: Option<Vec<u8>>,
}

/// Read the whole request body, hashing as it streams, keeping at most
/// `keep` bytes in memory, and record the result.
async fn drain_and_record(
    shared: &Shared,
    idx: usize,
    mut body: Incoming,
    keep: Option<usize>,
) -> Result<Drained, BoxError> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut kept = keep.map(|_| Vec::new());
    while let Some(frame) = body.frame().await {
        // A broken upload leaves body_len as None, which is what tests check.
        let frame = frame?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        hasher.update(&data);
        len = len.saturating_add(data.len() as u64);
        if let (Some(buf), Some(limit)) = (kept.as_mut(), keep) {
            if buf.len() + data.len() <= limit {
                buf.extend_from_slice(&data);
            } else {
                kept = None;
            }
        }
    }
    let drained = Drained {
        len,
        sha256: hex(&hasher.finalize()),
        kept,
    };
    shared.record_body(idx, &drained);
    Ok(drained)
}

/// Lazily generated `bytes=` body: byte i is `i % 251`.
struct PatternBody {
    total: u64,
    sent: u64,
    /// Where to stop producing data (`total`, or the `abort_after` cut).
    stop_at: u64,
    /// Whether reaching `stop_at` ends in an error instead of end-of-stream.
    fail: bool,
    failed: bool,
    /// Pause between the last byte and the failure (see `poll_frame`).
    grace: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Advertise the exact length (so hyper may use Content-Length); false for
    /// `chunked=1`, which forces chunked transfer-encoding on HTTP/1.1.
    exact: bool,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.sent >= this.stop_at {
            if this.fail && !this.failed {
                // hyper buffers frames that are ready immediately and drops
                // that buffer when the body fails, so failing at once would
                // mean not even the head gets out. Pausing first lets hyper
                // flush the first N bytes to the peer.
                let grace = this
                    .grace
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(ABORT_GRACE)));
                ready!(grace.as_mut().poll(cx));
                this.failed = true;
                return Poll::Ready(Some(Err("body aborted by abort_after".into())));
            }
            return Poll::Ready(None);
        }
        let n = (this.stop_at - this.sent).min(CHUNK as u64) as usize;
        let chunk = pattern_chunk(this.sent, n);
        this.sent += n as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        !self.fail && self.sent >= self.total
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.total.saturating_sub(self.sent))
        } else {
            SizeHint::default()
        }
    }
}

/// One shared block of the pattern, long enough that any chunk of up to
/// `CHUNK` bytes starting at any phase is a zero-copy slice of it.
fn pattern_block() -> &'static Bytes {
    static BLOCK: OnceLock<Bytes> = OnceLock::new();
    BLOCK.get_or_init(|| {
        (0..CHUNK as u64 + PATTERN_PERIOD)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect::<Vec<u8>>()
            .into()
    })
}

/// `len` (≤ CHUNK) pattern bytes starting at absolute offset `pos`.
fn pattern_chunk(pos: u64, len: usize) -> Bytes {
    let phase = (pos % PATTERN_PERIOD) as usize;
    pattern_block().slice(phase..phase + len)
}

/// `sse=N` body: N `agent` events, `interval` apart, each its own frame.
struct SseBody {
    total: u64,
    sent: u64,
    interval: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.sent >= this.total {
            return Poll::Ready(None);
        }
        if let Some(sleep) = this.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
        }
        let event = format!("event: agent\ndata: {{\"i\":{}}}\n\n", this.sent);
        this.sent += 1;
        // No sleep after the last event: the body ends right after it.
        if this.sent < this.total && !this.interval.is_zero() {
            this.sleep = Some(Box::pin(tokio::time::sleep(this.interval)));
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.total
    }
}

fn expiry_from_ttl(ttl: u64) -> Option<OffsetDateTime> {
    let ttl = i64::try_from(ttl).ok()?;
    let now = OffsetDateTime::now_utc();
    // Whole seconds keep `expires_at` readable and stable in assertions.
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.checked_add(time::Duration::seconds(ttl))
}

fn new_token() -> String {
    // Two v4 UUIDs give 244 random bits; hashing them just shapes the output
    // into the documented `rlcr-` + 40 hex form.
    let mut hasher = Sha256::new();
    hasher.update(uuid::Uuid::new_v4().as_bytes());
    hasher.update(uuid::Uuid::new_v4().as_bytes());
    format!("rlcr-{}", hex(&hasher.finalize()[..20]))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}
