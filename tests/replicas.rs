//! Several replicas sharing one Redis (SPEC §3, §7; issue "Many replicas").
//!
//! Everything here is real: `redis-server` processes on free loopback ports (installed by
//! `scripts/test`), scopegate replicas as separate processes of the release-under-test
//! binary, and the fake Relace upstream that records every request, so "no introspection"
//! and "nothing reached the upstream" are read from what it received.

mod support;

use std::time::{Duration, Instant};

use support::redis::{command_at, Monitor, Persistence, RedisServer};
use support::*;

const REPO_A: &str = "3f2c9a1e-7b4d-4e8a-9c6f-1a2b3c4d5e6f";
const REPO_B: &str = "8e1d2c3b-4a59-4f6e-8d7c-6b5a49382716";

/// A replica's config: the Redis store at `redis`, optional API key (introspection).
fn replica_config(
    fake: &FakeRelace,
    redis: &RedisServer,
    extra: &[(&str, &str)],
) -> GatewayBuilder {
    let mut builder = Gateway::builder(&fake.url())
        .set("scopes.store", &toml_str("redis"))
        .set("scopes.redis_url", &toml_str(&redis.url()))
        .set("scopes.introspect", "false");
    for (k, v) in extra {
        builder = builder.set(k, v);
    }
    builder
}

/// A replica config with introspection on (the API key in a file kept by the caller).
fn introspecting_config(
    fake: &FakeRelace,
    redis: &RedisServer,
) -> (GatewayBuilder, tempfile::NamedTempFile) {
    let key = key_file(ACCOUNT_KEY);
    let path = toml_str(key.path().to_str().expect("utf-8 temp path"));
    let builder = replica_config(
        fake,
        redis,
        &[
            ("upstream.api_key_file", &path),
            ("scopes.introspect", "true"),
        ],
    );
    (builder, key)
}

/// `DELETE /admin/tokens/<token or id>` with the admin token.
async fn delete_token(admin: std::net::SocketAddr, token_or_id: &str) -> RawResponse {
    call_with_auth(
        admin,
        "DELETE",
        &format!("/admin/tokens/{token_or_id}"),
        &bearer(ADMIN_TOKEN),
    )
    .await
}

/// Polls the proxy at `proxy` until `token` is refused (401) or `within` passes.
async fn refused_within(proxy: std::net::SocketAddr, token: &str, within: Duration) -> bool {
    wait_for(within, || async {
        get_file(proxy, token, REPO_A).await.status == 401
    })
    .await
}

/// Starts `n` replicas and waits (bounded) until each says it is ready.
async fn replicas(builder: &GatewayBuilder, n: usize) -> Vec<GatewayProcess> {
    let all: Vec<GatewayProcess> = (0..n).map(|_| GatewayProcess::spawn(builder)).collect();
    for r in &all {
        assert!(
            wait_for(Duration::from_secs(10), || async {
                call(r.admin, "GET", "/readyz", &[], b"").await.status == 200
            })
            .await,
            "replica not ready; logs:\n{}",
            r.logs()
        );
    }
    all
}

/// Polls `check` until it holds or `within` passes; true if it held.
async fn wait_for<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn get_file(proxy: std::net::SocketAddr, token: &str, repo: &str) -> RawResponse {
    call_with_auth(proxy, "GET", &file_url(repo), &bearer(token)).await
}

/// Waits (bounded) until the replica reports its change subscription up.
async fn subscribed(r: &GatewayProcess) -> bool {
    wait_for(Duration::from_secs(10), || async {
        metric_value(&metrics_of(r).await, "scopegate_fanout_subscribed") == 1.0
    })
    .await
}

async fn readyz(r: &GatewayProcess) -> u16 {
    call(r.admin, "GET", "/readyz", &[], b"").await.status
}

