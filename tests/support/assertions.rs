//! Assertions on the gateway's own answers, shared by the test files.
#![allow(dead_code)]

use serde_json::Value;

use super::raw::{body_text, RawResponse};

/// A refusal (or any other answer the gateway makes itself: `upstream_unavailable`,
/// `upstream_timeout`, …) exactly as SPEC §4 describes it: `status`, a JSON body with
/// `code`, a non-empty `error` and the `request_id` of the `x-request-id` header,
/// `Cache-Control: no-store`, and `x-should-retry: false` on a 4xx other than 429 and on
/// nothing else.
#[track_caller]
pub fn assert_refused(resp: &RawResponse, status: u16, code: &str) {
    let text = body_text(resp);
    assert_eq!(
        resp.status, status,
        "status (expected {code}); body: {text}"
    );
    assert_eq!(
        resp.header("content-type"),
        Some("application/json"),
        "{code}: Content-Type"
    );
    assert_eq!(
        resp.header("cache-control"),
        Some("no-store"),
        "{code}: Cache-Control"
    );
    let rid = resp
        .header("x-request-id")
        .unwrap_or_else(|| panic!("{code}: no x-request-id header"));
    assert!(!rid.is_empty(), "{code}: empty x-request-id");
    let body: Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("{code}: body is not JSON ({e}): {text}"));
    assert_eq!(body["code"], code, "code; body: {text}");
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{code}: no error: {text}"));
    assert!(!error.trim().is_empty(), "{code}: empty error message");
    assert_eq!(
        body["request_id"], rid,
        "{code}: request_id vs x-request-id"
    );
    if (400..500).contains(&status) && status != 429 {
        assert_eq!(
            resp.header("x-should-retry"),
            Some("false"),
            "{code}: x-should-retry on a 4xx refusal"
        );
    } else {
        assert_eq!(
            resp.header("x-should-retry"),
            None,
            "{code}: x-should-retry must stay absent on {status} (it stays retryable)"
        );
    }
}
