//! Configuration (SPEC §3): TOML → environment overrides → one `validate()` that reports
//! every problem with the key it concerns → a typed [`Config`].
//!
//! Raw serde structs carry the defaults; nothing downstream ever sees a string where a
//! typed value (address, duration, URI) belongs.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use serde::{Deserialize, Serialize};

use crate::policy::{OperationPolicy, DEFAULT_DENY};

/// Where the config is looked for when neither `--config` nor `$SCOPEGATE_CONFIG` is set.
pub const DEFAULT_CONFIG_PATH: &str = "config/scopegate.toml";
/// The prefix of environment overrides: `SCOPEGATE_<SECTION>__<KEY>`.
pub const ENV_PREFIX: &str = "SCOPEGATE_";
/// Shortest admin token accepted: anything shorter is guessable.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

// ---------------------------------------------------------------------------------------
// Raw form: what the TOML file says, with defaults.

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub proxy: RawProxy,
    pub admin: RawAdmin,
    pub upstream: RawUpstream,
    pub scopes: RawScopes,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProxy {
    pub listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    pub allow_account_keys: bool,
    /// Operation policy (SPEC §4 row 10): `"METHOD /operation"` rules denied to tokens.
    pub deny_operations: Vec<String>,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: String,
    /// Connections served at once; further ones are closed at accept.
    pub max_connections: u64,
    /// Largest request head (request line plus headers) accepted; larger get 431.
    pub max_header_bytes: u64,
    /// Most header fields in one request head; more get 431.
    pub max_headers: u64,
    /// Time allowed for a request head to arrive, which is also how long an idle
    /// keep-alive connection waits for its next request (slowloris protection).
    pub header_read_timeout: String,
}

impl Default for RawProxy {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            tls_cert: None,
            tls_key: None,
            allow_account_keys: false,
            deny_operations: DEFAULT_DENY.iter().map(|s| (*s).to_owned()).collect(),
            shutdown_grace: "30s".into(),
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: "10s".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub listen: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
            tls_cert: None,
            tls_key: None,
            token: None,
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    pub connect_timeout: String,
    pub response_header_timeout: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<String>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            url: "https://api.relace.run".into(),
            ca_file: None,
            connect_timeout: "5s".into(),
            response_header_timeout: "120s".into(),
            api_key_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawScopes {
    pub store: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    pub max_staleness: String,
    pub cache_capacity: u64,
    /// `"auto"`, `true` or `false` (also the strings `"true"`/`"false"`).
    pub introspect: toml::Value,
    pub revalidate_after: String,
    pub negative_ttl: String,
}

impl Default for RawScopes {
    fn default() -> Self {
        Self {
            store: "embedded".into(),
            path: "data/scopes.db".into(),
            redis_url: None,
            max_staleness: "30s".into(),
            cache_capacity: 1_000_000,
            introspect: toml::Value::String("auto".into()),
            revalidate_after: "60s".into(),
            negative_ttl: "10s".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Validated form.

/// A secret from the config (admin token, API key). `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub scopes: ScopesConfig,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub allow_account_keys: bool,
    pub policy: OperationPolicy,
    pub shutdown_grace: Duration,
    pub limits: ConnectionLimits,
}

/// Per-listener connection limits (fixed at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// `None`: `/admin/*` is refused.
    pub token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub url: UpstreamUrl,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub response_header_timeout: Duration,
    pub api_key: Option<Secret>,
}

/// The upstream origin: scheme and authority only (requests keep their own path).
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The `Host` header forwarded requests carry.
    pub host: HeaderValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Embedded,
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Introspect {
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone)]
pub struct ScopesConfig {
    pub store: StoreKind,
    pub path: PathBuf,
    pub redis_url: Option<String>,
    pub max_staleness: Duration,
    pub cache_capacity: u64,
    pub introspect: Introspect,
    pub revalidate_after: Duration,
    pub negative_ttl: Duration,
}

/// Every problem found in a config, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where the effective config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    Defaults,
}

/// Finds and loads the config per SPEC §2: `explicit`, else `$SCOPEGATE_CONFIG`, else
/// [`DEFAULT_CONFIG_PATH`] if it exists, else the built-in defaults; then applies the
/// process environment.
pub fn load(explicit: Option<&Path>) -> Result<(Config, RawConfig, ConfigSource), ConfigErrors> {
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("SCOPEGATE_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG_PATH);
            default.is_file().then_some(default)
        });
    let (text, source) = match path {
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(text) => (text, ConfigSource::File(path)),
            Err(e) => {
                return Err(ConfigErrors(vec![format!(
                    "config file {}: {e}",
                    path.display()
                )]))
            }
        },
        None => (String::new(), ConfigSource::Defaults),
    };
    let (config, raw) = from_toml_with_env(&text, std::env::vars())?;
    Ok((config, raw, source))
}

