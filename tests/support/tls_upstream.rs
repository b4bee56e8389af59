//! A small TLS upstream (HTTP/1.1 or HTTP/2 by ALPN) that answers every request with the
//! HTTP version, path and credential it saw.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// A TLS upstream answering every request with the HTTP version, path and credential it
/// saw; returns its address.
pub async fn tls_upstream(config: rustls::ServerConfig) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let body = serde_json::json!({
                        "version": format!("{:?}", req.version()),
                        "path": req.uri().path(),
                        "authorization": req.headers().get("authorization").and_then(|v| v.to_str().ok()),
                    });
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body.to_string()))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// A rustls server config (ALPN h2, http/1.1) from PEM text.
pub fn server_config(cert_pem: &str, key_pem: &str) -> rustls::ServerConfig {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("cert")];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}
