//! Introspection: asking the upstream about a token scopegate has not seen
//! (`GET /v1/repo_token/<token>` with the configured account key).

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::config::Secret;
use crate::upstream::Upstream;

/// Largest introspection answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// What the upstream said about a token.
#[derive(Debug)]
pub enum Answer {
    /// 200: the token exists with this scope.
    Known(KnownScope),
    /// 404: the upstream does not know the token.
    Unknown,
}

/// A token's scope as the upstream states it.
#[derive(Debug)]
pub struct KnownScope {
    pub name: String,
    pub repo_ids: Vec<Uuid>,
    pub expires_at: Option<OffsetDateTime>,
}

/// Why introspection could not answer (any status but 200/404, transport errors,
/// unreadable bodies). Never cached.
#[derive(Debug, Clone)]
pub struct IntrospectionError(pub String);

pub struct Introspector {
    upstream: Upstream,
    authorization: HeaderValue,
}

impl Introspector {
    pub fn new(upstream: Upstream, api_key: &Secret) -> Option<Self> {
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {}", api_key.expose())).ok()?;
        authorization.set_sensitive(true);
        Some(Self {
            upstream,
            authorization,
        })
    }

    /// Asks the upstream about `token`. The token lives only in this call's request.
    pub async fn lookup(&self, token: &str) -> Result<Answer, IntrospectionError> {
        let path = PathAndQuery::try_from(format!("/v1/repo_token/{token}"))
            .map_err(|_| IntrospectionError("token is not path-safe".into()))?;
        let uri = self
            .upstream
            .uri_for(Some(&path))
            .map_err(|e| IntrospectionError(e.to_string()))?;
        let mut req = Request::new(Either::Right(Full::new(Bytes::new())));
        *req.method_mut() = Method::GET;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(AUTHORIZATION, self.authorization.clone());
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(http::header::HOST, self.upstream.host().clone());
        let response = self
            .upstream
            .send(req)
            .await
            .map_err(|refusal| IntrospectionError(refusal.code().to_owned()))?;
        match response.status() {
            StatusCode::OK => {
                let body = Limited::new(response.into_body(), MAX_ANSWER)
                    .collect()
                    .await
                    .map_err(|e| IntrospectionError(format!("reading the answer: {e}")))?
                    .to_bytes();
                parse_known(&body)
            }
            StatusCode::NOT_FOUND => Ok(Answer::Unknown),
            status => Err(IntrospectionError(format!("upstream answered {status}"))),
        }
    }
}

fn parse_known(body: &[u8]) -> Result<Answer, IntrospectionError> {
    #[derive(serde::Deserialize)]
    struct Wire {
        #[serde(default)]
        name: Option<String>,
        repo_ids: Vec<String>,
        #[serde(default)]
        expires_at: Option<String>,
    }
    let wire: Wire = serde_json::from_slice(body)
        .map_err(|e| IntrospectionError(format!("unreadable answer: {e}")))?;
    let repo_ids = wire
        .repo_ids
        .iter()
        .map(|id| Uuid::try_parse(id))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| IntrospectionError("answer has a repo id that is not a UUID".into()))?;
    let expires_at = wire
        .expires_at
        .map(|s| OffsetDateTime::parse(&s, &Rfc3339))
        .transpose()
        .map_err(|_| IntrospectionError("answer has an unreadable expires_at".into()))?;
    Ok(Answer::Known(KnownScope {
        name: wire.name.unwrap_or_default(),
        repo_ids,
        expires_at,
    }))
}