/// Parses TOML text, applies `SCOPEGATE_<SECTION>__<KEY>` overrides (plus
/// `SCOPEGATE_ADMIN_TOKEN` and `RELACE_API_KEY`) from `env`, and validates.
pub fn from_toml_with_env(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Config, RawConfig), ConfigErrors> {
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        ConfigErrors(vec![format!("config is not valid TOML: {e}")])
    })?;
    let mut extra = ExtraEnv::default();
    let defaults = toml::Table::try_from(RawConfig::default()).unwrap_or_default();
    let mut problems = Vec::new();
    let mut env: Vec<(String, String)> = env.into_iter().collect();
    env.sort();
    for (name, value) in env {
        match name.as_str() {
            "SCOPEGATE_ADMIN_TOKEN" => extra.admin_token = Some(value),
            "RELACE_API_KEY" => extra.api_key = Some(value),
            _ => {
                if let Some(spec) = name.strip_prefix(ENV_PREFIX) {
                    if let Some((section, key)) = spec.split_once("__") {
                        if let Err(problem) =
                            apply_override(&mut table, &defaults, section, key, value)
                        {
                            problems.push(format!("{name}: {problem}"));
                        }
                    }
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(ConfigErrors(problems));
    }
    let raw: RawConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigErrors(vec![format!("config: {}", e.message())]))?;
    let config = validate(&raw, &extra)?;
    Ok((config, raw))
}

/// Environment values that are not `SECTION__KEY` overrides: `SCOPEGATE_ADMIN_TOKEN`
/// and `RELACE_API_KEY` (each used only when the file names no source for it).
#[derive(Debug, Default, Clone)]
pub struct ExtraEnv {
    pub admin_token: Option<String>,
    pub api_key: Option<String>,
}

/// Sets `section.key` from an environment string, typed like the key's default (so
/// `"false"` becomes a boolean where the key is one, and stays a string elsewhere).
fn apply_override(
    table: &mut toml::Table,
    defaults: &toml::Table,
    section: &str,
    key: &str,
    value: String,
) -> Result<(), String> {
    let section = section.to_ascii_lowercase();
    let key = key.to_ascii_lowercase();
    let default = defaults
        .get(&section)
        .and_then(|s| s.as_table())
        .and_then(|s| s.get(&key));
    let typed = match default {
        Some(toml::Value::Boolean(_)) => match value.trim() {
            "true" => toml::Value::Boolean(true),
            "false" => toml::Value::Boolean(false),
            other => {
                return Err(format!(
                    "{section}.{key} must be true or false, got {other:?}"
                ))
            }
        },
        Some(toml::Value::Integer(_)) => value
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("{section}.{key} must be an integer, got {value:?}"))?,
        Some(toml::Value::Array(_)) => toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(value),
    };
    let entry = table
        .entry(section.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(section_table) = entry.as_table_mut() else {
        return Err(format!("[{section}] is not a table"));
    };
    section_table.insert(key, typed);
    Ok(())
}

/// Turns the raw config into a typed one, collecting every problem.
pub fn validate(raw: &RawConfig, env: &ExtraEnv) -> Result<Config, ConfigErrors> {
    let mut p = Problems::default();

    let proxy_listen = p.addr("proxy.listen", &raw.proxy.listen);
    let tls = p.tls_files("proxy", &raw.proxy.tls_cert, &raw.proxy.tls_key);
    let admin_tls = p.tls_files("admin", &raw.admin.tls_cert, &raw.admin.tls_key);
    let policy = match OperationPolicy::parse(&raw.proxy.deny_operations) {
        Ok(policy) => policy,
        Err(e) => {
            p.push(format!("proxy.deny_operations: {e}"));
            OperationPolicy::default()
        }
    };
    let shutdown_grace = p.duration("proxy.shutdown_grace", &raw.proxy.shutdown_grace);
    let header_read_timeout =
        p.duration("proxy.header_read_timeout", &raw.proxy.header_read_timeout);
    if header_read_timeout.is_some_and(|d| d.is_zero()) {
        p.push("proxy.header_read_timeout: must be more than 0");
    }
    let limit = |p: &mut Problems, key: &str, value: u64, min: u64, max: u64| -> usize {
        if !(min..=max).contains(&value) {
            p.push(format!(
                "{key}: must be between {min} and {max}, got {value}"
            ));
        }
        usize::try_from(value).unwrap_or(usize::MAX)
    };
    let max_connections = limit(
        &mut p,
        "proxy.max_connections",
        raw.proxy.max_connections,
        1,
        10_000_000,
    );
    // hyper needs room for at least an 8 KiB read buffer.
    let max_header_bytes = limit(
        &mut p,
        "proxy.max_header_bytes",
        raw.proxy.max_header_bytes,
        8192,
        16 * 1024 * 1024,
    );
    let max_headers = limit(
        &mut p,
        "proxy.max_headers",
        raw.proxy.max_headers,
        8,
        10_000,
    );

    let admin_listen = p.addr("admin.listen", &raw.admin.listen);
    if let (Some(a), Some(b)) = (proxy_listen, admin_listen) {
        if a == b && a.port() != 0 {
            p.push("admin.listen: must differ from proxy.listen");
        }
    }
    let admin_token = match (&raw.admin.token, &raw.admin.token_file) {
        (Some(_), Some(_)) => {
            p.push("admin.token/admin.token_file: set one, not both");
            None
        }
        (Some(token), None) => Some(token.clone()),
        (None, Some(file)) => p.secret_file("admin.token_file", file),
        (None, None) => env.admin_token.clone(),
    };
    let admin_token = admin_token.map(|t| t.trim().to_owned());
    if let Some(token) = &admin_token {
        if token.len() < MIN_ADMIN_TOKEN_LEN || token.contains(char::is_whitespace) {
            p.push(format!(
                "admin.token: must be at least {MIN_ADMIN_TOKEN_LEN} characters without spaces"
            ));
        }
    }

    let url = p.upstream_url("upstream.url", &raw.upstream.url);
    if let Some(ca) = &raw.upstream.ca_file {
        p.readable_file("upstream.ca_file", ca);
    }
    let connect_timeout = p.duration("upstream.connect_timeout", &raw.upstream.connect_timeout);
    let response_header_timeout = p.duration(
        "upstream.response_header_timeout",
        &raw.upstream.response_header_timeout,
    );
    let api_key = match &raw.upstream.api_key_file {
        Some(file) => p.secret_file("upstream.api_key_file", file),
        None => env.api_key.clone(),
    }
    .map(|k| k.trim().to_owned())
    .filter(|k| !k.is_empty());

    let store = match raw.scopes.store.as_str() {
        "embedded" => Some(StoreKind::Embedded),
        "memory" => Some(StoreKind::Memory),
        "redis" => {
            match raw.scopes.redis_url.as_deref().map(str::trim) {
                None | Some("") => p.push(
                    "scopes.redis_url: required with store = \"redis\" (e.g. \"redis://redis:6379/0\"; \
                     SCOPEGATE_SCOPES__REDIS_URL from a Secret when it holds a password)",
                ),
                Some(url) if !(url.starts_with("redis://") || url.starts_with("rediss://")) => p.push(
                    "scopes.redis_url: must start with redis:// or rediss://",
                ),
                Some(_) => {}
            }
            Some(StoreKind::Redis)
        }
        other => {
            p.push(format!(
                "scopes.store: must be \"embedded\", \"memory\" or \"redis\", got {other:?}"
            ));
            None
        }
    };
    if raw.scopes.path.trim().is_empty() {
        p.push("scopes.path: must not be empty");
    }
    let max_staleness = p.duration("scopes.max_staleness", &raw.scopes.max_staleness);
    if raw.scopes.cache_capacity == 0 {
        p.push("scopes.cache_capacity: must be at least 1");
    }
    let introspect = match &raw.scopes.introspect {
        toml::Value::Boolean(true) => Some(Introspect::On),
        toml::Value::Boolean(false) => Some(Introspect::Off),
        toml::Value::String(s) if s == "auto" => Some(Introspect::Auto),
        toml::Value::String(s) if s == "true" => Some(Introspect::On),
        toml::Value::String(s) if s == "false" => Some(Introspect::Off),
        other => {
            p.push(format!(
                "scopes.introspect: must be \"auto\", true or false, got {other}"
            ));
            None
        }
    };
    if introspect == Some(Introspect::On) && api_key.is_none() {
        p.push(
            "scopes.introspect: true needs an API key (upstream.api_key_file or RELACE_API_KEY)",
        );
    }
    let revalidate_after = p.duration("scopes.revalidate_after", &raw.scopes.revalidate_after);
    let negative_ttl = p.duration("scopes.negative_ttl", &raw.scopes.negative_ttl);

    if !p.0.is_empty() {
        return Err(ConfigErrors(p.0));
    }
    // Every `None` above pushed a problem, so these all hold values here.
    let (
        Some(proxy_listen),
        Some(shutdown_grace),
        Some(header_read_timeout),
        Some(admin_listen),
        Some(url),
        Some(connect_timeout),
        Some(response_header_timeout),
        Some(store),
        Some(max_staleness),
        Some(introspect),
        Some(revalidate_after),
        Some(negative_ttl),
    ) = (
        proxy_listen,
        shutdown_grace,
        header_read_timeout,
        admin_listen,
        url,
        connect_timeout,
        response_header_timeout,
        store,
        max_staleness,
        introspect,
        revalidate_after,
        negative_ttl,
    )
    else {
        return Err(ConfigErrors(vec![
            "config: internal validation error".into()
        ]));
    };
    Ok(Config {
        proxy: ProxyConfig {
            listen: proxy_listen,
            tls,
            allow_account_keys: raw.proxy.allow_account_keys,
            policy,
            shutdown_grace,
            limits: ConnectionLimits {
                max_connections,
                max_header_bytes,
                max_headers,
                header_read_timeout,
            },
        },
        admin: AdminConfig {
            listen: admin_listen,
            tls: admin_tls,
            token: admin_token.map(Secret::new),
        },
        upstream: UpstreamConfig {
            url,
            ca_file: raw.upstream.ca_file.as_ref().map(PathBuf::from),
            connect_timeout,
            response_header_timeout,
            api_key: api_key.map(Secret::new),
        },
        scopes: ScopesConfig {
            store,
            path: PathBuf::from(&raw.scopes.path),
            redis_url: raw.scopes.redis_url.clone(),
            max_staleness,
            cache_capacity: raw.scopes.cache_capacity,
            introspect,
            revalidate_after,
            negative_ttl,
        },
    })
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }

    fn addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        value
            .parse()
            .map_err(|_| {
                self.push(format!(
                    "{key}: {value:?} is not an address like \"0.0.0.0:8080\""
                ))
            })
            .ok()
    }

    fn duration(&mut self, key: &str, value: &str) -> Option<Duration> {
        match humantime::parse_duration(value.trim()) {
            Ok(d) => Some(d),
            Err(e) => {
                self.push(format!(
                    "{key}: {value:?} is not a duration like \"250ms\", \"5s\" or \"2m\" ({e})"
                ));
                None
            }
        }
    }

    fn readable_file(&mut self, key: &str, path: &str) {
        if let Err(e) = std::fs::metadata(path) {
            self.push(format!("{key}: cannot read {path:?}: {e}"));
        }
    }

    /// `<section>.tls_cert` and `<section>.tls_key`: both (TLS) or neither (plain).
    fn tls_files(
        &mut self,
        section: &str,
        cert: &Option<String>,
        key: &Option<String>,
    ) -> Option<TlsFiles> {
        match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                self.readable_file(&format!("{section}.tls_cert"), cert);
                self.readable_file(&format!("{section}.tls_key"), key);
                Some(TlsFiles {
                    cert: cert.into(),
                    key: key.into(),
                })
            }
            _ => {
                self.push(format!(
                    "{section}.tls_cert/{section}.tls_key: set both (TLS) or neither (plain HTTP)"
                ));
                None
            }
        }
    }

    fn secret_file(&mut self, key: &str, path: &str) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(s) => Some(s),
            Err(e) => {
                self.push(format!("{key}: cannot read {path:?}: {e}"));
                None
            }
        }
    }

    fn upstream_url(&mut self, key: &str, value: &str) -> Option<UpstreamUrl> {
        let uri: Uri = match value.parse() {
            Ok(uri) => uri,
            Err(e) => {
                self.push(format!("{key}: {value:?} is not a URL ({e})"));
                return None;
            }
        };
        let scheme = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
            _ => {
                self.push(format!(
                    "{key}: {value:?} must start with http:// or https://"
                ));
                return None;
            }
        };
        let Some(authority) = uri.authority().cloned() else {
            self.push(format!("{key}: {value:?} has no host"));
            return None;
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            self.push(format!(
                "{key}: {value:?} must be an origin without a path (requests keep their own /v1/… path)"
            ));
            return None;
        }
        if authority.as_str().contains('@') {
            self.push(format!("{key}: must not carry credentials"));
            return None;
        }
        let host = match HeaderValue::from_str(authority.as_str()) {
            Ok(h) => h,
            Err(_) => {
                self.push(format!("{key}: {value:?} has an invalid host"));
                return None;
            }
        };
        Some(UpstreamUrl {
            scheme,
            authority,
            host,
        })
    }
}

