//! The proxy listener's handler: `classify → authorize → forward`, the header hygiene and
//! streaming around forwarding, and the single function that turns a [`Refusal`] into a
//! response.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HOST, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;

use crate::body::{BodyStats, CountingBody, ResponseBody, UpstreamBody};
use crate::headers::{prepare_request_headers, request_id, strip_hop_by_hop, X_REQUEST_ID};
use crate::metrics::{Decision, Direction, Listener, Metrics};
use crate::observe::RequestRecord;
use crate::refusal::Refusal;
use crate::request::{classify, presented_repo_token, Credential, RouteClass};
use crate::runtime::LiveSettings;
use crate::scope::{Permit, ScopeTable};
use crate::upstream::Upstream;

static X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// What the proxy handler shares across requests.
pub struct ProxyState {
    /// Reloadable settings (account-key policy, operation policy).
    pub settings: LiveSettings,
    pub scopes: Arc<ScopeTable>,
    pub upstream: Upstream,
    pub metrics: Metrics,
}

/// How a connection reached us: the client's address and `http` or `https`.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub proto: &'static str,
    /// The peer's IP as the `X-Forwarded-For` value, rendered once per connection.
    pub peer_ip: HeaderValue,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, proto: &'static str) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            peer,
            proto,
            peer_ip,
        }
    }
}

