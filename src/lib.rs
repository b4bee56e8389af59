//! scopegate: a scoping gateway between AI-agent sandboxes and the Relace API.
//!
//! A request's path, in one breath: accept ([`server`]) → [`request::classify`] turns
//! method, target and headers into a typed [`request::Target`] or a
//! [`refusal::Refusal`] → [`scope::ScopeTable::authorize`] turns the token's digest and
//! the target into a [`scope::Permit`] → [`proxy`] streams the request to the pooled
//! [`upstream`] client and the answer back → one metrics record and one log line
//! ([`observe`]) when the response body ends.
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | raw TOML → env overrides → validated [`config::Config`] |
//! | [`request`] | pure parsing: credential, canonical path, route class |
//! | [`policy`] | the operation policy (SPEC §4 row 10) |
//! | [`scope`] | token digests, scope entries, cache and store tiers, the decision |
//! | [`proxy`] | the proxy handler, forwarding, the one refusal → response function |
//! | [`admin`] | health, readiness, metrics, `/admin/tokens`, the `/v1/*` passthrough |
//! | [`upstream`] | the pooled hyper-util client with its rustls connector |
//! | [`metrics`] | the typed metrics handle (SPEC §9) |
//! | [`server`] | accept loops, TLS, graceful shutdown |
//! | [`runtime`] | what a SIGHUP reload may swap: live settings and TLS acceptors |

pub mod admin;
pub mod body;
pub mod config;
pub mod headers;
pub mod metrics;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod refusal;
pub mod request;
pub mod runtime;
pub mod scope;
pub mod server;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::admin::AdminState;
use crate::config::{Config, ConfigErrors, ConnectionLimits, Introspect, StoreKind};
use crate::metrics::Metrics;
use crate::proxy::ProxyState;
use crate::runtime::{LiveSettings, Settings, TlsAcceptors, TlsSlot};
use crate::scope::introspect::Introspector;
use crate::scope::{EmbeddedStore, FanoutHealth, RedisStore, ScopeTable, Store, TableSettings};
use crate::upstream::Upstream;

/// The two bound listeners. Binding is the caller's job so tests can use port 0.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both listeners from the config.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let proxy = TcpListener::bind(config.proxy.listen)
            .await
            .with_context(|| format!("proxy.listen {}", config.proxy.listen))?;
        let admin = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("admin.listen {}", config.admin.listen))?;
        Ok(Self { proxy, admin })
    }

    pub fn proxy_addr(&self) -> std::io::Result<SocketAddr> {
        self.proxy.local_addr()
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }
}

/// How a running gateway re-reads its config on SIGHUP: `requests` delivers one item per
/// reload request, `load` reads and validates the config (it runs off the async workers).
pub struct Reloader {
    pub requests: mpsc::Receiver<()>,
    pub load: Arc<dyn Fn() -> Result<Config, ConfigErrors> + Send + Sync>,
}

/// How long the admin listener keeps serving in-flight admin requests once the proxy has
/// drained (health, metrics and mints are short).
const ADMIN_DRAIN: Duration = Duration::from_secs(2);

/// Runs the gateway on already-bound listeners until `shutdown` completes, then drains:
/// `/readyz` turns 503 at once, the proxy listener stops accepting, in-flight requests
/// and streams get up to `proxy.shutdown_grace` to finish, and the admin listener keeps
/// answering probes and scrapes until the proxy has drained.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    run_with_reload(config, listeners, shutdown, None).await
}

/// [`run`], reloading the config whenever `reloader` asks (SIGHUP in the binary).
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    reloader: Option<Reloader>,
) -> anyhow::Result<()> {
    let metrics = Metrics::new().context("metrics registry")?;
    let upstream = Upstream::new(&config.upstream, metrics.clone()).context("upstream client")?;
    let scopes = open_scopes(&config, &upstream, &metrics).await?;
    let sweeper = tokio::spawn(sweep_periodically(scopes.clone()));
    let acceptors = TlsAcceptors::load(&config)?;
    let proxy_tls: Option<TlsSlot> = acceptors.proxy.map(|a| Arc::new(ArcSwap::from_pointee(a)));
    let admin_tls: Option<TlsSlot> = acceptors.admin.map(|a| Arc::new(ArcSwap::from_pointee(a)));
    let settings: LiveSettings = Arc::new(ArcSwap::from_pointee(Settings::from_config(&config)));
    let accepting = Arc::new(AtomicBool::new(true));

    let proxy_state = Arc::new(ProxyState {
        settings: settings.clone(),
        scopes: scopes.clone(),
        upstream: upstream.clone(),
        metrics: metrics.clone(),
    });
    let admin_state = Arc::new(AdminState {
        settings: settings.clone(),
        scopes,
        upstream,
        metrics: metrics.clone(),
        accepting: accepting.clone(),
    });

    let proxy_graceful = Arc::new(GracefulShutdown::new());
    let admin_graceful = Arc::new(GracefulShutdown::new());
    let (proxy_stop, proxy_stop_rx) = watch::channel(false);
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    tracing::info!(
        proxy = %listeners.proxy_addr()?,
        admin = %listeners.admin_addr()?,
        upstream = %format_args!("{}://{}", config.upstream.url.scheme, config.upstream.url.authority),
        proxy_tls = proxy_tls.is_some(),
        admin_tls = admin_tls.is_some(),
        "scopegate listening"
    );
    let proxy_loop = tokio::spawn(server::serve(
        listeners.proxy,
        proxy_tls.clone(),
        proxy_graceful.clone(),
        proxy_stop_rx,
        config.proxy.limits,
        move |req, conn| {
            let state = proxy_state.clone();
            async move { proxy::handle(&state, req, conn).await }
        },
    ));
    let admin_loop = tokio::spawn(server::serve(
        listeners.admin,
        admin_tls.clone(),
        admin_graceful.clone(),
        admin_stop_rx,
        ConnectionLimits::default(),
        move |req, conn| {
            let state = admin_state.clone();
            async move { admin::handle(&state, req, conn).await }
        },
    ));

    let reloads = reloader.map(|reloader| {
        tokio::spawn(reload_on_request(
            reloader,
            config.clone(),
            settings.clone(),
            proxy_tls,
            admin_tls,
            metrics.clone(),
        ))
    });

    shutdown.await;
    tracing::info!(
        "shutting down: /readyz is 503, the proxy stops accepting, in-flight requests drain"
    );
    accepting.store(false, Ordering::Release);
    let _ = proxy_stop.send(true);
    let _ = proxy_loop.await;
    let grace = settings.load().shutdown_grace;
    let drained = drain(proxy_graceful, grace).await;
    if drained {
        tracing::info!("all proxy connections drained");
    } else {
        tracing::warn!(
            open_requests = metrics.inflight_count(metrics::Listener::Proxy),
            grace_ms = grace.as_millis() as u64,
            "grace period over; cutting the requests and streams still open"
        );
    }
    let _ = admin_stop.send(true);
    let _ = admin_loop.await;
    drain(admin_graceful, ADMIN_DRAIN).await;
    if let Some(reloads) = reloads {
        reloads.abort();
    }
    sweeper.abort();
    Ok(())
}

