//! Property tests of the path parser against the readings an upstream could apply.
//!
//! For any generated request path, either scopegate refuses it, or the repo id it
//! authorizes is exactly the repo id that each strict reading yields: RFC 3986 dot-segment
//! removal (§5.2.4) on the percent-decoded path (what a framework like the upstream's
//! Starlette does), and the same on the raw path (what a router that does not decode
//! does). A path that any reading sends to a different repo, or out of `/v1/repo/<id>`,
//! must not be authorized for the first repo.

use proptest::prelude::*;
use scopegate::request::parse_raw_path;
use uuid::Uuid;

#[path = "support/readings.rs"]
mod readings;
use readings::{decode, remove_dot_segments};

const A: &str = "3f2c9a1e-7b4d-4e8a-9c6f-1a2b3c4d5e6f";
const B: &str = "8e1d2c3b-4a59-4f6e-8d7c-6b5a49382716";

/// The repo a reading routes to: `Some(Some(id))` for `/v1/repo/<id>[.git]…`,
/// `Some(None)` for any other route.
fn routed_repo(path: &str) -> Option<Uuid> {
    let mut segments = path.split('/');
    if segments.next() != Some("")
        || segments.next() != Some("v1")
        || segments.next() != Some("repo")
    {
        return None;
    }
    let id = segments.next()?;
    let id = id.strip_suffix(".git").unwrap_or(id);
    if id.len() != 36 {
        return None;
    }
    Uuid::try_parse(id).ok()
}

fn piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/", "//", "v1", "V1", "repo", "Repo", A, B, ".git", "..", ".", "%2e", "%2E", "%2e%2e",
        ".%2e", "%2F", "%2f", "%252e", "%252F", "%5C", "\\", "%00", "%0a", ";", "%3B", "file",
        "src", "main.rs", "x", "%20", "%", "%zz", "%c0%ae", "%ff", "A", "info", "refs",
    ])
}

fn target() -> impl Strategy<Value = String> {
    let prefix = prop::sample::select(vec![
        format!("/v1/repo/{A}/"),
        format!("/v1/repo/{A}.git/"),
        format!("/v1/repo/{A}"),
        "/v1/repo/".to_owned(),
        "/v1/".to_owned(),
        "/".to_owned(),
    ]);
    (prefix, prop::collection::vec(piece(), 0..10)).prop_map(|(p, pieces)| {
        let mut s = p;
        for piece in pieces {
            s.push_str(piece);
        }
        s
    })
}

/// Cases per property: 20,000 in the test suite; `SCOPEGATE_FUZZ_CASES` turns this into
/// a long fuzzing run (see the README).
fn cases() -> u32 {
    std::env::var("SCOPEGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn an_authorized_repo_is_the_repo_every_strict_reading_routes_to(path in target()) {
        // Only a parse that yields a repo id can authorize anything.
        if let Ok(parsed) = parse_raw_path(&path) {
            if let Some(authorized) = parsed.repo_id {
                let decoded_reading = routed_repo(&remove_dot_segments(&decode(&path)));
                let raw_reading = routed_repo(&remove_dot_segments(&path));
                prop_assert_eq!(decoded_reading, Some(authorized), "decoded reading of {:?}", path);
                prop_assert_eq!(raw_reading, Some(authorized), "raw reading of {:?}", path);
            }
        }
    }

    #[test]
    fn the_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let s = String::from_utf8_lossy(&bytes);
        let _ = parse_raw_path(&s);
    }
}

#[test]
fn the_oracle_itself_catches_traversal() {
    // Sanity: the readings see through the spellings the parser must refuse.
    assert_eq!(
        routed_repo(&remove_dot_segments(&decode(&format!(
            "/v1/repo/{A}/%2e%2e/{B}/file"
        )))),
        Uuid::try_parse(B).ok()
    );
    assert_eq!(
        routed_repo(&remove_dot_segments(&format!("/v1/repo/{A}/../{B}/x"))),
        Uuid::try_parse(B).ok()
    );
    assert!(parse_raw_path(&format!("/v1/repo/{A}/%2e%2e/{B}/file")).is_err());
}
