//! Introspection and revalidation (SPEC §4 rows 6, 7, 8, 11 and §7 "Introspection",
//! "Revocation"), against the real gateway in front of the fake Relace upstream. The fake
//! records every request, so the number of `GET /v1/repo_token/<token>` calls it saw is
//! the number of introspections (and re-confirmations) the gateway made.
//!
//! The gateway gets its API key from `upstream.api_key_file` (a temp file), never from
//! the process environment: tests run in parallel threads of one process.

mod support;

use support::*;

use std::time::{Duration, Instant};

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

// ---------------------------------------------------------------------------------------
// helpers

/// Short enough for tests, long enough that a request round trip never crosses it by
/// accident.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
const REVALIDATE_AFTER: Duration = Duration::from_secs(1);
/// The bound for a deletion upstream to take effect: `revalidate_after` + 1 s.
const REVOCATION_BOUND: Duration = Duration::from_secs(2);
/// Margin added when a test waits out a TTL, so the gateway's clock has surely passed it.
const MARGIN: Duration = Duration::from_millis(250);
const WRONG_KEY: &str = "rlc-wrongaccountkey000000000000000000";

/// A gateway in front of a fresh fake, with an API key file and any extra settings.
struct Setup {
    fake: FakeRelace,
    gw: Gateway,
    _key: Option<tempfile::NamedTempFile>,
}

async fn setup_with(key: Option<&str>, settings: &[(&str, &str)]) -> Setup {
    let fake = FakeRelace::start().await;
    let (gw, key) = start_gateway(&fake.url(), key, settings).await;
    Setup {
        fake,
        gw,
        _key: key,
    }
}

async fn start_gateway(
    upstream_url: &str,
    key: Option<&str>,
    settings: &[(&str, &str)],
) -> (Gateway, Option<tempfile::NamedTempFile>) {
    let key = key.map(key_file);
    let mut builder = Gateway::builder(upstream_url)
        .set("scopes.negative_ttl", &toml_str("1s"))
        .set("scopes.revalidate_after", &toml_str("1s"));
    if let Some(file) = &key {
        let path = file.path().to_str().expect("utf-8 temp path");
        builder = builder.set("upstream.api_key_file", &toml_str(path));
    }
    for (k, v) in settings {
        builder = builder.set(k, v);
    }
    (builder.start().await, key)
}

/// The usual setup: introspection on ("auto" with the right key), 1 s TTLs.
async fn setup() -> Setup {
    setup_with(Some(ACCOUNT_KEY), &[]).await
}

/// Introspections of one particular token.
fn introspections_of(fake: &FakeRelace, token: &str) -> usize {
    let target = format!("/v1/repo_token/{token}");
    fake.token_lookups()
        .iter()
        .filter(|r| r.target == target)
        .count()
}

/// `GET /v1/repo/<repo>/file/src/main.rs` on the proxy with `token` as Bearer.
async fn get_file(gw: &Gateway, token: &str, repo: &str) -> RawResponse {
    call_with_auth(gw.proxy, "GET", &file_url(repo), &bearer(token)).await
}

/// A forwarded answer: the fake's echo of the request (so it really reached it).
#[track_caller]
fn assert_forwarded(resp: &RawResponse, repo: &str) {
    assert_eq!(
        resp.status,
        200,
        "expected a forwarded 200; got {}: {}",
        resp.status,
        body_text(resp)
    );
    assert_eq!(
        resp.json()["target"],
        file_url(repo),
        "the 200 must be the upstream's echo: {}",
        body_text(resp)
    );
}

async fn listed_entry(gw: &Gateway, token: &str) -> Option<Value> {
    let id = token_id(token);
    gw.listed().await.into_iter().find(|t| t["id"] == id)
}

/// Deletes `token` directly at the fake (the gateway is not told).
async fn delete_upstream(fake: &FakeRelace, token: &str) {
    let target = format!("/v1/repo_token/{token}");
    let r = call_with_auth(fake.addr(), "DELETE", &target, &bearer(ACCOUNT_KEY)).await;
    assert_eq!(r.status, 204, "delete at the fake: {}", body_text(&r));
    assert!(!fake.has_token(token));
}

