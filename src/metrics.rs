//! Prometheus metrics (SPEC §9) behind one typed handle.
//!
//! Every label value comes from a closed enum, and every label child is resolved once at
//! start-up, so recording is an atomic add with no hashing, locking or allocation, and no
//! request-supplied string can ever become a label.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::refusal::Refusal;
use crate::scope::Source;

/// Which listener a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Proxy,
    Admin,
}

impl Listener {
    const ALL: [Listener; 2] = [Listener::Proxy, Listener::Admin];

    pub const fn as_str(self) -> &'static str {
        match self {
            Listener::Proxy => "proxy",
            Listener::Admin => "admin",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// The decision label: `allowed` or a refusal code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Refused(Refusal),
}

impl Decision {
    pub const fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Refused(r) => r.code(),
        }
    }

    const fn index(self) -> usize {
        match self {
            Decision::Allowed => 0,
            Decision::Refused(r) => 1 + r.index(),
        }
    }
}

const DECISIONS: usize = 1 + Refusal::ALL.len();

/// How a request ended, for the duration histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Forwarded,
    Refused,
}

/// The upstream's answer class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamClass {
    Status(u16),
    Error,
    Timeout,
}

impl UpstreamClass {
    /// SPEC §9's closed set. A final 1xx answer cannot come through hyper's client (and
    /// `Upgrade` is never forwarded), so one would be an upstream protocol error.
    const LABELS: [&'static str; 6] = ["2xx", "3xx", "4xx", "5xx", "error", "timeout"];

    fn index(self) -> usize {
        match self {
            UpstreamClass::Status(s) if (200..600).contains(&s) => usize::from(s / 100) - 2,
            UpstreamClass::Status(_) | UpstreamClass::Error => 4,
            UpstreamClass::Timeout => 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupTier {
    Cache,
    Store,
    Introspection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupResult {
    Hit,
    Miss,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// The handle every component records through. Cloning is cheap (one `Arc`).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: [[IntCounter; DECISIONS]; 2],
    request_duration: [[Histogram; 2]; 2],
    upstream_duration: Histogram,
    upstream_responses: [IntCounter; 6],
    scope_lookups: [[IntCounter; 3]; 3],
    scope_entries: IntGauge,
    tokens_learned: [IntCounter; 3],
    tokens_revoked: [IntCounter; 3],
    inflight: [IntGauge; 2],
    body_bytes: [IntCounter; 2],
    config_reloads: [IntCounter; 2],
    store_errors: IntCounter,
    store_up: IntGauge,
    fanout_subscribed: IntGauge,
    fanout_lag: Histogram,
}

impl Metrics {
    /// Registers every metric of SPEC §9. Fails only on a programming error (duplicate
    /// or invalid metric definitions), which start-up reports.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();

        let requests_vec = IntCounterVec::new(
            Opts::new(
                "scopegate_requests_total",
                "Requests by listener and decision.",
            ),
            &["listener", "decision"],
        )?;
        registry.register(Box::new(requests_vec.clone()))?;
        let requests = Listener::ALL.map(|l| {
            std::array::from_fn(|i| {
                let decision = if i == 0 {
                    "allowed"
                } else {
                    Refusal::ALL[i - 1].code()
                };
                requests_vec.with_label_values(&[l.as_str(), decision])
            })
        });

        let duration_vec = HistogramVec::new(
            HistogramOpts::new(
                "scopegate_request_duration_seconds",
                "Time from request head to the end of the response body.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["listener", "outcome"],
        )?;
        registry.register(Box::new(duration_vec.clone()))?;
        let request_duration = Listener::ALL.map(|l| {
            [
                duration_vec.with_label_values(&[l.as_str(), "forwarded"]),
                duration_vec.with_label_values(&[l.as_str(), "refused"]),
            ]
        });

        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "scopegate_upstream_duration_seconds",
                "Time from sending a request upstream to its response head.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(upstream_duration.clone()))?;

        let upstream_vec = IntCounterVec::new(
            Opts::new(
                "scopegate_upstream_responses_total",
                "Upstream answers by status class, or error/timeout.",
            ),
            &["class"],
        )?;
        registry.register(Box::new(upstream_vec.clone()))?;
        let upstream_responses =
            UpstreamClass::LABELS.map(|c| upstream_vec.with_label_values(&[c]));

        let lookups_vec = IntCounterVec::new(
            Opts::new(
                "scopegate_scope_lookups_total",
                "Scope lookups by tier and result.",
            ),
            &["tier", "result"],
        )?;
        registry.register(Box::new(lookups_vec.clone()))?;
        let scope_lookups = ["cache", "store", "introspection"]
            .map(|t| ["hit", "miss", "error"].map(|r| lookups_vec.with_label_values(&[t, r])));

        let scope_entries = IntGauge::new(
            "scopegate_scope_entries",
            "Active token scopes in the store.",
        )?;
        registry.register(Box::new(scope_entries.clone()))?;

        let learned_vec = IntCounterVec::new(
            Opts::new(
                "scopegate_tokens_learned_total",
                "Token scopes learned, by source.",
            ),
            &["source"],
        )?;
        registry.register(Box::new(learned_vec.clone()))?;
        let tokens_learned = Source::ALL.map(|s| learned_vec.with_label_values(&[s.as_str()]));

        let revoked_vec = IntCounterVec::new(
            Opts::new(
                "scopegate_tokens_revoked_total",
                "Tokens revoked, by source.",
            ),
            &["source"],
        )?;
        registry.register(Box::new(revoked_vec.clone()))?;
        let tokens_revoked = Source::ALL.map(|s| revoked_vec.with_label_values(&[s.as_str()]));

        let inflight_vec = IntGaugeVec::new(
            Opts::new("scopegate_inflight_requests", "Requests in flight."),
            &["listener"],
        )?;
        registry.register(Box::new(inflight_vec.clone()))?;
        let inflight = Listener::ALL.map(|l| inflight_vec.with_label_values(&[l.as_str()]));

        let bytes_vec = IntCounterVec::new(
            Opts::new(
                "scopegate_body_bytes_total",
                "Body bytes forwarded, by direction.",
            ),
            &["direction"],
        )?;
        registry.register(Box::new(bytes_vec.clone()))?;
        let body_bytes = ["request", "response"].map(|d| bytes_vec.with_label_values(&[d]));

        let reloads_vec = IntCounterVec::new(
            Opts::new(
                "scopegate_config_reloads_total",
                "Config reloads (SIGHUP) by result.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reloads_vec.clone()))?;
        let config_reloads = ["success", "failure"].map(|r| reloads_vec.with_label_values(&[r]));

        let store_errors = IntCounter::new(
            "scopegate_store_errors_total",
            "Scope store commands that failed or timed out (Redis).",
        )?;
        registry.register(Box::new(store_errors.clone()))?;
        let store_up = IntGauge::new(
            "scopegate_store_up",
            "1 while the scope store answers (Redis: its once-a-second heartbeat).",
        )?;
        registry.register(Box::new(store_up.clone()))?;
        store_up.set(1);
        let fanout_subscribed = IntGauge::new(
            "scopegate_fanout_subscribed",
            "1 while subscribed to other replicas' scope changes (Redis store).",
        )?;
        registry.register(Box::new(fanout_subscribed.clone()))?;
        let fanout_lag = Histogram::with_opts(
            HistogramOpts::new(
                "scopegate_fanout_lag_seconds",
                "From another replica publishing a scope change to this replica applying it.",
            )
            .buckets(FANOUT_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(fanout_lag.clone()))?;

        let build_info = IntGaugeVec::new(
            Opts::new("scopegate_build_info", "Build information; always 1."),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        Ok(Self {
            inner: Arc::new(Inner {
                registry,
                requests,
                request_duration,
                upstream_duration,
                upstream_responses,
                scope_lookups,
                scope_entries,
                tokens_learned,
                tokens_revoked,
                inflight,
                body_bytes,
                config_reloads,
                store_errors,
                store_up,
                fanout_subscribed,
                fanout_lag,
            }),
        })
    }

    /// One call per finished request.
    pub fn request_done(&self, listener: Listener, decision: Decision, elapsed: Duration) {
        if PER_REQUEST_OFF {
            return;
        }
        let l = listener.index();
        self.inner.requests[l][decision.index()].inc();
        let outcome = match decision {
            Decision::Allowed => Outcome::Forwarded,
            Decision::Refused(_) => Outcome::Refused,
        };
        self.inner.request_duration[l][outcome as usize].observe(elapsed.as_secs_f64());
    }

    pub fn upstream_answered(&self, class: UpstreamClass, elapsed: Option<Duration>) {
        if PER_REQUEST_OFF {
            return;
        }
        self.inner.upstream_responses[class.index()].inc();
        if let Some(elapsed) = elapsed {
            self.inner.upstream_duration.observe(elapsed.as_secs_f64());
        }
    }

    pub fn scope_lookup(&self, tier: LookupTier, result: LookupResult) {
        if PER_REQUEST_OFF {
            return;
        }
        self.inner.scope_lookups[tier as usize][result as usize].inc();
    }

    pub fn set_scope_entries(&self, count: i64) {
        self.inner.scope_entries.set(count);
    }

    pub fn token_learned(&self, source: Source) {
        self.inner.tokens_learned[source.index()].inc();
    }

    pub fn token_revoked(&self, source: Source) {
        self.inner.tokens_revoked[source.index()].inc();
    }

    /// Counts a request in flight until the returned guard drops.
    pub fn inflight(&self, listener: Listener) -> InflightGuard {
        if PER_REQUEST_OFF {
            return InflightGuard(None);
        }
        let gauge = self.inner.inflight[listener.index()].clone();
        gauge.inc();
        InflightGuard(Some(gauge))
    }

    pub fn body_bytes(&self, direction: Direction, n: u64) {
        if PER_REQUEST_OFF {
            return;
        }
        self.inner.body_bytes[direction as usize].inc_by(n);
    }

    /// Requests in flight right now on a listener.
    pub fn inflight_count(&self, listener: Listener) -> i64 {
        self.inner.inflight[listener.index()].get()
    }

    pub fn store_error(&self) {
        self.inner.store_errors.inc();
    }

    pub fn set_store_up(&self, up: bool) {
        self.inner.store_up.set(i64::from(up));
    }

    pub fn set_fanout_subscribed(&self, subscribed: bool) {
        self.inner.fanout_subscribed.set(i64::from(subscribed));
    }

    /// A change from another replica, applied `lag_seconds` after it was published.
    pub fn fanout_received(&self, lag_seconds: f64) {
        self.inner.fanout_lag.observe(lag_seconds);
    }

    pub fn config_reloaded(&self, success: bool) {
        self.inner.config_reloads[usize::from(!success)].inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure here would be a malformed
        // metric family, and an empty scrape is the honest answer to that.
        if TextEncoder::new()
            .encode(&self.inner.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        out
    }
}

/// Decrements the in-flight gauge when the request (including its body) is done.
pub struct InflightGuard(Option<IntGauge>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.dec();
        }
    }
}

/// The `bench-metrics-off` build (only for `scripts/bench`'s metrics on/off comparison)
/// records nothing per request; the families still exist, so `/metrics` keeps its shape.
const PER_REQUEST_OFF: bool = cfg!(feature = "bench-metrics-off");

/// Fan-out lag: 0.5 ms (same host) to 10 s (a replica that fell behind).
const FANOUT_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// 100 µs (a local refusal) to 60 s (long uploads and agent runs; longer lands in +Inf).
const DURATION_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_closed_labels() {
        let m = Metrics::new().unwrap();
        m.request_done(
            Listener::Proxy,
            Decision::Refused(Refusal::RepoOutOfScope),
            Duration::from_millis(1),
        );
        m.upstream_answered(UpstreamClass::Status(429), Some(Duration::from_millis(2)));
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            "scopegate_requests_total{decision=\"repo_out_of_scope\",listener=\"proxy\"} 1"
        ));
        assert!(text.contains("scopegate_upstream_responses_total{class=\"4xx\"} 1"));
        assert!(text.contains("scopegate_build_info{version=\""));
    }
}
