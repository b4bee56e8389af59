//! The one pooled upstream client (hyper-util legacy client over a rustls connector),
//! built once at start-up, and the timeouts around a single exchange.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::body::UpstreamBody;
use crate::config::{UpstreamConfig, UpstreamUrl};
use crate::metrics::{Metrics, UpstreamClass};
use crate::refusal::Refusal;

/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type HttpsClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// The upstream: where it is, how to reach it, and how long to wait for it.
#[derive(Clone)]
pub struct Upstream {
    client: HttpsClient,
    url: UpstreamUrl,
    response_header_timeout: Duration,
    metrics: Metrics,
}

impl Upstream {
    /// Builds the pooled client: web PKI roots plus `upstream.ca_file`, ALPN h2 and
    /// http/1.1, `connect_timeout` on the TCP connect.
    pub fn new(config: &UpstreamConfig, metrics: Metrics) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca_file) = &config.ca_file {
            let certs = CertificateDer::pem_file_iter(ca_file)
                .with_context(|| format!("upstream.ca_file {}", ca_file.display()))?;
            let mut added = 0;
            for cert in certs {
                let cert =
                    cert.with_context(|| format!("upstream.ca_file {}", ca_file.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("upstream.ca_file {}", ca_file.display()))?;
                added += 1;
            }
            anyhow::ensure!(
                added > 0,
                "upstream.ca_file {}: no certificates found",
                ca_file.display()
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("rustls protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // Host is set by the caller from the validated config (no per-request format).
            .set_host(false)
            .build(connector);
        Ok(Self {
            client,
            url: config.url.clone(),
            response_header_timeout: config.response_header_timeout,
            metrics,
        })
    }

    /// The upstream URI for a request target: upstream origin + the original path and
    /// query, byte for byte.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.url.scheme.clone());
        parts.authority = Some(self.url.authority.clone());
        parts.path_and_query = Some(
            path_and_query
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Ok(Uri::from_parts(parts)?)
    }

    /// The upstream's `Host` header value.
    pub fn host(&self) -> &http::HeaderValue {
        &self.url.host
    }

    /// Sends one request and waits at most `response_header_timeout` for the response
    /// head. The body that follows is never time-limited (SSE can be silent for minutes).
    pub async fn send(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, Refusal> {
        // The client picks HTTP/2 by ALPN when the upstream offers it; whatever the
        // client spoke to us (h2c included) does not constrain the upstream leg.
        *req.version_mut() = Version::HTTP_11;
        let started = Instant::now();
        match tokio::time::timeout(self.response_header_timeout, self.client.request(req)).await {
            Ok(Ok(response)) => {
                self.metrics.upstream_answered(
                    UpstreamClass::Status(response.status().as_u16()),
                    Some(started.elapsed()),
                );
                Ok(response)
            }
            Ok(Err(error)) => {
                self.metrics.upstream_answered(UpstreamClass::Error, None);
                tracing::warn!(
                    error = %error_chain(&error),
                    connect = error.is_connect(),
                    "upstream request failed"
                );
                Err(Refusal::UpstreamUnavailable)
            }
            Err(_elapsed) => {
                self.metrics.upstream_answered(UpstreamClass::Timeout, None);
                tracing::warn!(
                    timeout_ms = self.response_header_timeout.as_millis() as u64,
                    "upstream sent no response head in time"
                );
                Err(Refusal::UpstreamTimeout)
            }
        }
    }
}

/// An error and its sources on one line (hyper's top-level messages are terse).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