/// Mints through the admin passthrough and returns the token and its `expires_at`.
async fn mint_with_expiry(gw: &Gateway, ttl_seconds: u64) -> (String, OffsetDateTime) {
    let answer = mint_at(gw.admin, "short-lived", &[REPO_A], Some(ttl_seconds)).await;
    let token = answer["token"].as_str().expect("token").to_owned();
    let expires_at =
        OffsetDateTime::parse(answer["expires_at"].as_str().expect("expires_at"), &Rfc3339)
            .expect("RFC 3339 expires_at");
    (token, expires_at)
}

/// Sleeps until `at` (wall clock) plus [`MARGIN`].
async fn sleep_past(at: OffsetDateTime) {
    let left = at - OffsetDateTime::now_utc();
    let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
    tokio::time::sleep(left + MARGIN).await;
}

/// Polls `/metrics` (bounded) until `name_and_labels` reaches `at_least`; returns the
/// last value seen. For counters bumped off the request path.
async fn metric_reaches(gw: &Gateway, name_and_labels: &str, at_least: f64) -> f64 {
    let mut value = 0.0;
    for _ in 0..100 {
        value = metric_value(&gw.metrics().await, name_and_labels);
        if value >= at_least {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    value
}

const LEARNED_INTROSPECTION: &str = "scopegate_tokens_learned_total{source=\"introspection\"}";
const REVOKED_INTROSPECTION: &str = "scopegate_tokens_revoked_total{source=\"introspection\"}";
const CACHE_HITS: &str = "scopegate_scope_lookups_total{result=\"hit\",tier=\"cache\"}";
const INTROSPECTION_HITS: &str =
    "scopegate_scope_lookups_total{result=\"hit\",tier=\"introspection\"}";
const INTROSPECTION_MISSES: &str =
    "scopegate_scope_lookups_total{result=\"miss\",tier=\"introspection\"}";
const INTROSPECTION_ERRORS: &str =
    "scopegate_scope_lookups_total{result=\"error\",tier=\"introspection\"}";

// ---------------------------------------------------------------------------------------
// learning by introspection

/// A token only the upstream knows is learned on first use with the gateway's own key,
/// then served from the cache: the fake sees exactly one introspection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_only_token_is_learned_once_and_served_from_cache() {
    let s = setup().await;
    let token = s.fake.mint("upstream-only", &[REPO_A], None);

    let first = get_file(&s.gw, &token, REPO_A).await;
    assert_forwarded(&first, REPO_A);
    let seen = s.fake.token_lookups();
    assert_eq!(seen.len(), 1, "one introspection on first use");
    assert_eq!(seen[0].target, format!("/v1/repo_token/{token}"));
    assert_eq!(
        seen[0].header_all("authorization"),
        vec![bearer(ACCOUNT_KEY)],
        "introspection must use the configured API key, not the sandbox's token"
    );
    // The introspection came before the forwarded request, which kept its own credential.
    let requests = s.fake.requests();
    assert!(
        requests[0].method == "GET" && requests[0].target.starts_with("/v1/repo_token/"),
        "introspect first, then forward"
    );
    assert_eq!(requests[1].target, file_url(REPO_A));
    assert_eq!(
        requests[1].header_all("authorization"),
        vec![bearer(&token)]
    );

    for i in 0..5 {
        let r = get_file(&s.gw, &token, REPO_A).await;
        assert_forwarded(&r, REPO_A);
        assert_eq!(
            s.fake.token_lookups().len(),
            1,
            "request {} after learning must be served from the cache",
            i + 2
        );
    }
    assert_eq!(s.fake.repo_requests(), 6);

    let entry = listed_entry(&s.gw, &token)
        .await
        .expect("the learned token is listed");
    assert_eq!(entry["source"], "introspection");
    assert_eq!(entry["name"], "upstream-only");
    assert_eq!(entry["repo_ids"], serde_json::json!([REPO_A]));
    assert_eq!(entry["expires_at"], Value::Null);
    assert!(
        !Value::from(s.gw.listed().await)
            .to_string()
            .contains(&token),
        "listings never carry the token"
    );

    // The learned scope is enforced locally: another repo is refused without asking.
    let before = s.fake.request_count();
    let r = get_file(&s.gw, &token, REPO_B).await;
    assert_refused(&r, 403, "repo_out_of_scope");
    assert_eq!(
        s.fake.request_count(),
        before,
        "an out-of-scope request reaches the upstream neither as introspection nor forward"
    );
}

/// `n` simultaneous `GET`s of `REPO_A`'s file with `token` as Bearer, each on its own
/// connection; the answers, in the order sent.
async fn simultaneous_gets(gw: &Gateway, token: &str, n: usize) -> Vec<RawResponse> {
    let auth = bearer(token);
    let target = file_url(REPO_A);
    let proxy = gw.proxy;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let auth = auth.clone();
            let target = target.clone();
            tokio::spawn(async move { call_with_auth(proxy, "GET", &target, &auth).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for task in tasks {
        answers.push(task.await.expect("request task"));
    }
    answers
}

/// 64 simultaneous first requests for one upstream-only token: one introspection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_make_one_introspection() {
    let s = setup().await;
    let token = s.fake.mint("busy", &[REPO_A], None);
    for r in simultaneous_gets(&s.gw, &token, 64).await {
        assert_forwarded(&r, REPO_A);
    }
    assert_eq!(
        introspections_of(&s.fake, &token),
        1,
        "concurrent misses for one token must make exactly one upstream call"
    );
    assert_eq!(s.fake.repo_requests(), 64);
}

/// 64 simultaneous requests with a token nobody knows: one introspection, 64 refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unknown_token_requests_make_one_introspection() {
    let s = setup().await;
    let token = new_token();
    for r in simultaneous_gets(&s.gw, &token, 64).await {
        assert_refused(&r, 401, "unknown_token");
    }
    assert_eq!(s.fake.token_lookups().len(), 1);
    assert_eq!(s.fake.repo_requests(), 0);
}

/// A token the upstream does not know is remembered as unknown for `negative_ttl`, then
/// asked about again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_token_is_introspected_once_per_negative_ttl() {
    let s = setup().await;
    let token = new_token();

    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_refused(&r, 401, "unknown_token");
    assert_eq!(introspections_of(&s.fake, &token), 1);
    for _ in 0..5 {
        let r = get_file(&s.gw, &token, REPO_A).await;
        assert_refused(&r, 401, "unknown_token");
    }
    assert_eq!(
        introspections_of(&s.fake, &token),
        1,
        "within negative_ttl the negative answer is served from the cache"
    );

    tokio::time::sleep(NEGATIVE_TTL + MARGIN).await;
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_refused(&r, 401, "unknown_token");
    assert_eq!(
        introspections_of(&s.fake, &token),
        2,
        "after negative_ttl the next request asks the upstream again"
    );
    for _ in 0..3 {
        let r = get_file(&s.gw, &token, REPO_A).await;
        assert_refused(&r, 401, "unknown_token");
    }
    assert_eq!(
        introspections_of(&s.fake, &token),
        2,
        "the renewed negative entry is cached again"
    );
    assert_eq!(s.fake.repo_requests(), 0);
    assert_eq!(
        metric_value(&s.gw.metrics().await, INTROSPECTION_MISSES),
        2.0
    );
}