/// Handles one sandbox request. Never fails: every outcome is a response.
pub async fn handle(
    state: &ProxyState,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<ResponseBody> {
    let mut record = RequestRecord::start(
        &state.metrics,
        Listener::Proxy,
        req.method(),
        request_id(req.headers()),
    );
    let classification = classify(
        req.method(),
        req.uri(),
        req.version(),
        req.headers(),
        &state.settings.load().options,
    );
    record.set_route(classification.route.as_str());
    let git_route = classification.route == RouteClass::Git;
    let target = match classification.outcome {
        Ok(target) => target,
        Err(refusal) => return refuse(refusal, git_route, record),
    };
    if let Credential::RepoToken(digest) = target.credential {
        record.set_token_id(digest.id());
    }
    let headers = req.headers();
    let authorized = state
        .scopes
        .authorize(&target, || presented_repo_token(headers))
        .await;
    match authorized {
        Ok(permit) => forward(state, permit, req, conn, record).await,
        Err(refusal) => refuse(refusal, git_route, record),
    }
}

/// Streams a permitted request to the upstream and its answer back. Taking the
/// [`Permit`] by value is the point: there is no way to reach here without one.
async fn forward(
    state: &ProxyState,
    permit: Permit,
    req: Request<Incoming>,
    conn: ConnInfo,
    mut record: RequestRecord,
) -> Response<ResponseBody> {
    record.set_permit(permit);
    let (upstream_req, bytes_in) =
        match upstream_request(&state.upstream, &state.metrics, req, conn, &record) {
            Ok(prepared) => prepared,
            Err(refusal) => return refuse(refusal, false, record),
        };
    match state.upstream.send(upstream_req).await {
        Ok(response) => stream_response(response, &state.metrics, bytes_in, record),
        // The exchange failed because the client's own body did (cut off, or chunk
        // framing hyper rejected): the client's fault, not the upstream's.
        Err(_) if bytes_in.failed() => refuse(Refusal::BadRequestBody, false, record),
        Err(refusal) => refuse(refusal, false, record),
    }
}

/// Rewrites a client request for the upstream: same method, path and query bytes, same
/// credential; hop-by-hop headers out, `Host`/`X-Forwarded-*`/`x-request-id` in; the body
/// streamed through a byte counter.
pub(crate) fn upstream_request(
    upstream: &Upstream,
    metrics: &Metrics,
    req: Request<Incoming>,
    conn: ConnInfo,
    record: &RequestRecord,
) -> Result<(Request<UpstreamBody>, Arc<BodyStats>), Refusal> {
    let (mut parts, body) = req.into_parts();
    parts.uri = upstream
        .uri_for(parts.uri.path_and_query())
        .map_err(|_| Refusal::BadPath)?;
    prepare_request_headers(
        &mut parts.headers,
        conn.peer_ip.clone(),
        conn.proto,
        record.request_id(),
    );
    parts.headers.insert(HOST, upstream.host().clone());
    let bytes_in = BodyStats::new();
    let body = CountingBody::new(body, bytes_in.clone(), metrics.clone(), Direction::Request);
    Ok((Request::from_parts(parts, Either::Left(body)), bytes_in))
}

/// Passes the upstream's answer back: status and end-to-end headers unchanged, body
/// streamed frame by frame, the request's record finished when the body ends.
pub(crate) fn stream_response(
    response: Response<Incoming>,
    metrics: &Metrics,
    bytes_in: Arc<BodyStats>,
    mut record: RequestRecord,
) -> Response<ResponseBody> {
    let (mut parts, body) = response.into_parts();
    forwarded_head(&mut parts, &mut record);
    let bytes_out = BodyStats::new();
    record.set_byte_counters(bytes_in, bytes_out.clone());
    let body = CountingBody::new(body, bytes_out, metrics.clone(), Direction::Response);
    Response::from_parts(parts, ResponseBody::streamed(body, Some(record)))
}

/// The upstream's response head as the client gets it: hop-by-hop headers out, the
/// request id in, and the record marked allowed with the upstream's status.
pub(crate) fn forwarded_head(parts: &mut http::response::Parts, record: &mut RequestRecord) {
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(X_REQUEST_ID.clone(), record.request_id().clone());
    record.set_status(parts.status.as_u16());
    record.set_decision(Decision::Allowed);
}

/// Answers a refusal and records it.
pub(crate) fn refuse(
    refusal: Refusal,
    git_route: bool,
    mut record: RequestRecord,
) -> Response<ResponseBody> {
    let response = refusal_response(refusal, git_route, record.request_id());
    record.set_decision(Decision::Refused(refusal));
    record.set_status(response.status().as_u16());
    let (parts, body) = response.into_parts();
    record.set_own_bytes_out(body.len() as u64);
    Response::from_parts(parts, ResponseBody::full(body, Some(record)))
}

/// The one place a [`Refusal`] becomes HTTP (SPEC §4): status by who failed, the JSON
/// body, `Cache-Control: no-store`, `x-request-id`, `x-should-retry: false` on 4xx except
/// 429, the challenge on 401s (Basic on git routes so git sends its credentials).
pub fn refusal_response(
    refusal: Refusal,
    git_route: bool,
    request_id: &HeaderValue,
) -> Response<Bytes> {
    let status = match refusal {
        Refusal::BadPath | Refusal::BadRequestBody => StatusCode::BAD_REQUEST,
        Refusal::MissingCredentials { .. }
        | Refusal::MalformedCredentials
        | Refusal::UnknownToken
        | Refusal::TokenRevoked
        | Refusal::TokenExpired => StatusCode::UNAUTHORIZED,
        Refusal::AccountKeyForbidden
        | Refusal::RouteNotAllowed
        | Refusal::RepoOutOfScope
        | Refusal::OperationNotAllowed => StatusCode::FORBIDDEN,
        Refusal::ScopeUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
        Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
    };
    let mut response = json_error(status, refusal.code(), refusal.message(), request_id);
    let headers = response.headers_mut();
    if status == StatusCode::UNAUTHORIZED {
        let git = git_route || refusal == (Refusal::MissingCredentials { git: true });
        headers.insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(if git {
                "Basic realm=\"scopegate\""
            } else {
                "Bearer realm=\"scopegate\""
            }),
        );
    }
    if refusal == Refusal::ScopeUnavailable {
        headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// A JSON error answer in the shape of SPEC §4, used for refusals and admin errors alike.
pub fn json_error(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &HeaderValue,
) -> Response<Bytes> {
    /// SPEC §4's body; borrowed fields, serialized straight into one buffer.
    #[derive(serde::Serialize)]
    struct ErrorBody<'a> {
        error: &'a str,
        code: &'a str,
        request_id: &'a str,
    }
    let body = ErrorBody {
        error: message,
        code,
        request_id: request_id.to_str().unwrap_or(""),
    };
    // Serializing three strings cannot fail; an empty body would still carry the status.
    let mut response = Response::new(Bytes::from(serde_json::to_vec(&body).unwrap_or_default()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    // The SDKs retry some 4xx statuses on their own; scopegate's 4xx refusals will not
    // change on retry, except 429. Its own 5xx stay retryable.
    if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
        headers.insert(X_SHOULD_RETRY.clone(), HeaderValue::from_static("false"));
    }
    response
}
