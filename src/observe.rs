//! The per-request record: one metrics update and one structured log line, emitted once
//! when the response body is finished (SPEC §9, §10).

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method};

use crate::body::BodyStats;
use crate::metrics::{Decision, InflightGuard, Listener, Metrics};
use crate::scope::{Permit, TokenId};

/// Everything the log line needs, gathered as the request is decided.
pub struct RequestRecord {
    start: Instant,
    listener: Listener,
    method: Method,
    /// A route class, never the path (paths can carry tokens and repo ids).
    route: &'static str,
    request_id: HeaderValue,
    token_id: Option<TokenId>,
    permit: Option<Permit>,
    decision: Decision,
    status: u16,
    bytes_in: Option<Arc<BodyStats>>,
    bytes_out: Option<Arc<BodyStats>>,
    /// Bytes of a body scopegate wrote itself (refusals), known up front.
    own_bytes_out: u64,
    aborted: bool,
    metrics: Metrics,
    _inflight: InflightGuard,
}

impl RequestRecord {
    pub fn start(
        metrics: &Metrics,
        listener: Listener,
        method: &Method,
        request_id: HeaderValue,
    ) -> Self {
        Self {
            start: Instant::now(),
            listener,
            method: method.clone(),
            route: "unknown",
            request_id,
            token_id: None,
            permit: None,
            decision: Decision::Allowed,
            status: 0,
            bytes_in: None,
            bytes_out: None,
            own_bytes_out: 0,
            aborted: false,
            metrics: metrics.clone(),
            _inflight: metrics.inflight(listener),
        }
    }

    pub fn request_id(&self) -> &HeaderValue {
        &self.request_id
    }

    pub fn set_route(&mut self, route: &'static str) {
        self.route = route;
    }

    pub fn set_token_id(&mut self, id: TokenId) {
        self.token_id = Some(id);
    }

    pub fn set_permit(&mut self, permit: Permit) {
        self.token_id = permit.token_id().or(self.token_id);
        self.permit = Some(permit);
    }

    pub fn set_decision(&mut self, decision: Decision) {
        self.decision = decision;
    }

    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    pub fn set_byte_counters(&mut self, bytes_in: Arc<BodyStats>, bytes_out: Arc<BodyStats>) {
        self.bytes_in = Some(bytes_in);
        self.bytes_out = Some(bytes_out);
    }

    pub fn set_own_bytes_out(&mut self, n: u64) {
        self.own_bytes_out = n;
    }

    pub fn mark_aborted(&mut self) {
        self.aborted = true;
    }

    /// Records the metrics and writes the log line.
    pub fn finish(self) {
        let elapsed = self.start.elapsed();
        self.metrics
            .request_done(self.listener, self.decision, elapsed);
        let read = |c: &Option<Arc<BodyStats>>| c.as_ref().map_or(0, |c| c.bytes());
        let token_id = self.token_id.as_ref().map(TokenId::as_str).unwrap_or("");
        let token_name = self
            .permit
            .as_ref()
            .and_then(Permit::token_name)
            .unwrap_or("");
        tracing::info!(
            target: "scopegate::access",
            request_id = self.request_id.to_str().unwrap_or(""),
            listener = self.listener.as_str(),
            method = self.method.as_str(),
            route = self.route,
            token_id,
            token_name,
            decision = self.decision.as_str(),
            status = self.status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            bytes_in = read(&self.bytes_in),
            bytes_out = read(&self.bytes_out) + self.own_bytes_out,
            aborted = self.aborted,
            "request"
        );
    }
}