/// A negative entry does not stand in the way of a later registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_replaces_a_negative_entry_at_once() {
    let s = setup().await;
    let token = new_token();
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_refused(&r, 401, "unknown_token");
    let r = s.gw.register(&token, &[REPO_A], None).await;
    assert_eq!(r.status, 201, "register: {}", body_text(&r));
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_forwarded(&r, REPO_A);
    assert_eq!(s.fake.token_lookups().len(), 1);
}

// ---------------------------------------------------------------------------------------
// introspection failures: fail closed, never cached

/// The upstream refuses the gateway's key (401): 503 `scope_unavailable`, retryable, and
/// not remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_failure_is_503_and_not_cached() {
    let s = setup_with(Some(WRONG_KEY), &[]).await;
    let token = s.fake.mint("real", &[REPO_A], None);

    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_refused(&r, 503, "scope_unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(introspections_of(&s.fake, &token), 1);
    assert_eq!(
        s.fake.token_lookups()[0].header_all("authorization"),
        vec![bearer(WRONG_KEY)],
        "the configured key (trimmed of its newline) is what was sent"
    );

    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_refused(&r, 503, "scope_unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        introspections_of(&s.fake, &token),
        2,
        "a failed introspection is not cached: the next request asks again"
    );
    assert_eq!(s.fake.repo_requests(), 0, "fail closed: nothing forwarded");
    let metrics = s.gw.metrics().await;
    assert_eq!(metric_value(&metrics, INTROSPECTION_ERRORS), 2.0);
    assert_eq!(metric_value(&metrics, LEARNED_INTROSPECTION), 0.0);
    assert!(listed_entry(&s.gw, &token).await.is_none());
}