/// Waits (up to `grace`) for every connection watched by `graceful` to finish; true
/// when they all did.
async fn drain(graceful: Arc<GracefulShutdown>, grace: Duration) -> bool {
    // The accept loop has returned, so this is the last reference.
    let Ok(graceful) = Arc::try_unwrap(graceful) else {
        tracing::warn!("connection watcher still shared; not draining");
        return false;
    };
    tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_ok()
}

/// Serves reload requests one at a time: read and validate off the async workers, build
/// the new TLS acceptors, then swap; on any error keep everything as it is.
async fn reload_on_request(
    mut reloader: Reloader,
    mut running: Config,
    settings: LiveSettings,
    proxy_tls: Option<TlsSlot>,
    admin_tls: Option<TlsSlot>,
    metrics: Metrics,
) {
    while reloader.requests.recv().await.is_some() {
        let load = reloader.load.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let config = load().map_err(|errors| errors.0)?;
            let acceptors = TlsAcceptors::load(&config).map_err(|e| vec![format!("{e:#}")])?;
            Ok::<_, Vec<String>>((config, acceptors))
        })
        .await
        .unwrap_or_else(|e| Err(vec![format!("reload task failed: {e}")]));
        match loaded {
            Ok((config, acceptors)) => {
                for key in runtime::restart_only_changes(&running, &config) {
                    tracing::warn!(key, "changed in the config, but only a restart applies it; the running value stays");
                }
                settings.store(Arc::new(Settings::from_config(&config)));
                if let (Some(slot), Some(acceptor)) = (&proxy_tls, acceptors.proxy) {
                    slot.store(Arc::new(acceptor));
                }
                if let (Some(slot), Some(acceptor)) = (&admin_tls, acceptors.admin) {
                    slot.store(Arc::new(acceptor));
                }
                metrics.config_reloaded(true);
                tracing::info!("config reloaded");
                running = config;
            }
            Err(problems) => {
                metrics.config_reloaded(false);
                for problem in &problems {
                    tracing::error!(
                        problem = problem.as_str(),
                        "config reload refused; the running config stays"
                    );
                }
            }
        }
    }
}

/// How often expired entries and old tombstones are swept from the store.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

/// Opens the configured store and builds the scope table over it, with introspection
/// when it is on (`auto`: when an API key is configured).
async fn open_scopes(
    config: &Config,
    upstream: &Upstream,
    metrics: &Metrics,
) -> anyhow::Result<Arc<ScopeTable>> {
    let store = match config.scopes.store {
        StoreKind::Memory => Store::memory(),
        StoreKind::Embedded => Store::Embedded(
            EmbeddedStore::open(&config.scopes.path)
                .with_context(|| format!("scopes.path {}", config.scopes.path.display()))?,
        ),
        StoreKind::Redis => {
            let url = config.scopes.redis_url.as_deref().unwrap_or_default();
            Store::Redis(
                RedisStore::new(url, FanoutHealth::new(metrics.clone()))
                    .context("scopes.redis_url")?,
            )
        }
    };
    let introspection_on = match config.scopes.introspect {
        Introspect::On => true,
        Introspect::Off => false,
        Introspect::Auto => config.upstream.api_key.is_some(),
    };
    let introspector = match (&config.upstream.api_key, introspection_on) {
        (Some(key), true) => Some(
            Introspector::new(upstream.clone(), key)
                .context("upstream API key is not a valid header value")?,
        ),
        _ => None,
    };
    tracing::info!(
        store = ?config.scopes.store,
        introspection = introspector.is_some(),
        "scope table ready"
    );
    let settings = TableSettings {
        cache_capacity: config.scopes.cache_capacity,
        negative_ttl: config.scopes.negative_ttl,
        revalidate_after: config.scopes.revalidate_after,
        max_staleness: config.scopes.max_staleness,
    };
    ScopeTable::open(settings, store, introspector, metrics.clone())
        .await
        .context("opening the scope store")
}

async fn sweep_periodically(scopes: Arc<ScopeTable>) {
    // The first sweep waits a full interval: start-up has enough to do.
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + SWEEP_INTERVAL, SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        match scopes.sweep(time::OffsetDateTime::now_utc()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "swept expired scopes and tombstones"),
            Err(error) => tracing::warn!(%error, "sweeping the scope store failed"),
        }
    }
}