/// The effective config as TOML, with every secret replaced by `"<redacted>"`.
pub fn render_redacted(raw: &RawConfig) -> String {
    let mut raw = raw.clone();
    if raw.admin.token.is_some() {
        raw.admin.token = Some("<redacted>".into());
    }
    if let Some(url) = &raw.scopes.redis_url {
        raw.scopes.redis_url = Some(redact_userinfo(url));
    }
    toml::to_string_pretty(&raw).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}

/// `scheme://user:password@host…` → `scheme://<redacted>@host…` (Redis URLs carry the
/// password there).
fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_passwords_are_redacted_when_rendering() {
        assert_eq!(
            redact_userinfo("redis://:s3cret@redis:6379/0"),
            "redis://<redacted>@redis:6379/0"
        );
        assert_eq!(
            redact_userinfo("rediss://user:p@ss@host/1"),
            "rediss://<redacted>@host/1"
        );
        assert_eq!(
            redact_userinfo("redis://redis:6379/0"),
            "redis://redis:6379/0"
        );
        let (_, raw) = from_toml_with_env(
            "[scopes]\nstore = \"redis\"\nredis_url = \"redis://:s3cret@r:6379/0\"\n",
            env(&[]),
        )
        .unwrap();
        assert!(!render_redacted(&raw).contains("s3cret"));
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_validate() {
        let (c, _) = from_toml_with_env("", env(&[])).unwrap();
        assert_eq!(c.proxy.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.upstream.response_header_timeout, Duration::from_secs(120));
        assert_eq!(c.scopes.store, StoreKind::Embedded);
        assert_eq!(c.scopes.introspect, Introspect::Auto);
        assert!(c.admin.token.is_none());
    }

    #[test]
    fn env_overrides_are_typed_by_key() {
        let (c, _) = from_toml_with_env(
            "[upstream]\nurl = \"http://127.0.0.1:1\"\n",
            env(&[
                ("SCOPEGATE_UPSTREAM__URL", "http://127.0.0.1:2"),
                ("SCOPEGATE_PROXY__ALLOW_ACCOUNT_KEYS", "true"),
                ("SCOPEGATE_SCOPES__CACHE_CAPACITY", "42"),
                ("SCOPEGATE_UPSTREAM__CONNECT_TIMEOUT", "250ms"),
                ("SCOPEGATE_ADMIN_TOKEN", "0123456789abcdef"),
            ]),
        )
        .unwrap();
        assert_eq!(c.upstream.url.authority.as_str(), "127.0.0.1:2");
        assert!(c.proxy.allow_account_keys);
        assert_eq!(c.scopes.cache_capacity, 42);
        assert_eq!(c.upstream.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.admin.token.unwrap().expose(), "0123456789abcdef");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let err = from_toml_with_env(
            "[proxy]\nlisten = \"nope\"\n[upstream]\nurl = \"ftp://x\"\nconnect_timeout = \"soon\"\n[scopes]\nstore = \"disk\"\n",
            env(&[]),
        )
        .unwrap_err();
        let text = err.to_string();
        for key in [
            "proxy.listen",
            "upstream.url",
            "upstream.connect_timeout",
            "scopes.store",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_env_are_refused() {
        assert!(from_toml_with_env("[proxy]\nlisten_port = 1\n", env(&[])).is_err());
        let err = from_toml_with_env("", env(&[("SCOPEGATE_PROXY__ALLOW_ACCOUNT_KEYS", "yes")]))
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("SCOPEGATE_PROXY__ALLOW_ACCOUNT_KEYS"));
    }

    #[test]
    fn redaction_hides_the_admin_token() {
        let (_, raw) =
            from_toml_with_env("[admin]\ntoken = \"supersecretadmintoken\"\n", env(&[])).unwrap();
        let shown = render_redacted(&raw);
        assert!(!shown.contains("supersecretadmintoken"));
        assert!(shown.contains("<redacted>"));
    }
}
