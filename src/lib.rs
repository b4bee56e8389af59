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
pub mod scope;
pub mod server;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::AdminState;
use crate::config::{Config, Introspect, StoreKind};
use crate::metrics::Metrics;
use crate::proxy::ProxyState;
use crate::request::ClassifyOptions;
use crate::scope::introspect::Introspector;
use crate::scope::{EmbeddedStore, ScopeTable, Store, TableSettings};
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

/// Runs the gateway on already-bound listeners until `shutdown` completes, then stops
/// accepting, turns `/readyz` to 503, and lets in-flight requests finish for up to
/// `proxy.shutdown_grace`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let metrics = Metrics::new().context("metrics registry")?;
    let upstream = Upstream::new(&config.upstream, metrics.clone()).context("upstream client")?;
    let scopes = open_scopes(&config, &upstream, &metrics).await?;
    let sweeper = tokio::spawn(sweep_periodically(scopes.clone()));
    let tls = config
        .proxy
        .tls
        .as_ref()
        .map(server::tls_acceptor)
        .transpose()?;
    let accepting = Arc::new(AtomicBool::new(true));

    let proxy_state = Arc::new(ProxyState {
        options: ClassifyOptions {
            allow_account_keys: config.proxy.allow_account_keys,
            policy: config.proxy.policy.clone(),
        },
        scopes: scopes.clone(),
        upstream: upstream.clone(),
        metrics: metrics.clone(),
    });
    let admin_state = Arc::new(AdminState::new(
        config.admin.token.as_ref(),
        scopes,
        upstream,
        metrics,
        accepting.clone(),
    ));

    let graceful = Arc::new(GracefulShutdown::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    tracing::info!(
        proxy = %listeners.proxy_addr()?,
        admin = %listeners.admin_addr()?,
        upstream = %format_args!("{}://{}", config.upstream.url.scheme, config.upstream.url.authority),
        tls = tls.is_some(),
        "scopegate listening"
    );
    let proxy_loop = tokio::spawn(server::serve(
        listeners.proxy,
        tls,
        graceful.clone(),
        stop_rx.clone(),
        move |req, conn| {
            let state = proxy_state.clone();
            async move { proxy::handle(&state, req, conn).await }
        },
    ));
    let admin_loop = tokio::spawn(server::serve(
        listeners.admin,
        None,
        graceful.clone(),
        stop_rx,
        move |req, conn| {
            let state = admin_state.clone();
            async move { admin::handle(&state, req, conn).await }
        },
    ));

    shutdown.await;
    tracing::info!("shutting down: no new connections; draining in-flight requests");
    accepting.store(false, Ordering::Release);
    let _ = stop_tx.send(true);
    let _ = proxy_loop.await;
    let _ = admin_loop.await;
    let grace = config.proxy.shutdown_grace;
    // The accept loops are gone, so this is the last reference.
    let drained = async move {
        match Arc::try_unwrap(graceful) {
            Ok(graceful) => graceful.shutdown().await,
            Err(_) => tracing::warn!("connection watcher still shared; not draining"),
        }
    };
    match tokio::time::timeout(grace, drained).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "grace period over; closing the remaining connections"
        ),
    }
    sweeper.abort();
    Ok(())
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
            anyhow::bail!("scopes.store = \"redis\" is not available in this build")
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
