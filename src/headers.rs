//! Header hygiene for forwarding (SPEC §6).

use http::header::{
    HeaderName, AUTHORIZATION, CONNECTION, EXPECT, HOST, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderValue};

/// The request-id header, kept if the client sent a sane one, else generated.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Request headers that rewrite the target or method in some server frameworks.
static ROUTING_OVERRIDES: [HeaderName; 7] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-envoy-original-path"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Longest client-supplied request id that is kept.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): the fixed list and every header named
/// in `Connection`. They describe one connection and must not cross the proxy.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            // The credential was authorized as sent; a client must not be able to make
            // the gateway forward the request without it.
            .filter(|name| *name != AUTHORIZATION)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in [&CONNECTION, &TE, &TRAILER, &TRANSFER_ENCODING, &UPGRADE] {
        headers.remove(name);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
}

/// Prepares a client's request headers for the upstream. The credential is left as it
/// is: the upstream checks it again.
pub fn prepare_request_headers(
    headers: &mut HeaderMap,
    peer_ip: HeaderValue,
    proto: &'static str,
    request_id: &HeaderValue,
) {
    strip_hop_by_hop(headers);
    // scopegate answers `Expect: 100-continue` itself (hyper sends the 100 when the body
    // is first read, i.e. only once the request is permitted); the upstream must not
    // wait for a continuation the client will never get from it.
    headers.remove(EXPECT);
    // The client `Host` names the gateway; the pooled client sets the upstream's.
    headers.remove(HOST);
    // Headers that some frameworks let override the path or method the gateway just
    // authorized, and proxy credentials meant for us, never reach the upstream.
    for name in &ROUTING_OVERRIDES {
        headers.remove(name);
    }
    headers.remove(PROXY_AUTHORIZATION);
    // Sandboxes are untrusted: their own X-Forwarded-* claims are replaced, not extended.
    headers.insert(X_FORWARDED_FOR.clone(), peer_ip);
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
}

/// The client's request id when it is short, visible ASCII; otherwise a fresh one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= MAX_REQUEST_ID_LEN
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
        {
            return v.clone();
        }
    }
    new_request_id()
}

/// 32 random hex digits.
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    let id = uuid::Uuid::new_v4().simple().encode_lower(&mut buf);
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end"));
    }

    #[test]
    fn request_ids_are_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID.clone(), HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(X_REQUEST_ID.clone(), HeaderValue::from_static("a b"));
        assert_ne!(request_id(&h), "a b");
        assert_eq!(new_request_id().len(), 32);
    }
}
