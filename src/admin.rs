//! The admin listener (SPEC §7, §8): health, readiness, metrics, the `/admin/tokens` API
//! and the `/v1/*` passthrough through which the orchestrator mints tokens, so their
//! scope is known before the first sandbox request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use sha2::{Digest as _, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::body::{BodyStats, CountingBody, ResponseBody};
use crate::headers::{request_id, X_REQUEST_ID};
use crate::metrics::{Direction, Listener, Metrics};
use crate::observe::RequestRecord;
use crate::proxy::{
    forwarded_head, json_error, refuse, stream_response, upstream_request, ConnInfo,
};
use crate::refusal::Refusal;
use crate::request::{is_well_formed_repo_token, REPO_TOKEN_PREFIX};
use crate::runtime::LiveSettings;
use crate::scope::{LearnError, ScopeEntry, ScopeTable, Source, StoreError, TokenDigest, TokenId};
use crate::upstream::Upstream;

/// Largest `POST /admin/tokens` body accepted.
const MAX_REGISTRATION_BODY: usize = 64 * 1024;
/// Largest mint answer read to learn from; larger answers stream through unlearned.
const MAX_MINT_ANSWER: usize = 1024 * 1024;
/// Longest token name accepted by the admin API.
const MAX_NAME_LEN: usize = 256;

/// What the admin handler shares across requests.
pub struct AdminState {
    /// Reloadable settings (the admin token's digest among them).
    pub settings: LiveSettings,
    pub scopes: Arc<ScopeTable>,
    pub upstream: Upstream,
    pub metrics: Metrics,
    /// False once draining starts (SIGTERM): `/readyz` turns 503.
    pub accepting: Arc<AtomicBool>,
}

