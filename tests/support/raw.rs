//! A deliberately dumb HTTP/1.1 client over a raw `TcpStream`: it sends exactly the bytes
//! a test writes (dot segments, backslashes, duplicate headers and all) and parses the
//! answer by hand, so no client library can normalise an attack away before it is sent.
#![allow(dead_code)]

use std::net::SocketAddr;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

pub fn build_request(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: fake\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = find(raw, b"\r\n").expect("chunk size line");
        let size_str = std::str::from_utf8(&raw[..line_end]).expect("ascii size");
        let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16)
            .expect("hex chunk size");
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        assert_eq!(&raw[size..size + 2], b"\r\n", "chunk terminator");
        raw = &raw[size + 2..];
    }
}

pub fn parse_response(raw: &[u8]) -> RawResponse {
    let head_end = find(raw, b"\r\n\r\n").expect("complete response head");
    let head = std::str::from_utf8(&raw[..head_end]).expect("ascii head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let mut resp = RawResponse {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &raw[head_end + 4..];
    resp.body = if resp.header("transfer-encoding") == Some("chunked") {
        dechunk(rest)
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().unwrap();
        assert!(rest.len() >= len, "body shorter than Content-Length");
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    resp
}

pub async fn send(addr: SocketAddr, raw_request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw_request).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    parse_response(&raw)
}

pub async fn call(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    send(addr, &build_request(method, target, headers, body)).await
}

/// `method target` to `addr` with one `Authorization` header (the whole value, e.g.
/// `Bearer …`) and no body.
pub async fn call_with_auth(
    addr: SocketAddr,
    method: &str,
    target: &str,
    authorization: &str,
) -> RawResponse {
    call(
        addr,
        method,
        target,
        &[("Authorization", authorization)],
        b"",
    )
    .await
}

/// `POST target` to `addr` with an `Authorization` header and `Content-Type:
/// application/json`; `body` is sent as given (it need not be valid JSON).
pub async fn post_json(
    addr: SocketAddr,
    target: &str,
    authorization: &str,
    body: &[u8],
) -> RawResponse {
    call(
        addr,
        "POST",
        target,
        &[
            ("Authorization", authorization),
            ("Content-Type", "application/json"),
        ],
        body,
    )
    .await
}

/// The body as text (lossy), for assertion messages.
pub fn body_text(resp: &RawResponse) -> String {
    String::from_utf8_lossy(&resp.body).into_owned()
}

pub fn sha_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
