//! Revocation fan-out between replicas sharing the Redis store.
//!
//! Every write to the store publishes one [`Message`]; each replica's subscription applies
//! it to its cache, so a revocation on one replica reaches the others in the time of one
//! publish. What the cache may trust follows the subscription: entries are tagged with the
//! subscription's epoch when they were confirmed, and an entry from another epoch (the
//! subscription dropped, so messages may have been missed) is re-confirmed against Redis
//! before it is used. A cache hit in the live epoch never touches the network.
//!
//! Two background loops per replica: the subscription (re-established with backoff) and a
//! once-a-second heartbeat: a `PUBLISH` on the channel that drives readiness (Redis
//! answered) and that the replica must hear back on its own subscription within
//! [`HEARTBEAT_TIMEOUT`], so a subscription connection that died silently (an idle
//! timeout in the network) is noticed and replaced, not trusted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use time::OffsetDateTime;

use super::redis_store::{RedisStore, CHANNEL, COMMAND_TIMEOUT};
use super::{codec, Record, ScopeTable, TokenDigest};
use crate::metrics::Metrics;

/// How often reachability is checked (readiness follows within about two of these).
const PING_INTERVAL: Duration = Duration::from_secs(1);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A subscription that has not delivered this replica's own heartbeat for this long is
/// treated as lost.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// What one replica knows about its link to Redis. Shared by the store, the table and
/// the loops; read on the hot path with two atomic loads.
pub struct FanoutHealth {
    /// This process's id in messages, so it skips its own.
    replica: String,
    reachable: AtomicBool,
    subscribed: AtomicBool,
    /// Bumped whenever the subscription comes up or goes down.
    epoch: AtomicU64,
    /// Bumped before every applied message and every loss: a lookup that read Redis
    /// while this moved re-reads, so a message racing a load cannot be lost.
    changes: AtomicU64,
    /// The last live epoch and when it ended: entries confirmed in it count as confirmed
    /// until then (no message arrived for them while it lived).
    lost: Mutex<Option<(u64, Instant)>>,
    /// When this replica last heard its own heartbeat (or change) on its subscription.
    heard_own: Mutex<Instant>,
    metrics: Metrics,
}

impl FanoutHealth {
    pub fn new(metrics: Metrics) -> Arc<Self> {
        metrics.set_store_up(false);
        metrics.set_fanout_subscribed(false);
        Arc::new(Self {
            replica: uuid::Uuid::new_v4().simple().to_string(),
            reachable: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            epoch: AtomicU64::new(1),
            changes: AtomicU64::new(0),
            lost: Mutex::new(None),
            heard_own: Mutex::new(Instant::now()),
            metrics,
        })
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Acquire)
    }

    /// The epoch cache entries confirmed now are tagged with.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether an entry confirmed in `epoch` may be used without asking Redis.
    pub fn trusts(&self, epoch: u64) -> bool {
        self.subscribed.load(Ordering::Acquire) && self.epoch.load(Ordering::Acquire) == epoch
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Until when an entry confirmed at `verified_at` in `epoch` counts as confirmed.
    pub fn confirmed_until(&self, epoch: u64, verified_at: Instant) -> Instant {
        match *self.lost.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((lost_epoch, lost_at)) if lost_epoch == epoch => lost_at.max(verified_at),
            _ => verified_at,
        }
    }

    /// A command failed or timed out (counted).
    pub fn command_failed(&self) {
        self.metrics.store_error();
    }

    /// Redis does not answer (`PING`, connecting): not ready until a `PING` answers.
    pub fn store_failed(&self) {
        self.metrics.store_error();
        if self.reachable.swap(false, Ordering::AcqRel) {
            self.metrics.set_store_up(false);
            tracing::warn!("Redis is not answering; cached scopes serve for scopes.max_staleness");
        }
    }

    fn store_answered(&self) {
        if !self.reachable.swap(true, Ordering::AcqRel) {
            self.metrics.set_store_up(true);
            tracing::info!("Redis answers");
        }
    }

    fn subscription_up(&self) {
        *self.heard_own.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        // Reads that started before this cannot have heard what was missed.
        self.changes.fetch_add(1, Ordering::AcqRel);
        self.subscribed.store(true, Ordering::Release);
        self.metrics.set_fanout_subscribed(true);
        tracing::info!(channel = CHANNEL, "subscribed to scope changes");
    }

    fn subscription_lost(&self) {
        if self.subscribed.swap(false, Ordering::AcqRel) {
            let epoch = self.epoch.fetch_add(1, Ordering::AcqRel);
            *self.lost.lock().unwrap_or_else(|e| e.into_inner()) = Some((epoch, Instant::now()));
            self.changes.fetch_add(1, Ordering::AcqRel);
            self.metrics.set_fanout_subscribed(false);
            tracing::warn!(
                "scope change subscription lost; cached scopes are re-confirmed before use"
            );
        }
    }
}

/// The end of a heartbeat message: `<replica> <unix ms> hb`.
pub const HEARTBEAT_MARK: &[u8] = b" hb";

/// One published change: `<replica> <unix ms> <digest hex> <record>`.
pub struct Message {
    pub at_ms: i64,
    pub digest: TokenDigest,
    pub record: Record,
}