/// The upstream is down while introspection is on: the scope cannot be decided, which is
/// 503 `scope_unavailable` (not the forwarding error 502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_transport_error_is_503_not_502() {
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        listener.local_addr().expect("addr")
    };
    let (gw, _key) = start_gateway(&format!("http://{closed}"), Some(ACCOUNT_KEY), &[]).await;
    let token = new_token();
    for _ in 0..2 {
        let r = get_file(&gw, &token, REPO_A).await;
        assert_refused(&r, 503, "scope_unavailable");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert_eq!(
        metric_value(&gw.metrics().await, INTROSPECTION_ERRORS),
        2.0,
        "each request tried (a transport error is not cached either)"
    );
}

// ---------------------------------------------------------------------------------------
// introspection switched off

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspect_false_never_asks_the_upstream() {
    let s = setup_with(Some(ACCOUNT_KEY), &[("scopes.introspect", "false")]).await;
    let token = s.fake.mint("upstream-only", &[REPO_A], None);
    for _ in 0..3 {
        let r = get_file(&s.gw, &token, REPO_A).await;
        assert_refused(&r, 401, "unknown_token");
    }
    let r = get_file(&s.gw, &new_token(), REPO_A).await;
    assert_refused(&r, 401, "unknown_token");
    assert_eq!(s.fake.request_count(), 0, "the upstream saw nothing at all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspect_auto_without_a_key_never_asks_the_upstream() {
    let s = setup_with(None, &[("scopes.introspect", &toml_str("auto"))]).await;
    let token = s.fake.mint("upstream-only", &[REPO_A], None);
    for _ in 0..3 {
        let r = get_file(&s.gw, &token, REPO_A).await;
        assert_refused(&r, 401, "unknown_token");
    }
    assert_eq!(s.fake.request_count(), 0, "the upstream saw nothing at all");
}

/// Without introspection nothing is revalidated either: a registered token stays
/// allowed past `revalidate_after`, with no upstream call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspect_false_does_not_revalidate() {
    let s = setup_with(Some(ACCOUNT_KEY), &[("scopes.introspect", "false")]).await;
    let token = s.gw.token_for(&[REPO_A]).await;
    tokio::time::sleep(REVALIDATE_AFTER + MARGIN).await;
    for _ in 0..3 {
        let r = get_file(&s.gw, &token, REPO_A).await;
        assert_forwarded(&r, REPO_A);
    }
    assert_eq!(s.fake.token_lookups().len(), 0);
}

// ---------------------------------------------------------------------------------------
// revalidation

/// Polls the proxy every ~100 ms (bounded) until `token` is refused; returns the refusal
/// and how long after `since` it came. Every answer before it must be a forward.
async fn poll_until_refused(gw: &Gateway, token: &str, since: Instant) -> (RawResponse, Duration) {
    for _ in 0..60 {
        let r = get_file(gw, token, REPO_A).await;
        if r.status != 200 {
            return (r, since.elapsed());
        }
        assert_forwarded(&r, REPO_A);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "token still allowed {:?} after its deletion upstream",
        since.elapsed()
    );
}

