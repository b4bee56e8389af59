//! Micro-benchmarks of the per-request decision: parsing (`classify`) and the scope
//! lookup (`authorize`). The load benchmark against nginx/HAProxy lives in
//! `../shared/perf`; these isolate scopegate's own work per request.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use scopegate::metrics::Metrics;
use scopegate::policy::OperationPolicy;
use scopegate::request::{classify, ClassifyOptions};
use scopegate::scope::{
    EmbeddedStore, FanoutHealth, RedisStore, ScopeEntry, ScopeTable, Source, Store, TableSettings,
    TokenDigest,
};

const TOKEN: &str = "rlcr-9f86d081884c7d659a2feaa0c55ad015a3bf4f1b";
const REPO: &str = "3f2c9a1e-7b4d-4e8a-9c6f-1a2b3c4d5e6f";

fn options() -> ClassifyOptions {
    ClassifyOptions {
        allow_account_keys: false,
        policy: OperationPolicy::default_deny(),
    }
}

fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).expect("header"),
    );
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h
}

fn bench_classify(c: &mut Criterion) {
    let options = options();
    let headers = headers();
    let plain: Uri = format!("/v1/repo/{REPO}/search").parse().expect("uri");
    let encoded: Uri = format!("/v1/repo/{REPO}/file/src%2Fapp%2Fmain.py")
        .parse()
        .expect("uri");
    let mut group = c.benchmark_group("classify");
    group.bench_function("plain_path", |b| {
        b.iter(|| {
            classify(
                &Method::POST,
                black_box(&plain),
                Version::HTTP_11,
                black_box(&headers),
                &options,
            )
        })
    });
    group.bench_function("encoded_path", |b| {
        b.iter(|| {
            classify(
                &Method::GET,
                black_box(&encoded),
                Version::HTTP_11,
                black_box(&headers),
                &options,
            )
        })
    });
    group.finish();
}

/// The decision for a known, in-scope token: with the memory store (read directly), and
/// with the embedded and Redis stores (served from the moka cache once warm).
fn bench_authorize(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = TableSettings {
        cache_capacity: 1000,
        negative_ttl: std::time::Duration::from_secs(10),
        revalidate_after: std::time::Duration::from_secs(60),
        max_staleness: std::time::Duration::from_secs(30),
    };
    let memory = runtime.block_on(ScopeTable::in_memory(
        1000,
        Metrics::new().expect("metrics"),
    ));
    let embedded = runtime
        .block_on(ScopeTable::open(
            settings.clone(),
            Store::Embedded(EmbeddedStore::open(&dir.path().join("a.db")).expect("open")),
            None,
            Metrics::new().expect("metrics"),
        ))
        .expect("table");
    let repo = uuid::Uuid::parse_str(REPO).expect("uuid");
    let uri: Uri = format!("/v1/repo/{REPO}/search").parse().expect("uri");
    let target = classify(
        &Method::POST,
        &uri,
        Version::HTTP_11,
        &headers(),
        &options(),
    )
    .outcome
    .expect("target");
    // The shared store, when a redis-server can be started here: a cache hit must cost
    // what it costs with the embedded store (no network on the hot path).
    let redis = RedisServer::start();
    let redis_table = redis.as_ref().map(|server| {
        let health = FanoutHealth::new(Metrics::new().expect("metrics"));
        let store = RedisStore::new(&server.url(), health.clone()).expect("redis url");
        let table = runtime
            .block_on(ScopeTable::open(
                settings.clone(),
                Store::Redis(store),
                None,
                Metrics::new().expect("metrics"),
            ))
            .expect("table");
        // Wait (bounded) until the replica is subscribed, so hits are trusted.
        for _ in 0..100 {
            if health.is_subscribed() {
                break;
            }
            runtime
                .block_on(async { tokio::time::sleep(std::time::Duration::from_millis(50)).await });
        }
        assert!(
            health.is_subscribed(),
            "no subscription to the bench's redis-server"
        );
        table
    });
    let mut tables = vec![("memory_store", &memory), ("embedded_cache_hit", &embedded)];
    if let Some(table) = &redis_table {
        tables.push(("redis_cache_hit", table));
    } else {
        eprintln!("authorize/redis_cache_hit skipped: redis-server is not installed");
    }
    for (name, scopes) in tables {
        runtime
            .block_on(scopes.learn(
                TokenDigest::of(TOKEN),
                ScopeEntry {
                    name: "bench".into(),
                    repo_ids: Box::new([repo]),
                    expires_at: None,
                    source: Source::Admin,
                },
            ))
            .expect("learn");
        c.bench_function(&format!("authorize/{name}"), |b| {
            b.iter(|| runtime.block_on(scopes.authorize(black_box(&target), || None)))
        });
    }
}

/// A store hit: what a cache miss costs before introspection, per backend.
fn bench_store_hit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let digest = TokenDigest::of(TOKEN);
    let repo = uuid::Uuid::parse_str(REPO).expect("uuid");
    let record = scopegate::scope::Record::Active(scopegate::scope::Active {
        entry: std::sync::Arc::new(ScopeEntry {
            name: "bench".into(),
            repo_ids: Box::new([repo]),
            expires_at: None,
            source: Source::Admin,
        }),
        confirmed_at: time::OffsetDateTime::now_utc(),
    });
    let embedded =
        Store::Embedded(EmbeddedStore::open(&dir.path().join("bench.db")).expect("open"));
    let memory = Store::memory();
    for store in [&embedded, &memory] {
        runtime
            .block_on(store.put(digest, record.clone()))
            .expect("put");
    }
    let mut group = c.benchmark_group("store_hit");
    group.bench_function("embedded", |b| {
        b.iter(|| runtime.block_on(embedded.get(black_box(&digest))))
    });
    group.bench_function("memory", |b| {
        b.iter(|| runtime.block_on(memory.get(black_box(&digest))))
    });
    group.finish();
}

/// Everything metrics cost one forwarded request: the in-flight gauge up and down, two
/// body-byte adds, the upstream and request records.
fn bench_metrics(c: &mut Criterion) {
    use scopegate::metrics::{Decision, Direction, Listener, UpstreamClass};
    let metrics = Metrics::new().expect("metrics");
    let elapsed = std::time::Duration::from_micros(180);
    c.bench_function("metrics/one_forwarded_request", |b| {
        b.iter(|| {
            let inflight = metrics.inflight(Listener::Proxy);
            metrics.body_bytes(Direction::Request, black_box(60));
            metrics.upstream_answered(UpstreamClass::Status(200), Some(elapsed));
            metrics.body_bytes(Direction::Response, black_box(200));
            metrics.request_done(Listener::Proxy, Decision::Allowed, elapsed);
            drop(inflight);
        })
    });
}

/// The complete refusal answer (status, headers, JSON body) for an out-of-scope request.
fn bench_refusal(c: &mut Criterion) {
    use scopegate::refusal::Refusal;
    let request_id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    c.bench_function("refusal_response/repo_out_of_scope", |b| {
        b.iter(|| {
            scopegate::proxy::refusal_response(
                black_box(Refusal::RepoOutOfScope),
                false,
                black_box(&request_id),
            )
        })
    });
}

criterion_group!(
    benches,
    bench_refusal,
    bench_classify,
    bench_authorize,
    bench_store_hit,
    bench_metrics
);
criterion_main!(benches);

/// A throwaway `redis-server` on a free loopback port for the Redis variant; `None` when
/// the binary is not installed.
struct RedisServer {
    child: std::process::Child,
    port: u16,
}

impl RedisServer {
    fn start() -> Option<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let server = RedisServer { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
