//! TLS on both legs: the upstream over rustls (extra roots from `upstream.ca_file`, HTTP/2
//! by ALPN) and the proxy listener's own TLS (`proxy.tls_cert`/`tls_key`).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use support::*;
use tokio::net::TcpStream;

/// A self-signed certificate for 127.0.0.1, written as PEM files.
struct TestCert {
    dir: tempfile::TempDir,
    cert_pem: String,
    key_pem: String,
}

impl TestCert {
    fn new() -> Self {
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                .expect("self-signed certificate");
        let dir = tempfile::tempdir().expect("tempdir");
        let cert_pem = certified.cert.pem();
        let key_pem = certified.key_pair.serialize_pem();
        std::fs::write(dir.path().join("cert.pem"), &cert_pem).expect("write cert");
        std::fs::write(dir.path().join("key.pem"), &key_pem).expect("write key");
        Self {
            dir,
            cert_pem,
            key_pem,
        }
    }

    fn cert_path(&self) -> String {
        self.dir.path().join("cert.pem").display().to_string()
    }

    fn key_path(&self) -> String {
        self.dir.path().join("key.pem").display().to_string()
    }

    fn server_config(&self) -> rustls::ServerConfig {
        server_config(&self.cert_pem, &self.key_pem)
    }

    fn client_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        client_config_trusting(&self.cert_pem, alpn)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_trusts_ca_file_and_speaks_h2_by_alpn() {
    let cert = TestCert::new();
    let upstream = tls_upstream(cert.server_config()).await;
    let url = format!("https://127.0.0.1:{}", upstream.port());
    let gw = Gateway::builder(&url)
        .set("upstream.ca_file", &format!("\"{}\"", cert.cert_path()))
        .start()
        .await;
    let token = gw.token_for(&[REPO_A]).await;
    let auth = bearer(&token);
    let target = format!("/v1/repo/{REPO_A}/file/a.txt");
    let r = call_with_auth(gw.proxy, "GET", &target, &auth).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = r.json();
    assert_eq!(seen["version"], "HTTP/2.0", "ALPN should pick h2: {seen}");
    assert_eq!(seen["path"], target);
    assert_eq!(seen["authorization"], auth.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_with_an_untrusted_certificate_is_unavailable() {
    let cert = TestCert::new();
    let upstream = tls_upstream(cert.server_config()).await;
    let gw = Gateway::builder(&format!("https://127.0.0.1:{}", upstream.port()))
        .start()
        .await;
    let token = gw.token_for(&[REPO_A]).await;
    let target = format!("/v1/repo/{REPO_A}");
    let r = call_with_auth(gw.proxy, "GET", &target, &bearer(&token)).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["code"], "upstream_unavailable");
}

async fn tls_client(
    cert: &TestCert,
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cert.client_config(alpn)));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    connector
        .connect(ServerName::try_from("127.0.0.1").expect("name"), tcp)
        .await
        .expect("TLS handshake with the proxy listener")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_listener_serves_tls_with_h2_and_http1() {
    let cert = TestCert::new();
    let fake = FakeRelace::start().await;
    let gw = Gateway::builder(&fake.url())
        .set("proxy.tls_cert", &format!("\"{}\"", cert.cert_path()))
        .set("proxy.tls_key", &format!("\"{}\"", cert.key_path()))
        .start()
        .await;
    let token = gw.token_for(&[REPO_A]).await;
    let uri = format!("/v1/repo/{REPO_A}");

    // HTTP/2 over TLS.
    let tls = tls_client(&cert, gw.proxy, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::get(format!("https://127.0.0.1{uri}"))
        .header("authorization", bearer(&token))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let echoed: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(echoed["headers"]["x-forwarded-proto"], "https");

    // HTTP/1.1 over TLS, refused locally.
    let tls = tls_client(&cert, gw.proxy, &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let req = Request::get(format!("/v1/repo/{REPO_B}"))
        .header("host", "127.0.0.1")
        .header("authorization", bearer(&token))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("h1 response");
    assert_eq!(resp.status(), 403);
    assert_eq!(
        fake.request_count(),
        1,
        "only the permitted request reached the upstream"
    );
}
