//! What may change while scopegate runs (SIGHUP): settings read per request and the TLS
//! certificates, each behind an atomic pointer swap so readers never lock or wait.
//!
//! Everything else in the config is fixed at start: a reload that changes it is reported
//! (logged as needing a restart) and the running value is kept.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest as _, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::request::ClassifyOptions;
use crate::server::tls_acceptor;

/// Settings read on the request path and swapped whole on reload.
#[derive(Debug)]
pub struct Settings {
    pub options: ClassifyOptions,
    /// SHA-256 of the admin token; `None` refuses `/admin/*`.
    pub admin_token_digest: Option<[u8; 32]>,
    pub shutdown_grace: Duration,
}

impl Settings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            options: ClassifyOptions {
                allow_account_keys: config.proxy.allow_account_keys,
                policy: config.proxy.policy.clone(),
            },
            admin_token_digest: config
                .admin
                .token
                .as_ref()
                .map(|t| Sha256::digest(t.expose().as_bytes()).into()),
            shutdown_grace: config.proxy.shutdown_grace,
        }
    }
}

/// The live settings, shared by every handler.
pub type LiveSettings = Arc<ArcSwap<Settings>>;

/// A listener's TLS acceptor, swapped on reload (new connections get the new one).
pub type TlsSlot = Arc<ArcSwap<TlsAcceptor>>;

/// The TLS acceptors configured for both listeners, built from the current files.
pub struct TlsAcceptors {
    pub proxy: Option<TlsAcceptor>,
    pub admin: Option<TlsAcceptor>,
}

impl TlsAcceptors {
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            proxy: config
                .proxy
                .tls
                .as_ref()
                .map(|f| tls_acceptor("proxy", f))
                .transpose()?,
            admin: config
                .admin
                .tls
                .as_ref()
                .map(|f| tls_acceptor("admin", f))
                .transpose()?,
        })
    }
}

/// The keys a reload cannot change, with a note for each one that differs.
pub fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut changes = Vec::new();
    let mut check = |differs: bool, key: &'static str| {
        if differs {
            changes.push(key);
        }
    };
    check(running.proxy.listen != new.proxy.listen, "proxy.listen");
    check(
        running.proxy.limits != new.proxy.limits,
        "proxy.max_connections/max_header_bytes/max_headers/header_read_timeout",
    );
    check(
        running.proxy.tls.is_some() != new.proxy.tls.is_some(),
        "proxy.tls_cert/tls_key (turning TLS on or off)",
    );
    check(running.admin.listen != new.admin.listen, "admin.listen");
    check(
        running.admin.tls.is_some() != new.admin.tls.is_some(),
        "admin.tls_cert/tls_key (turning TLS on or off)",
    );
    let up = (&running.upstream, &new.upstream);
    check(
        up.0.url.scheme != up.1.url.scheme || up.0.url.authority != up.1.url.authority,
        "upstream.url",
    );
    check(up.0.ca_file != up.1.ca_file, "upstream.ca_file");
    check(
        up.0.connect_timeout != up.1.connect_timeout,
        "upstream.connect_timeout",
    );
    check(
        up.0.response_header_timeout != up.1.response_header_timeout,
        "upstream.response_header_timeout",
    );
    check(
        up.0.api_key.as_ref().map(|k| k.expose()) != up.1.api_key.as_ref().map(|k| k.expose()),
        "upstream API key",
    );
    let sc = (&running.scopes, &new.scopes);
    check(sc.0.store != sc.1.store, "scopes.store");
    check(sc.0.path != sc.1.path, "scopes.path");
    check(sc.0.redis_url != sc.1.redis_url, "scopes.redis_url");
    check(
        sc.0.cache_capacity != sc.1.cache_capacity,
        "scopes.cache_capacity",
    );
    check(sc.0.introspect != sc.1.introspect, "scopes.introspect");
    check(
        sc.0.negative_ttl != sc.1.negative_ttl,
        "scopes.negative_ttl",
    );
    check(
        sc.0.revalidate_after != sc.1.revalidate_after,
        "scopes.revalidate_after",
    );
    check(
        sc.0.max_staleness != sc.1.max_staleness,
        "scopes.max_staleness",
    );
    changes
}