/// Deletes `token` at the fake and checks the gateway refuses it as revoked within
/// `revalidate_after` + 1 s, then keeps refusing it without asking again.
async fn assert_upstream_deletion_revokes(s: &Setup, token: &str, source: &str) {
    let r = get_file(&s.gw, token, REPO_A).await;
    assert_forwarded(&r, REPO_A);
    assert_eq!(
        listed_entry(&s.gw, token).await.expect("listed")["source"],
        source
    );

    delete_upstream(&s.fake, token).await;
    let deleted = Instant::now();
    let (refusal, after) = poll_until_refused(&s.gw, token, deleted).await;
    assert_refused(&refusal, 401, "token_revoked");
    assert!(
        after < REVOCATION_BOUND,
        "a {source} token deleted upstream was refused only after {after:?} \
         (bound: revalidate_after + 1 s = {REVOCATION_BOUND:?})"
    );

    // Revoked for good: no further forwards, no further introspection.
    let asked = introspections_of(&s.fake, token);
    let forwarded = s.fake.repo_requests();
    for _ in 0..3 {
        let r = get_file(&s.gw, token, REPO_A).await;
        assert_refused(&r, 401, "token_revoked");
    }
    assert_eq!(introspections_of(&s.fake, token), asked);
    assert_eq!(s.fake.repo_requests(), forwarded);
    assert!(
        listed_entry(&s.gw, token).await.is_none(),
        "a revoked token is no longer listed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_token_deleted_upstream_is_revoked_within_revalidate_after() {
    let s = setup().await;
    let token = s.gw.mint("minted", &[REPO_A], None).await;
    assert_upstream_deletion_revokes(&s, &token, "mint").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_token_deleted_upstream_is_revoked_within_revalidate_after() {
    let s = setup().await;
    let token = s.fake.mint("registered", &[REPO_A], None);
    let r = s.gw.register(&token, &[REPO_A], None).await;
    assert_eq!(r.status, 201, "register: {}", body_text(&r));
    assert_upstream_deletion_revokes(&s, &token, "admin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspected_token_deleted_upstream_is_revoked_within_revalidate_after() {
    let s = setup().await;
    let token = s.fake.mint("learned", &[REPO_A], None);
    assert_upstream_deletion_revokes(&s, &token, "introspection").await;
}

/// The bound holds for a token nobody used meanwhile too: a request made more than
/// `revalidate_after` + 1 s after the deletion must be refused, not served from a
/// confirmation older than `revalidate_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_token_deleted_upstream_is_refused_on_next_use() {
    let s = setup().await;
    let token = s.gw.mint("idle", &[REPO_A], None).await;
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_forwarded(&r, REPO_A);
    delete_upstream(&s.fake, &token).await;
    tokio::time::sleep(REVOCATION_BOUND + MARGIN).await;
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_refused(&r, 401, "token_revoked");
}

/// A live token is re-confirmed about once per `revalidate_after` while in use, not
/// once per request, and re-confirmation keeps the entry's source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tokens_are_reconfirmed_once_per_period_keeping_their_source() {
    let s = setup().await;
    let registered = s.fake.mint("registered", &[REPO_A], None);
    let r = s.gw.register(&registered, &[REPO_A], None).await;
    assert_eq!(r.status, 201, "register: {}", body_text(&r));
    let minted = s.gw.mint("minted", &[REPO_A], None).await;

    let started = Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        for token in [&registered, &minted] {
            let r = get_file(&s.gw, token, REPO_A).await;
            assert_forwarded(&r, REPO_A);
            requests += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(requests >= 20, "only {requests} requests in 2.5 s");
    for (token, source) in [(&registered, "admin"), (&minted, "mint")] {
        let n = introspections_of(&s.fake, token);
        assert!(
            (1..=3).contains(&n),
            "a {source} token used for 2.5 s with revalidate_after = 1 s should be \
             re-confirmed 1..=3 times, was {n} times"
        );
        assert_eq!(
            listed_entry(&s.gw, token).await.expect("still listed")["source"],
            source,
            "re-confirmation must not change where the entry came from"
        );
    }
    let metrics = s.gw.metrics().await;
    assert_eq!(metric_value(&metrics, REVOKED_INTROSPECTION), 0.0);
    assert_eq!(
        metric_value(&metrics, LEARNED_INTROSPECTION),
        0.0,
        "re-confirming a known token is not learning it"
    );
}

/// A re-confirmation that fails (the upstream refuses the gateway's key) keeps the entry
/// and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidation_error_keeps_the_entry_and_is_counted() {
    let s = setup_with(Some(WRONG_KEY), &[]).await;
    let token = s.gw.token_for(&[REPO_A]).await;
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_forwarded(&r, REPO_A);
    assert_eq!(s.fake.token_lookups().len(), 0, "fresh: no re-confirmation");

    tokio::time::sleep(REVALIDATE_AFTER + MARGIN).await;
    let before = s.fake.request_count();
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_forwarded(&r, REPO_A);
    // The forward, plus the re-confirmation it set off.
    assert!(
        s.fake
            .wait_for_requests(before + 2, Duration::from_secs(5))
            .await,
        "a stale entry in use must be re-confirmed"
    );
    assert!(
        metric_reaches(&s.gw, INTROSPECTION_ERRORS, 1.0).await >= 1.0,
        "the failed re-confirmation is counted as {INTROSPECTION_ERRORS}"
    );
    assert!(introspections_of(&s.fake, &token) >= 1);

    for _ in 0..5 {
        let r = get_file(&s.gw, &token, REPO_A).await;
        assert_forwarded(&r, REPO_A);
    }
    assert_eq!(
        listed_entry(&s.gw, &token).await.expect("kept")["source"],
        "admin"
    );
    assert_eq!(
        metric_value(
            &s.gw.metrics().await,
            "scopegate_tokens_revoked_total{source=\"admin\"}"
        ),
        0.0
    );
    assert_eq!(
        metric_value(&s.gw.metrics().await, REVOKED_INTROSPECTION),
        0.0
    );
}

/// A revocation through the admin API is not undone by introspection or re-confirmation,
/// even though the upstream still knows the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_revocation_is_not_undone_by_introspection() {
    let s = setup().await;
    let token = s.fake.mint("learned", &[REPO_A], None);
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_forwarded(&r, REPO_A);
    let target = format!("/admin/tokens/{}", token_id(&token));
    let r = call_with_auth(s.gw.admin, "DELETE", &target, &bearer(ADMIN_TOKEN)).await;
    assert_eq!(r.status, 204, "admin revoke: {}", body_text(&r));
    let asked = s.fake.token_lookups().len();
    for _ in 0..3 {
        let r = get_file(&s.gw, &token, REPO_A).await;
        assert_refused(&r, 401, "token_revoked");
    }
    tokio::time::sleep(REVALIDATE_AFTER + MARGIN).await;
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_refused(&r, 401, "token_revoked");
    assert_eq!(
        s.fake.token_lookups().len(),
        asked,
        "a revoked token is not introspected again"
    );
}