/// Handles one admin-listener request.
pub async fn handle(
    state: &AdminState,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<ResponseBody> {
    let rid = request_id(req.headers());
    let path = req.uri().path();
    if path == "/v1" || path.starts_with("/v1/") {
        return passthrough(state, req, conn, rid).await;
    }
    let response = match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if state.accepting.load(Ordering::Acquire) && state.scopes.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Bytes::from(state.metrics.render()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (_, p) if p == "/admin/tokens" || p.starts_with("/admin/tokens/") => {
            let method = req.method().clone();
            let response = admin_tokens(state, req, &rid).await;
            tracing::info!(
                target: "scopegate::access",
                request_id = rid.to_str().unwrap_or(""),
                listener = "admin",
                method = method.as_str(),
                route = "admin_tokens",
                status = response.status().as_u16(),
                "admin request"
            );
            response
        }
        (_, "/healthz" | "/readyz" | "/metrics") => {
            json_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET", &rid)
        }
        _ => json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such admin route: /healthz, /readyz, /metrics, /admin/tokens and /v1/* are served here",
            &rid,
        ),
    };
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(X_REQUEST_ID.clone(), rid);
    Response::from_parts(parts, ResponseBody::full(body, None))
}

fn text(status: StatusCode, body: &'static str) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from_static(body.as_bytes()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json(status: StatusCode, value: &serde_json::Value, rid: &HeaderValue) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from(value.to_string()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(X_REQUEST_ID.clone(), rid.clone());
    r
}

// ---------------------------------------------------------------------------------------
// /admin/tokens

fn authorized(
    state: &AdminState,
    headers: &HeaderMap,
) -> Result<(), (StatusCode, &'static str, &'static str)> {
    let settings = state.settings.load();
    let Some(expected) = &settings.admin_token_digest else {
        return Err((
            StatusCode::UNAUTHORIZED,
            "admin_disabled",
            "the admin API is disabled: configure admin.token, admin.token_file or SCOPEGATE_ADMIN_TOKEN",
        ));
    };
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let presented = match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().ok().and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        }),
        _ => None,
    };
    // Comparing digests keeps the comparison's timing independent of the secret.
    match presented {
        Some(token) if Sha256::digest(token.as_bytes()).as_slice() == expected.as_slice() => Ok(()),
        _ => Err((
            StatusCode::UNAUTHORIZED,
            "admin_unauthorized",
            "send 'Authorization: Bearer <admin token>'",
        )),
    }
}

async fn admin_tokens(
    state: &AdminState,
    req: Request<Incoming>,
    rid: &HeaderValue,
) -> Response<Bytes> {
    if let Err((status, code, message)) = authorized(state, req.headers()) {
        let mut r = json_error(status, code, message, rid);
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"scopegate-admin\""),
        );
        return r;
    }
    let path = req.uri().path().to_owned();
    let key = path.strip_prefix("/admin/tokens").unwrap_or("");
    match (req.method().clone(), key) {
        (Method::GET, "" | "/") => match state.scopes.list().await {
            Ok(listed) => {
                let tokens: Vec<serde_json::Value> =
                    listed.iter().map(|l| entry_json(l.id, &l.entry)).collect();
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "tokens": tokens }),
                    rid,
                )
            }
            Err(error) => store_unavailable(&error, rid),
        },
        (Method::POST, "" | "/") => register(state, req, rid).await,
        (method @ (Method::GET | Method::DELETE), key) => {
            let key = key.trim_start_matches('/');
            let found = if key.starts_with(REPO_TOKEN_PREFIX) {
                let digest = TokenDigest::of(key);
                state
                    .scopes
                    .get(&digest)
                    .await
                    .map(|e| e.map(|e| (digest, e)))
            } else if let Some(id) = TokenId::parse(key) {
                state.scopes.find_by_id(id).await
            } else {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "address a token by its rlcr- value or its 12-hex id",
                    rid,
                );
            };
            let (digest, entry) = match found {
                Ok(Some(found)) => found,
                Ok(None) => {
                    return json_error(StatusCode::NOT_FOUND, "not_found", "no such token", rid)
                }
                Err(error) => return store_unavailable(&error, rid),
            };
            if method == Method::GET {
                json(StatusCode::OK, &entry_json(digest.id(), &entry), rid)
            } else {
                if let Err(error) = state.scopes.revoke(digest, Source::Admin).await {
                    return store_unavailable(&error, rid);
                }
                let mut r = Response::new(Bytes::new());
                *r.status_mut() = StatusCode::NO_CONTENT;
                r.headers_mut().insert(X_REQUEST_ID.clone(), rid.clone());
                r
            }
        }
        _ => json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET or POST /admin/tokens, GET or DELETE /admin/tokens/<token or id>",
            rid,
        ),
    }
}

async fn register(
    state: &AdminState,
    req: Request<Incoming>,
    rid: &HeaderValue,
) -> Response<Bytes> {
    let body = match Limited::new(req.into_body(), MAX_REGISTRATION_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_request",
                "the body is larger than 64 KiB or was cut off",
                rid,
            )
        }
    };
    let registration = match Registration::parse(&body) {
        Ok(r) => r,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, "bad_request", &message, rid),
    };
    let digest = TokenDigest::of(&registration.token);
    let entry = ScopeEntry {
        name: registration.name.into(),
        repo_ids: registration.repo_ids.into(),
        expires_at: registration.expires_at,
        source: Source::Admin,
    };
    match state.scopes.learn(digest, entry).await {
        Ok(entry) => json(StatusCode::CREATED, &entry_json(digest.id(), &entry), rid),
        Err(LearnError::Revoked) => json_error(
            StatusCode::CONFLICT,
            "token_revoked",
            "this token was revoked and cannot be registered again: mint a new one",
            rid,
        ),
        Err(LearnError::Store(error)) => store_unavailable(&error, rid),
    }
}

/// The store could not record or read: nothing was acknowledged, retrying is safe.
fn store_unavailable(error: &StoreError, rid: &HeaderValue) -> Response<Bytes> {
    tracing::error!(%error, "scope store unavailable");
    let mut r = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "scope_unavailable",
        "the scope store cannot be written or read right now; nothing was changed, retry shortly",
        rid,
    );
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn entry_json(id: TokenId, entry: &ScopeEntry) -> serde_json::Value {
    serde_json::json!({
        "id": id.as_str(),
        "name": entry.name,
        "repo_ids": entry.repo_ids.iter().map(|u| u.hyphenated().to_string()).collect::<Vec<_>>(),
        "expires_at": entry.expires_at.and_then(|t| t.format(&Rfc3339).ok()),
        "source": entry.source.as_str(),
    })
}

/// A token registration: the mint response's shape (`token`, `name`, `repo_ids`,
/// `expires_at`). Parsed field by field so every message is precise and none echoes the
/// token.
#[derive(Debug)]
struct Registration {
    token: String,
    name: String,
    repo_ids: Vec<Uuid>,
    expires_at: Option<OffsetDateTime>,
}

impl Registration {
    fn parse(body: &[u8]) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            format!(
                "the body is not JSON (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        let object = value
            .as_object()
            .ok_or("the body must be a JSON object with token, name, repo_ids and expires_at")?;
        let token = match object.get("token") {
            Some(serde_json::Value::String(t)) if is_well_formed_repo_token(t) => t.clone(),
            Some(_) => {
                return Err(
                    "token: must be \"rlcr-\" followed by 16 to 128 letters or digits".into(),
                )
            }
            None => return Err("token: missing".into()),
        };
        let name = match object.get("name") {
            Some(serde_json::Value::String(n)) if n.len() <= MAX_NAME_LEN => n.clone(),
            Some(serde_json::Value::String(_)) => {
                return Err(format!("name: longer than {MAX_NAME_LEN} bytes"))
            }
            Some(serde_json::Value::Null) | None => String::new(),
            Some(_) => return Err("name: must be a string".into()),
        };
        let repo_ids = parse_repo_ids(object.get("repo_ids"))?;
        let expires_at = parse_expires_at(object.get("expires_at"))?;
        Ok(Self {
            token,
            name,
            repo_ids,
            expires_at,
        })
    }
}

fn parse_repo_ids(value: Option<&serde_json::Value>) -> Result<Vec<Uuid>, String> {
    let items = match value {
        Some(serde_json::Value::Array(items)) if !items.is_empty() => items,
        Some(serde_json::Value::Array(_)) => {
            return Err("repo_ids: must list at least one repo id".into())
        }
        Some(_) => return Err("repo_ids: must be an array of repo UUIDs".into()),
        None => return Err("repo_ids: missing".into()),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let s = item
                .as_str()
                .ok_or_else(|| format!("repo_ids[{i}]: must be a string"))?;
            let hyphenated = s.len() == 36;
            match Uuid::try_parse(s) {
                Ok(uuid) if hyphenated => Ok(uuid),
                _ => Err(format!(
                    "repo_ids[{i}]: {:?} is not a UUID like \"123e4567-e89b-12d3-a456-426614174000\"",
                    truncate(s, 64)
                )),
            }
        })
        .collect()
}

fn parse_expires_at(value: Option<&serde_json::Value>) -> Result<Option<OffsetDateTime>, String> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => {
            OffsetDateTime::parse(s, &Rfc3339).map(Some).map_err(|_| {
                format!(
                    "expires_at: {:?} is not an RFC 3339 timestamp like \"2026-01-31T12:00:00Z\"",
                    truncate(s, 64)
                )
            })
        }
        Some(_) => Err("expires_at: must be an RFC 3339 string or null".into()),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ---------------------------------------------------------------------------------------
// /v1/* passthrough

/// What the passthrough learns from an exchange.
enum Learn {
    Nothing,
    /// `POST /v1/repo_token`: the answer carries a new token and its scope.
    Mint,
    /// `DELETE /v1/repo_token/<token>`: forget (revoke) that token.
    Delete(TokenDigest),
}

/// Forwards an orchestrator request with its own credential, learning from mints and
/// deletes. The token in `/v1/repo_token/<token>` never reaches a log line.
async fn passthrough(
    state: &AdminState,
    req: Request<Incoming>,
    conn: ConnInfo,
    rid: HeaderValue,
) -> Response<ResponseBody> {
    let mut record = RequestRecord::start(&state.metrics, Listener::Admin, req.method(), rid);
    let path = req.uri().path();
    let learn = if path == "/v1/repo_token" && req.method() == Method::POST {
        Learn::Mint
    } else if let (Some(token), &Method::DELETE) =
        (path.strip_prefix("/v1/repo_token/"), req.method())
    {
        if is_well_formed_repo_token(token) {
            Learn::Delete(TokenDigest::of(token))
        } else {
            Learn::Nothing
        }
    } else {
        Learn::Nothing
    };
    record.set_route(if path.starts_with("/v1/repo_token") {
        "repo_token"
    } else {
        "account_api"
    });
    let sent = upstream_request(&state.upstream, &state.metrics, req, conn, &record);
    let (upstream_req, bytes_in) = match sent {
        Ok(prepared) => prepared,
        Err(refusal) => return refuse(refusal, false, record),
    };
    let response = match state.upstream.send(upstream_req).await {
        Ok(response) => response,
        Err(refusal) => return refuse(refusal, false, record),
    };
    let status = response.status();
    match learn {
        Learn::Delete(digest) if status.is_success() || status == StatusCode::NOT_FOUND => {
            // 404: the upstream no longer knows it either; it is dead everywhere.
            if let Err(error) = state.scopes.revoke(digest, Source::Mint).await {
                // The upstream already deleted it; tell the orchestrator to retry so the
                // local revocation is recorded too.
                tracing::error!(%error, "could not record a revocation");
                return refuse(Refusal::ScopeUnavailable, false, record);
            }
        }
        Learn::Mint if status.is_success() => {
            return learn_from_mint(state, response, bytes_in, record).await;
        }
        _ => {}
    }
    stream_response(response, &state.metrics, bytes_in, record)
}

/// Reads a (small) mint answer, records the token's scope, and returns the answer
/// unchanged.
async fn learn_from_mint(
    state: &AdminState,
    response: Response<Incoming>,
    bytes_in: Arc<BodyStats>,
    mut record: RequestRecord,
) -> Response<ResponseBody> {
    let declared_len = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared_len.is_some_and(|n| n > MAX_MINT_ANSWER) {
        tracing::warn!(
            "mint answer larger than 1 MiB; streamed through without learning the token"
        );
        return stream_response(response, &state.metrics, bytes_in, record);
    }
    let (mut parts, body) = response.into_parts();
    let counted = CountingBody::new(
        body,
        BodyStats::new(),
        state.metrics.clone(),
        Direction::Response,
    );
    let bytes = match Limited::new(counted, MAX_MINT_ANSWER).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return refuse(Refusal::UpstreamUnavailable, false, record),
    };
    match mint_answer(&bytes) {
        Ok((digest, entry)) => match state.scopes.learn(digest, entry).await {
            Ok(_) => record.set_token_id(digest.id()),
            Err(LearnError::Revoked) => {
                tracing::warn!(token_id = %digest.id(), "minted token was already revoked; not learned");
            }
            // An acknowledged mint must survive a restart; this one could not be
            // recorded, so it is not acknowledged (the orchestrator retries and the
            // orphan token expires upstream).
            Err(LearnError::Store(error)) => {
                tracing::error!(%error, token_id = %digest.id(), "could not record a minted token");
                return refuse(Refusal::ScopeUnavailable, false, record);
            }
        },
        Err(problem) => {
            tracing::warn!(problem, "mint answer not understood; token not learned");
        }
    }
    forwarded_head(&mut parts, &mut record);
    // The body is now whole in memory; hyper sets the length from it.
    parts.headers.remove(CONTENT_LENGTH);
    let out = BodyStats::complete(bytes.len() as u64);
    record.set_byte_counters(bytes_in, out);
    Response::from_parts(parts, ResponseBody::full(bytes, Some(record)))
}

fn mint_answer(body: &[u8]) -> Result<(TokenDigest, ScopeEntry), String> {
    let registration = Registration::parse(body)?;
    Ok((
        TokenDigest::of(&registration.token),
        ScopeEntry {
            name: registration.name.into(),
            repo_ids: registration.repo_ids.into(),
            expires_at: registration.expires_at,
            source: Source::Mint,
        },
    ))
}