async fn metrics_of(r: &GatewayProcess) -> String {
    body_text(&call(r.admin, "GET", "/metrics", &[], b"").await)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_minted_on_one_replica_works_on_the_others_at_the_first_request() {
    let fake = FakeRelace::start().await;
    let redis = RedisServer::start(Persistence::None);
    let (builder, _key) = introspecting_config(&fake, &redis);
    let r = replicas(&builder, 3).await;

    let token = mint_at(r[0].admin, "sandbox-1", &[REPO_A], Some(600)).await["token"]
        .as_str()
        .expect("token")
        .to_owned();
    for replica in &r[1..] {
        let resp = get_file(replica.proxy, &token, REPO_A).await;
        assert_eq!(resp.status, 200, "{}", body_text(&resp));
        assert_refused(
            &get_file(replica.proxy, &token, REPO_B).await,
            403,
            "repo_out_of_scope",
        );
    }
    assert_eq!(
        fake.token_lookups().len(),
        0,
        "the other replicas read the minted scope from Redis, not the upstream"
    );
    // One table: another replica lists it (by id) and can revoke it for all.
    let id = token_id(&token);
    let listed = listing_at(r[2].admin).await;
    assert!(
        listed["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .any(|t| t["id"] == id.as_str()),
        "{listed}"
    );
    let deleted = delete_token(r[2].admin, &id).await;
    assert_eq!(deleted.status, 204, "{}", body_text(&deleted));
    assert!(refused_within(r[1].proxy, &token, Duration::from_secs(1)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_replica_within_100ms_p99_over_200_revocations() {
    let fake = FakeRelace::start().await;
    let redis = RedisServer::start(Persistence::None);
    let r = replicas(&replica_config(&fake, &redis, &[]), 3).await;
    let (origin, others) = (&r[0], &r[1..]);

    let mut lags = Vec::new();
    for _ in 0..200 {
        let token = new_token();
        let registered = register_at(
            origin.admin,
            &serde_json::json!({"token": token, "name": "fanout", "repo_ids": [REPO_A]}),
        )
        .await;
        assert_eq!(registered.status, 201, "{}", body_text(&registered));
        // Cached on every replica first: the revocation must displace a cached allow.
        for replica in others {
            assert_eq!(get_file(replica.proxy, &token, REPO_A).await.status, 200);
        }
        let revoked = delete_token(origin.admin, &token).await;
        assert_eq!(revoked.status, 204, "{}", body_text(&revoked));
        let answered = Instant::now();
        let polls = others.iter().map(|replica| {
            let token = token.clone();
            async move {
                let deadline = answered + Duration::from_secs(5);
                loop {
                    let resp = get_file(replica.proxy, &token, REPO_A).await;
                    if resp.status == 401 {
                        assert_refused(&resp, 401, "token_revoked");
                        return answered.elapsed();
                    }
                    assert_eq!(resp.status, 200);
                    assert!(
                        Instant::now() < deadline,
                        "revocation never reached a replica"
                    );
                }
            }
        });
        lags.extend(futures_util::future::join_all(polls).await);
    }
    lags.sort();
    let (p50, p99, max) = (
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags[lags.len() - 1],
    );
    eprintln!(
        "fan-out over {} replica-revocations: p50 {:?}, p99 {:?}, max {:?}",
        lags.len(),
        p50,
        p99,
        max
    );
    assert!(
        p99 <= Duration::from_millis(100),
        "p99 {p99:?} (p50 {p50:?}, max {max:?})"
    );
    let metrics = metrics_of(&others[0]).await;
    assert!(
        metric_value(&metrics, "scopegate_fanout_lag_seconds_count") >= 200.0,
        "the receiving replica counts the changes it applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_everywhere_and_expires_in_redis_at_its_time() {
    let fake = FakeRelace::start().await;
    let redis = RedisServer::start(Persistence::None);
    let r = replicas(&replica_config(&fake, &redis, &[]), 3).await;
    let token = new_token();
    let expires_at = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let expires_text = expires_at
        .format(&time::format_description::well_known::Rfc3339)
        .expect("rfc3339");
    let registered = register_at(
        r[0].admin,
        &serde_json::json!({"token": token, "name": "short", "repo_ids": [REPO_A], "expires_at": expires_text}),
    )
    .await;
    assert_eq!(registered.status, 201, "{}", body_text(&registered));
    for replica in &r {
        assert_eq!(get_file(replica.proxy, &token, REPO_A).await.status, 200);
    }
    // Redis holds the scope under the digest, expiring at the token's expiry.
    let key = format!("scopegate:{{{}}}:s", sha_hex(token.as_bytes()));
    let expire_ms = command_at(redis.addr(), &["PEXPIRETIME", &key]).expect("redis answers");
    let expected_ms = expires_at.unix_timestamp_nanos() / 1_000_000;
    let got_ms: i128 = expire_ms
        .trim()
        .trim_start_matches(':')
        .parse()
        .expect("integer reply");
    assert!(
        (got_ms - expected_ms).abs() <= 1,
        "PEXPIRETIME {got_ms} vs expires_at {expected_ms}"
    );

    let until = expires_at + time::Duration::milliseconds(100);
    let wait = (until - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(wait.whole_milliseconds() as u64)).await;
    for replica in &r {
        assert_refused(
            &get_file(replica.proxy, &token, REPO_A).await,
            401,
            "token_expired",
        );
    }
    // A replica that never saw it: Redis dropped the scope, so it is unknown there.
    let late = GatewayProcess::spawn(&replica_config(&fake, &redis, &[]));
    assert!(
        wait_for(Duration::from_secs(10), || async {
            readyz(&late).await == 200
        })
        .await
    );
    assert_refused(
        &get_file(late.proxy, &token, REPO_A).await,
        401,
        "unknown_token",
    );
    assert_eq!(
        command_at(redis.addr(), &["EXISTS", &key]).as_deref(),
        Some(":0\r\n")
    );
    assert_eq!(
        fake.repo_requests(),
        3,
        "only the three allowed requests went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_cached_tokens_serve_for_max_staleness_and_everything_recovers() {
    let fake = FakeRelace::start().await;
    let mut redis = RedisServer::start(Persistence::AofAlways);
    let r = replicas(
        &replica_config(&fake, &redis, &[("scopes.max_staleness", &toml_str("3s"))]),
        2,
    )
    .await;
    let cached = r[0].admin;
    let token = new_token();
    let registered = register_at(
        cached,
        &serde_json::json!({"token": token, "name": "cached", "repo_ids": [REPO_A]}),
    )
    .await;
    assert_eq!(registered.status, 201);
    assert_eq!(get_file(r[1].proxy, &token, REPO_A).await.status, 200);

    redis.kill9();
    let down = Instant::now();
    let ready_deadline = down + Duration::from_secs(5);
    // Cached on replica 2: keeps working within max_staleness.
    assert_eq!(get_file(r[1].proxy, &token, REPO_A).await.status, 200);
    // Never seen by replica 2: 503 at once, nothing upstream.
    let before = fake.repo_requests();
    let unknown = get_file(r[1].proxy, &new_token(), REPO_A).await;
    assert_refused(&unknown, 503, "scope_unavailable");
    assert_eq!(fake.repo_requests(), before);
    // Readiness drops within 5 s of the kill.
    let left = ready_deadline.saturating_duration_since(Instant::now());
    assert!(
        wait_for(left, || async { readyz(&r[1]).await == 503 }).await,
        "/readyz still 200 5 s after Redis went away"
    );
    let m = metrics_of(&r[1]).await;
    assert_eq!(metric_value(&m, "scopegate_store_up"), 0.0);
    assert_eq!(metric_value(&m, "scopegate_fanout_subscribed"), 0.0);
    assert!(metric_value(&m, "scopegate_store_errors_total") >= 1.0);
    // Past max_staleness the cached token fails closed.
    assert!(
        wait_for(Duration::from_secs(8), || async {
            get_file(r[1].proxy, &token, REPO_A).await.status == 503
        })
        .await,
        "cached token still served long after max_staleness"
    );
    let refused_after = down.elapsed();
    assert!(
        refused_after >= Duration::from_millis(2500),
        "refused after {refused_after:?}, before max_staleness (3 s) ran out"
    );
    assert_refused(
        &get_file(r[1].proxy, &token, REPO_A).await,
        503,
        "scope_unavailable",
    );

    redis.restart();
    let back = Instant::now();
    for replica in &r {
        let left = (back + Duration::from_secs(10)).saturating_duration_since(Instant::now());
        assert!(
            wait_for(left, || async { readyz(replica).await == 200 }).await,
            "/readyz not back within 10 s of Redis returning"
        );
    }
    eprintln!("readiness back {:?} after Redis returned", back.elapsed());
    assert_eq!(get_file(r[1].proxy, &token, REPO_A).await.status, 200);
    assert_eq!(get_file(r[0].proxy, &token, REPO_A).await.status, 200);
    let m = metrics_of(&r[1]).await;
    assert_eq!(metric_value(&m, "scopegate_store_up"), 1.0);
    assert!(
        wait_for(Duration::from_secs(5), || async {
            metric_value(&metrics_of(&r[1]).await, "scopegate_fanout_subscribed") == 1.0
        })
        .await
    );
    // Fan-out works again after the reconnection.
    let revoked = delete_token(cached, &token).await;
    assert_eq!(revoked.status, 204);
    assert!(refused_within(r[1].proxy, &token, Duration::from_secs(1)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_message_does_not_leave_a_stale_allow() {
    let fake = FakeRelace::start().await;
    let redis = RedisServer::start(Persistence::None);
    let r = replicas(&replica_config(&fake, &redis, &[]), 2).await;
    for replica in &r {
        assert!(subscribed(replica).await, "no subscription");
    }
    let token = new_token();
    let body = serde_json::json!({"token": token, "name": "x", "repo_ids": [REPO_A]});
    assert_eq!(register_at(r[0].admin, &body).await.status, 201);
    // Cached on replica 2 while its subscription is trusted.
    assert_eq!(get_file(r[1].proxy, &token, REPO_A).await.status, 200);
    let heard = metric_value(
        &metrics_of(&r[1]).await,
        "scopegate_fanout_lag_seconds_count",
    );
    // Cut every subscription, then revoke while they are down: the message is lost.
    let killed = command_at(redis.addr(), &["CLIENT", "KILL", "TYPE", "pubsub"]).expect("redis");
    assert!(
        killed.starts_with(':') && killed != ":0\r\n",
        "no subscriber to cut: {killed}"
    );
    let revoked = delete_token(r[0].admin, &token).await;
    assert_eq!(revoked.status, 204);
    assert!(
        refused_within(r[1].proxy, &token, Duration::from_millis(500)).await,
        "replica 2 kept serving a token revoked while its subscription was down"
    );
    assert_refused(
        &get_file(r[1].proxy, &token, REPO_A).await,
        401,
        "token_revoked",
    );
    assert_eq!(
        metric_value(
            &metrics_of(&r[1]).await,
            "scopegate_fanout_lag_seconds_count"
        ),
        heard,
        "replica 2 did hear the revocation, so this test did not miss a message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_aof_a_kill_9_of_redis_loses_no_acknowledged_token() {
    let fake = FakeRelace::start().await;
    let mut redis = RedisServer::start(Persistence::AofAlways);
    let builder = replica_config(&fake, &redis, &[]);
    let first = replicas(&builder, 1).await;
    let mut tokens = Vec::new();
    for i in 0..50 {
        let token = new_token();
        let body =
            serde_json::json!({"token": token, "name": format!("t{i}"), "repo_ids": [REPO_A]});
        let r = register_at(first[0].admin, &body).await;
        assert_eq!(r.status, 201, "{}", body_text(&r));
        tokens.push(token);
    }
    let revoked = delete_token(first[0].admin, &tokens[0]).await;
    assert_eq!(revoked.status, 204);
    redis.kill9();
    redis.restart();
    // A fresh replica has nothing cached: everything it knows comes from the AOF.
    let fresh = replicas(&builder, 1).await;
    assert_refused(
        &get_file(fresh[0].proxy, &tokens[0], REPO_A).await,
        401,
        "token_revoked",
    );
    for token in &tokens[1..] {
        let resp = get_file(fresh[0].proxy, token, REPO_A).await;
        assert_eq!(
            resp.status,
            200,
            "an acknowledged token was lost: {}",
            body_text(&resp)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_on_several_replicas_make_few_introspections_and_share_the_answer() {
    let fake = FakeRelace::start().await;
    let redis = RedisServer::start(Persistence::None);
    let (builder, _key) = introspecting_config(&fake, &redis);
    let r = replicas(&builder, 3).await;
    // Minted at the upstream directly: no replica has heard of it.
    let token = fake.mint("elsewhere", &[REPO_A], Some(600));
    let requests = r.iter().flat_map(|replica| {
        let token = token.clone();
        (0..10).map(move |_| {
            let token = token.clone();
            async move { get_file(replica.proxy, &token, REPO_A).await.status }
        })
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let calls = fake.token_lookups().len();
    assert_eq!(calls, 1, "introspections for one token over 3 replicas");
    // An unknown token: the 404 is shared too.
    let stranger = new_token();
    let unknown = futures_util::future::join_all(
        r.iter()
            .map(|replica| get_file(replica.proxy, &stranger, REPO_A)),
    )
    .await;
    for resp in &unknown {
        assert_refused(resp, 401, "unknown_token");
    }
    assert_eq!(
        fake.token_lookups().len() - calls,
        1,
        "the 404 is shared too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_stored_in_or_sent_to_redis_contains_a_plaintext_token() {
    let fake = FakeRelace::start().await;
    let redis = RedisServer::start(Persistence::AofAlways);
    let monitor = Monitor::start(redis.addr());
    let (builder, _key) = introspecting_config(&fake, &redis);
    let r = replicas(&builder, 2).await;
    let minted = mint_at(r[0].admin, "m", &[REPO_A], Some(600)).await["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let registered = new_token();
    let body = serde_json::json!({"token": registered, "name": "r", "repo_ids": [REPO_A]});
    assert_eq!(register_at(r[0].admin, &body).await.status, 201);
    let introspected = fake.mint("i", &[REPO_A], Some(600));
    let unknown = new_token();
    for token in [&minted, &registered, &introspected] {
        assert_eq!(get_file(r[1].proxy, token, REPO_A).await.status, 200);
    }
    assert_refused(
        &get_file(r[1].proxy, &unknown, REPO_A).await,
        401,
        "unknown_token",
    );
    let revoked = delete_token(r[0].admin, &registered).await;
    assert_eq!(revoked.status, 204);

    let seen = monitor.stop();
    let stored = redis.files_bytes();
    let keys = command_at(redis.addr(), &["KEYS", "*"]).expect("redis");
    for token in [&minted, &registered, &introspected, &unknown] {
        for (what, haystack) in [("commands", &seen), ("files", &stored)] {
            assert!(
                support::raw::find(haystack, token.as_bytes()).is_none(),
                "a plaintext token in Redis {what}"
            );
        }
        assert!(!keys.contains(token.as_str()));
    }
    // The digests are what Redis holds.
    let digest = sha_hex(minted.as_bytes());
    assert!(
        support::raw::find(&seen, digest.as_bytes()).is_some(),
        "monitor saw no traffic?"
    );
    assert!(keys.contains(&digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_before_redis_is_unready_then_serves_once_redis_answers() {
    let fake = FakeRelace::start().await;
    let mut redis = RedisServer::start(Persistence::None);
    redis.kill9();
    let replica = GatewayProcess::spawn(&replica_config(&fake, &redis, &[]));
    assert_eq!(readyz(&replica).await, 503, "ready without its store");
    assert_refused(
        &get_file(replica.proxy, &new_token(), REPO_A).await,
        503,
        "scope_unavailable",
    );
    let token = new_token();
    let body = serde_json::json!({"token": token, "name": "early", "repo_ids": [REPO_A]});
    assert_eq!(
        register_at(replica.admin, &body).await.status,
        503,
        "acknowledged without Redis"
    );

    redis.restart();
    assert!(
        wait_for(Duration::from_secs(10), || async {
            readyz(&replica).await == 200
        })
        .await,
        "not ready within 10 s of Redis answering; logs:\n{}",
        replica.logs()
    );
    assert_eq!(register_at(replica.admin, &body).await.status, 201);
    assert_eq!(get_file(replica.proxy, &token, REPO_A).await.status, 200);
    assert_eq!(fake.repo_requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_speak_tls_to_redis_and_verify_its_certificate() {
    let fake = FakeRelace::start().await;
    let ca = Ca::new("redis test CA");
    let redis = RedisServer::start_tls(Persistence::None, &ca.leaf());
    let ca_file = tempfile::NamedTempFile::new().expect("ca file");
    std::fs::write(ca_file.path(), ca.pem()).expect("write ca");
    let ca_path = ca_file.path().to_str().expect("utf-8 path").to_owned();
    let tls = Gateway::builder(&fake.url())
        .set("scopes.store", &toml_str("redis"))
        .set("scopes.redis_url", &toml_str(&redis.tls_url()))
        .set("scopes.introspect", "false");
    // A private CA is trusted through SSL_CERT_FILE (docs/operations.md).
    let r = replicas(&tls.env("SSL_CERT_FILE", &ca_path), 2).await;
    let token = new_token();
    let body = serde_json::json!({"token": token, "name": "tls", "repo_ids": [REPO_A]});
    assert_eq!(register_at(r[0].admin, &body).await.status, 201);
    assert_eq!(get_file(r[1].proxy, &token, REPO_A).await.status, 200);
    let revoked = delete_token(r[0].admin, &token).await;
    assert_eq!(revoked.status, 204);
    assert!(
        refused_within(r[1].proxy, &token, Duration::from_secs(1)).await,
        "fan-out over TLS"
    );
    // Without the CA the certificate is refused: never ready, nothing acknowledged, and
    // the URL's password is not in the logs.
    let with_password = redis
        .tls_url()
        .replace("rediss://", "rediss://:s3cret-pass@");
    let untrusting = GatewayProcess::spawn(
        &Gateway::builder(&fake.url())
            .set("scopes.store", &toml_str("redis"))
            .set("scopes.redis_url", &toml_str(&with_password))
            .set("scopes.introspect", "false")
            .env("SSL_CERT_FILE", "/dev/null"),
    );
    assert!(
        wait_for(Duration::from_secs(10), || async {
            untrusting.logs().contains("cannot connect to Redis")
        })
        .await,
        "no failed connection logged:\n{}",
        untrusting.logs()
    );
    assert_eq!(readyz(&untrusting).await, 503);
    assert_eq!(register_at(untrusting.admin, &body).await.status, 503);
    assert!(!untrusting.logs().contains("s3cret-pass"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_hit_never_touches_redis() {
    let fake = FakeRelace::start().await;
    let redis = RedisServer::start(Persistence::None);
    let r = replicas(&replica_config(&fake, &redis, &[]), 2).await;
    assert!(subscribed(&r[1]).await);
    let token = new_token();
    let body = serde_json::json!({"token": token, "name": "hot", "repo_ids": [REPO_A]});
    assert_eq!(register_at(r[0].admin, &body).await.status, 201);
    assert_eq!(get_file(r[1].proxy, &token, REPO_A).await.status, 200);
    let monitor = Monitor::start(redis.addr());
    for _ in 0..50 {
        assert_eq!(get_file(r[1].proxy, &token, REPO_A).await.status, 200);
    }
    let seen = String::from_utf8_lossy(&monitor.stop()).to_lowercase();
    // Heartbeats (PUBLISH) run on their own clock; anything else would be a lookup.
    let reads: Vec<&str> = seen
        .lines()
        .filter(|l| !l.contains("\"publish\"") && !l.trim().is_empty())
        .collect();
    assert!(reads.is_empty(), "cache hits went to Redis: {reads:?}");
    assert_eq!(fake.repo_requests(), 51);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_during_a_slow_introspection_on_another_replica_wins() {
    let fake = FakeRelace::start().await;
    let redis = RedisServer::start(Persistence::None);
    let (builder, _key) = introspecting_config(&fake, &redis);
    let r = replicas(&builder, 2).await;
    let token = fake.mint("slow", &[REPO_A], Some(600));
    fake.set_token_lookup_delay(Duration::from_millis(600));
    // Replica 1 starts learning the token; the upstream has said "valid" but is slow.
    let (proxy, learning_token) = (r[0].proxy, token.clone());
    let first = tokio::spawn(async move { get_file(proxy, &learning_token, REPO_A).await });
    assert!(
        wait_for(Duration::from_secs(5), || async {
            fake.token_lookups().len() == 1
        })
        .await,
        "replica 1 never asked the upstream"
    );
    // Meanwhile the orchestrator deletes it through replica 2.
    let deleted = call_with_auth(
        r[1].admin,
        "DELETE",
        &format!("/v1/repo_token/{token}"),
        &bearer(ACCOUNT_KEY),
    )
    .await;
    assert!(deleted.status / 100 == 2, "{}", body_text(&deleted));
    // The late "valid" answer must not bring it back, on either replica.
    let late = first.await.expect("request task");
    assert_refused(&late, 401, "token_revoked");
    for replica in &r {
        assert_refused(
            &get_file(replica.proxy, &token, REPO_A).await,
            401,
            "token_revoked",
        );
    }
    assert_eq!(fake.repo_requests(), 0, "nothing reached a repo route");
}