// ---------------------------------------------------------------------------------------
// expiry

/// A token minted through the gateway with a TTL is allowed at once and refused as
/// expired once its `expires_at` has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_token_with_ttl_is_refused_once_expired() {
    // Default revalidate_after (60 s): the expiry alone must refuse it.
    let s = setup_with(
        Some(ACCOUNT_KEY),
        &[("scopes.revalidate_after", &toml_str("60s"))],
    )
    .await;
    // The fake truncates `now` to whole seconds, so ttl 2 expires 1..2 s from now.
    let (token, expires_at) = mint_with_expiry(&s.gw, 2).await;
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_forwarded(&r, REPO_A);
    assert_eq!(
        listed_entry(&s.gw, &token).await.expect("listed")["expires_at"],
        expires_at.format(&Rfc3339).expect("format")
    );

    sleep_past(expires_at).await;
    let forwarded = s.fake.repo_requests();
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_refused(&r, 401, "token_expired");
    assert_eq!(s.fake.repo_requests(), forwarded);
    assert_eq!(
        s.fake.token_lookups().len(),
        0,
        "a minted token is never introspected"
    );
}

/// An expired token stays `token_expired` with revalidation on: asking the upstream
/// about it (which answers 404 for expired tokens) must not turn it into a revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_not_revalidated_into_a_revocation() {
    let s = setup().await; // revalidate_after = 1 s
    let (token, expires_at) = mint_with_expiry(&s.gw, 2).await;
    assert_forwarded(&get_file(&s.gw, &token, REPO_A).await, REPO_A);
    sleep_past(expires_at).await;
    for _ in 0..3 {
        assert_refused(&get_file(&s.gw, &token, REPO_A).await, 401, "token_expired");
    }
    assert_eq!(
        introspections_of(&s.fake, &token),
        0,
        "expired tokens are not re-confirmed"
    );
    let metrics = s.gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "scopegate_tokens_revoked_total{source=\"introspection\"}"
        ),
        0.0
    );
}