impl Message {
    /// The text to publish for a record just written (`value` is its encoding).
    /// A heartbeat: proves the subscription still delivers.
    pub fn heartbeat(from: &str) -> Vec<u8> {
        let now_ms = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        format!("{from} {now_ms} hb").into_bytes()
    }

    pub fn encode(from: &str, digest: &TokenDigest, value: &[u8]) -> Vec<u8> {
        let now_ms = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let mut out = format!("{from} {now_ms} {} ", digest.to_hex()).into_bytes();
        out.extend_from_slice(value);
        out
    }

    pub fn parse(payload: &[u8]) -> Option<Self> {
        let mut parts = payload.splitn(4, |b| *b == b' ');
        parts.next()?; // the publishing replica
        let at_ms = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
        let hex = parts.next()?;
        if hex.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            bytes[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        let record = codec::decode(parts.next()?).ok()?;
        Some(Self {
            at_ms,
            digest: TokenDigest::from_bytes(bytes),
            record,
        })
    }
}

/// Starts the connection, subscription and ping loops; they end when the table is gone.
pub fn spawn(store: RedisStore, table: Weak<ScopeTable>) {
    let connecting = store.clone();
    let pinging = store.clone();
    let ping_table = table.clone();
    tokio::spawn(async move {
        connecting.connect_loop().await;
        if connecting.heartbeat().await.is_ok() {
            connecting.health().store_answered();
        }
        // A count for the gauge, now that the store can be read.
        if let Some(table) = table.upgrade() {
            table.recount().await;
        }
        subscribe_loop(connecting, table).await;
    });
    tokio::spawn(ping_loop(pinging, ping_table));
}

async fn ping_loop(store: RedisStore, table: Weak<ScopeTable>) {
    loop {
        if table.strong_count() == 0 {
            return;
        }
        match store.heartbeat().await {
            Ok(()) => store.health().store_answered(),
            Err(_) => {
                store.health().store_failed();
                // Messages may be going missing; stop trusting the cache (the subscription
                // loop sees it and resubscribes).
                store.health().subscription_lost();
            }
        }
        tokio::time::sleep(PING_INTERVAL).await;
    }
}

async fn subscribe_loop(store: RedisStore, table: Weak<ScopeTable>) {
    let health = Arc::clone(store.health());
    let mut backoff = BACKOFF_FIRST;
    loop {
        if table.strong_count() == 0 {
            return;
        }
        let attempt = async {
            let mut pubsub = store.client().get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(COMMAND_TIMEOUT * 2, attempt).await {
            Ok(Ok(mut pubsub)) => {
                backoff = BACKOFF_FIRST;
                health.subscription_up();
                let mut messages = pubsub.on_message();
                let mut watchdog = tokio::time::interval(PING_INTERVAL);
                loop {
                    tokio::select! {
                        message = messages.next() => match message {
                            Some(message) => {
                                let Some(table) = table.upgrade() else { return };
                                apply(&table, &health, message.get_payload_bytes()).await;
                            }
                            None => break,
                        },
                        _ = watchdog.tick() => {
                            if !health.is_subscribed() {
                                break;
                            }
                            let silent = health.heard_own.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                            if silent > HEARTBEAT_TIMEOUT {
                                tracing::warn!(?silent, "own heartbeat not heard on the subscription; resubscribing");
                                break;
                            }
                        }
                    }
                }
                health.subscription_lost();
            }
            Ok(Err(error)) => tracing::debug!(%error, "subscribing to scope changes failed"),
            Err(_) => tracing::debug!("subscribing to scope changes timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn apply(table: &ScopeTable, health: &FanoutHealth, payload: &[u8]) {
    let from = payload.split(|b| *b == b' ').next().unwrap_or_default();
    if from == health.replica.as_bytes() {
        // Our own heartbeat or change, back through Redis: the subscription is alive.
        *health.heard_own.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        return;
    }
    if payload.ends_with(HEARTBEAT_MARK) {
        return;
    }
    let Some(message) = Message::parse(payload) else {
        tracing::warn!("ignoring an unreadable scope change message");
        return;
    };
    let now_ms = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let lag_ms = (now_ms - i128::from(message.at_ms)).max(0);
    health.metrics.fanout_received(lag_ms as f64 / 1000.0);
    health.changes.fetch_add(1, Ordering::AcqRel);
    table.apply_change(message.digest, message.record).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::Tombstone;

    #[test]
    fn messages_round_trip_and_hold_no_token() {
        let digest = TokenDigest::of("rlcr-abcdefghijklmnop1234");
        let now = OffsetDateTime::now_utc();
        let record = Record::Revoked(Tombstone {
            revoked_at: now,
            retain_until: now,
        });
        let bytes = Message::encode("r1", &digest, &codec::encode(&record));
        assert!(!String::from_utf8_lossy(&bytes).contains("rlcr-"));
        let parsed = Message::parse(&bytes).unwrap();
        assert_eq!(parsed.digest, digest);
        assert!(matches!(parsed.record, Record::Revoked(_)));
        assert!(Message::parse(b"r1 12 abc {}").is_none());
        assert!(Message::parse(b"garbage").is_none());
    }
}