/// A token learned by introspection carries the upstream's `expires_at` and is refused
/// once it has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspected_token_with_expiry_is_refused_once_expired() {
    let s = setup_with(
        Some(ACCOUNT_KEY),
        &[("scopes.revalidate_after", &toml_str("60s"))],
    )
    .await;
    let token = s.fake.mint("short-lived", &[REPO_A], Some(2));
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_forwarded(&r, REPO_A);
    let entry = listed_entry(&s.gw, &token).await.expect("listed");
    assert_eq!(entry["source"], "introspection");
    let expires_at = OffsetDateTime::parse(
        entry["expires_at"].as_str().expect("expires_at learned"),
        &Rfc3339,
    )
    .expect("RFC 3339");

    sleep_past(expires_at).await;
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_refused(&r, 401, "token_expired");
    assert_eq!(s.fake.token_lookups().len(), 1);
}

// ---------------------------------------------------------------------------------------
// metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_learning_revocation_and_cache_hits() {
    let s = setup().await;
    let metrics = s.gw.metrics().await;
    assert!(
        metrics.contains(CACHE_HITS),
        "label order as rendered: {CACHE_HITS} missing from\n{metrics}"
    );
    assert_eq!(metric_value(&metrics, LEARNED_INTROSPECTION), 0.0);

    let token = s.fake.mint("metered", &[REPO_A], None);
    let r = get_file(&s.gw, &token, REPO_A).await;
    assert_forwarded(&r, REPO_A);
    let metrics = s.gw.metrics().await;
    assert_eq!(metric_value(&metrics, LEARNED_INTROSPECTION), 1.0);
    assert_eq!(metric_value(&metrics, INTROSPECTION_HITS), 1.0);
    assert_eq!(
        metric_value(&metrics, "scopegate_tokens_learned_total{source=\"admin\"}"),
        0.0
    );
    assert_eq!(metric_value(&metrics, "scopegate_scope_entries"), 1.0);
    let hits = metric_value(&metrics, CACHE_HITS);

    for _ in 0..5 {
        let r = get_file(&s.gw, &token, REPO_A).await;
        assert_forwarded(&r, REPO_A);
    }
    let metrics = s.gw.metrics().await;
    assert_eq!(
        metric_value(&metrics, CACHE_HITS),
        hits + 5.0,
        "each cached request is one cache hit"
    );
    assert_eq!(
        metric_value(&metrics, LEARNED_INTROSPECTION),
        1.0,
        "learned once, not per request"
    );

    delete_upstream(&s.fake, &token).await;
    let (refusal, _) = poll_until_refused(&s.gw, &token, Instant::now()).await;
    assert_refused(&refusal, 401, "token_revoked");
    let metrics = s.gw.metrics().await;
    assert_eq!(metric_value(&metrics, REVOKED_INTROSPECTION), 1.0);
    assert_eq!(metric_value(&metrics, INTROSPECTION_MISSES), 1.0);
    assert_eq!(metric_value(&metrics, "scopegate_scope_entries"), 0.0);
    assert_eq!(proxy_decisions(&metrics, "token_revoked"), 1.0);
}
