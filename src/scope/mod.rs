//! The scope table: which token may touch which repos, and the decision of SPEC §4 rows
//! 6–11 that turns a [`Target`] into a [`Permit`].
//!
//! Tiers, hottest first: a bounded moka cache keyed by [`TokenDigest`] → the [`Store`]
//! (memory, or the durable embedded file) → introspection at the upstream. Tokens are
//! never keys or values anywhere here, only digests; the plaintext is borrowed from the
//! request for the one upstream call that needs it. This module knows nothing of HTTP
//! statuses; it answers in [`Refusal`]s.

mod codec;
mod digest;
mod embedded;
mod entry;
mod fanout;
pub mod introspect;
mod redis_store;
mod store;

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::ops::compute::Op;
use moka::Expiry;
use time::OffsetDateTime;

pub use digest::{TokenDigest, TokenId, TOKEN_ID_LEN};
pub use embedded::EmbeddedStore;
pub use entry::{ScopeEntry, Source};
pub use fanout::FanoutHealth;
pub use redis_store::RedisStore;
pub use store::{Store, StoreError};

use crate::metrics::{LookupResult, LookupTier, Metrics};
use crate::refusal::Refusal;
use crate::request::{Credential, Target, TokenSecret};
use introspect::{Answer, Introspector, KnownScope};

/// How long a revoked token without an expiry is remembered as revoked. Past it the
/// token reads as unknown, which is refused just the same.
pub const TOMBSTONE_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Expired entries and tombstones are kept this long past their time, so a client sees
/// `token_expired` (not `unknown_token`) for a while, then swept.
pub const SWEEP_GRACE: Duration = Duration::from_secs(3600);
/// How long past `revalidate_after` an entry may still be served while it is re-confirmed
/// in the background; older entries are re-confirmed before the request is answered, so
/// a token deleted upstream is refused within `revalidate_after` plus this.
const STALE_GRACE: Duration = Duration::from_secs(1);
/// After a failed revalidation, the next attempt for that token waits this long.
const REVALIDATION_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// How long a replica waits for another replica's introspection of the same token
/// before asking the upstream itself, and how often it looks.
const SHARED_INTROSPECTION_WAIT: Duration = Duration::from_secs(2);
const SHARED_INTROSPECTION_POLL: Duration = Duration::from_millis(20);

/// A token the table knows, with when it was last confirmed (by the upstream, a mint or
/// a registration).
#[derive(Debug, Clone)]
pub struct Active {
    pub entry: Arc<ScopeEntry>,
    pub confirmed_at: OffsetDateTime,
}

/// A revoked token, remembered until `retain_until`.
#[derive(Debug, Clone)]
pub struct Tombstone {
    pub revoked_at: OffsetDateTime,
    pub retain_until: OffsetDateTime,
}

/// What a store holds for one digest.
#[derive(Debug, Clone)]
pub enum Record {
    Active(Active),
    /// Revoked tokens answer `token_revoked`, not `unknown_token`.
    Revoked(Tombstone),
}

impl KnownScope {
    /// The record of a scope the upstream just confirmed.
    fn into_record(self, source: Source) -> Record {
        Record::Active(Active {
            entry: Arc::new(ScopeEntry {
                name: self.name.into(),
                repo_ids: self.repo_ids.into(),
                expires_at: self.expires_at,
                source,
            }),
            confirmed_at: OffsetDateTime::now_utc(),
        })
    }
}

/// What the cache holds: a record, or "nobody knows this token" for `negative_ttl`.
#[derive(Debug, Clone)]
enum Cached {
    Known(Record),
    Unknown,
}

/// A cache entry with when, and in which fan-out epoch, it was confirmed against the
/// store (only the Redis store reads these).
#[derive(Debug, Clone)]
struct Slot {
    cached: Cached,
    epoch: u64,
    verified_at: Instant,
    /// The fan-out change counter just before the store was read.
    changes: u64,
}

/// Taken before a store read: the fan-out epoch and the change counter at that moment.
/// A slot made from the read carries them, so a change that crossed the read is seen.
#[derive(Debug, Clone, Copy)]
struct Stamp {
    epoch: u64,
    changes: u64,
}

/// Negative entries expire after `negative_ttl`; known ones stay until evicted by
/// capacity or replaced.
struct CacheExpiry {
    negative_ttl: Duration,
}

impl Expiry<TokenDigest, Slot> for CacheExpiry {
    fn expire_after_create(&self, _: &TokenDigest, value: &Slot, _: Instant) -> Option<Duration> {
        match value.cached {
            Cached::Unknown => Some(self.negative_ttl),
            Cached::Known(_) => None,
        }
    }

    fn expire_after_update(
        &self,
        key: &TokenDigest,
        value: &Slot,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, now)
    }
}

/// The coalescing map for inline re-confirmations: an entry only lives long enough for
/// concurrent requests to share one upstream call.
fn confirming_cache() -> Cache<TokenDigest, ()> {
    Cache::builder()
        .max_capacity(100_000)
        .time_to_live(Duration::from_millis(100))
        .build()
}

/// Proof that a request may be forwarded. Only [`ScopeTable::authorize`] makes one, and
/// forwarding takes one, so an unauthorized forward does not compile.
#[derive(Debug, Clone)]
pub struct Permit {
    token: Option<(TokenId, Arc<ScopeEntry>)>,
}

impl Permit {
    /// The token's public id, when a repo token was presented.
    pub fn token_id(&self) -> Option<TokenId> {
        self.token.as_ref().map(|(id, _)| *id)
    }

    pub fn token_name(&self) -> Option<&str> {
        self.token.as_ref().map(|(_, e)| &*e.name)
    }
}

/// An entry as listed by the admin API.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: TokenId,
    pub entry: Arc<ScopeEntry>,
}

/// Why a token could not be learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LearnError {
    /// It was revoked: a replayed mint answer or registration must not resurrect it.
    Revoked,
    /// The store could not record it, so it is not acknowledged.
    Store(StoreError),
}

/// Tunables of the table (from `[scopes]`).
#[derive(Debug, Clone)]
pub struct TableSettings {
    pub cache_capacity: u64,
    pub negative_ttl: Duration,
    pub revalidate_after: Duration,
    /// Redis store: how long cached scopes serve while Redis cannot confirm them.
    pub max_staleness: Duration,
}

/// The scope table with its tiers.
pub struct ScopeTable {
    cache: Cache<TokenDigest, Slot>,
    store: Store,
    introspector: Option<Introspector>,
    settings: TableSettings,
    metrics: Metrics,
    /// Active entries in the store, kept incrementally (a count by scan would be O(n)).
    active: AtomicI64,
    /// Digests with a revalidation in flight, so a busy token triggers one at a time.
    revalidating: Mutex<HashSet<TokenDigest>>,
    /// Coalesces inline re-confirmations of idle entries (one upstream call per token).
    confirming: Cache<TokenDigest, ()>,
    /// Bumped by every local learn and revoke (fan-out and subscription changes count in
    /// [`FanoutHealth::changes`]): a lookup whose store read crossed one reads again.
    changes: AtomicU64,
}

impl ScopeTable {
    /// Builds the table over an opened store and counts its active entries.
    pub async fn open(
        settings: TableSettings,
        store: Store,
        introspector: Option<Introspector>,
        metrics: Metrics,
    ) -> Result<Arc<Self>, StoreError> {
        // Redis connects in the background (the gateway starts unready without it) and
        // counts once connected; the local stores count now.
        let active = match store {
            Store::Redis(_) => 0,
            _ => store
                .snapshot()
                .await?
                .iter()
                .filter(|(_, r)| matches!(r, Record::Active(_)))
                .count(),
        };
        let cache = Cache::builder()
            .max_capacity(settings.cache_capacity)
            .expire_after(CacheExpiry {
                negative_ttl: settings.negative_ttl,
            })
            .build();
        let table = Arc::new(Self {
            cache,
            store,
            introspector,
            settings,
            metrics,
            active: AtomicI64::new(i64::try_from(active).unwrap_or(i64::MAX)),
            revalidating: Mutex::new(HashSet::new()),
            confirming: confirming_cache(),
            changes: AtomicU64::new(0),
        });
        table.publish_count();
        if let Store::Redis(redis) = &table.store {
            fanout::spawn(redis.clone(), Arc::downgrade(&table));
        }
        Ok(table)
    }

    /// A memory-backed table without introspection (tests, benches).
    pub async fn in_memory(cache_capacity: u64, metrics: Metrics) -> Arc<Self> {
        let settings = TableSettings {
            cache_capacity,
            negative_ttl: Duration::from_secs(10),
            revalidate_after: Duration::from_secs(60),
            max_staleness: Duration::from_secs(30),
        };
        match Self::open(settings.clone(), Store::memory(), None, metrics.clone()).await {
            Ok(table) => table,
            // The memory store cannot fail to open; build the same thing by hand.
            Err(_) => Arc::new(Self {
                cache: Cache::new(cache_capacity),
                store: Store::memory(),
                introspector: None,
                settings,
                metrics,
                active: AtomicI64::new(0),
                revalidating: Mutex::new(HashSet::new()),
                confirming: confirming_cache(),
                changes: AtomicU64::new(0),
            }),
        }
    }

    /// SPEC §4 rows 6–11 for a target that passed rows 1–5. `secret` yields the
    /// presented token, and is called only when the upstream must be asked about it.
    pub async fn authorize(
        self: &Arc<Self>,
        target: &Target,
        secret: impl FnOnce() -> Option<TokenSecret>,
    ) -> Result<Permit, Refusal> {
        let digest = match target.credential {
            Credential::RepoToken(digest) => digest,
            // Account keys are only here when `proxy.allow_account_keys` let them through;
            // the upstream checks them. The operation policy still applies.
            Credential::AccountKey => {
                return if target.denied_by_policy {
                    Err(Refusal::OperationNotAllowed)
                } else {
                    Ok(Permit { token: None })
                };
            }
        };
        let mut secret = Some(secret);
        let cached = self.lookup(digest, &mut secret).await?;
        let mut active = match cached {
            Cached::Unknown => return Err(Refusal::UnknownToken),
            Cached::Known(Record::Revoked(_)) => return Err(Refusal::TokenRevoked),
            Cached::Known(Record::Active(active)) => active,
        };
        let now = OffsetDateTime::now_utc();
        // Expired tokens are refused as such; asking the upstream about them would only
        // turn `token_expired` into a revocation.
        let age = now - active.confirmed_at;
        if self.introspector.is_some()
            && age >= self.settings.revalidate_after
            && !active.entry.is_expired_at(now)
        {
            if let Some(token) = secret.take().and_then(|f| f()) {
                if age < self.settings.revalidate_after + STALE_GRACE {
                    // Stale-while-revalidate: this request proceeds on the entry it has.
                    self.spawn_revalidation(digest, token);
                } else {
                    // Idle for longer than that: a token deleted upstream meanwhile must
                    // not be forwarded once more, so confirm before answering (coalesced
                    // per token; an upstream error keeps the entry).
                    let table = Arc::clone(self);
                    let _ = self
                        .confirming
                        .try_get_with(digest, async move {
                            table.revalidate(digest, token).await;
                            Ok::<(), ()>(())
                        })
                        .await;
                    match self.current(&digest).await {
                        Some(Record::Active(fresh)) => active = fresh,
                        Some(Record::Revoked(_)) => return Err(Refusal::TokenRevoked),
                        None => {}
                    }
                }
            }
        }
        let entry = active.entry;
        if entry.is_expired_at(now) {
            return Err(Refusal::TokenExpired);
        }
        if !entry.covers(&target.repo_id) {
            return Err(Refusal::RepoOutOfScope);
        }
        if target.denied_by_policy {
            return Err(Refusal::OperationNotAllowed);
        }
        Ok(Permit {
            token: Some((digest.id(), entry)),
        })
    }

    /// The freshest record this replica holds for a digest, without asking upstream.
    async fn current(&self, digest: &TokenDigest) -> Option<Record> {
        if self.store.is_memory() {
            return self.store.get(digest).await.ok().flatten();
        }
        match self.cache.get(digest).await {
            Some(Slot {
                cached: Cached::Known(record),
                ..
            }) => Some(record),
            _ => None,
        }
    }

    /// Taken before a store read; see [`Stamp`].
    fn stamp(&self) -> Stamp {
        Stamp {
            epoch: self.store.fanout().map_or(0, |h| h.epoch()),
            changes: self.changes_now(),
        }
    }

    fn changes_now(&self) -> u64 {
        self.changes
            .load(Ordering::Acquire)
            .wrapping_add(self.store.fanout().map_or(0, |h| h.changes()))
    }

    fn note_change(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// A cache entry for something read from (or written to) the store after `stamp`.
    fn slot(&self, cached: Cached, stamp: Stamp) -> Slot {
        Slot {
            cached,
            epoch: stamp.epoch,
            verified_at: Instant::now(),
            changes: stamp.changes,
        }
    }

    /// Caches a slot, except over a revocation: a token revoked here stays revoked in
    /// this cache whatever older read or message arrives later (revocations are final).
    async fn put_slot(&self, digest: TokenDigest, slot: Slot) {
        let revoking = matches!(slot.cached, Cached::Known(Record::Revoked(_)));
        self.cache
            .entry(digest)
            .and_compute_with(|existing| async move {
                let holds_revocation = existing
                    .is_some_and(|e| matches!(e.value().cached, Cached::Known(Record::Revoked(_))));
                if holds_revocation && !revoking {
                    Op::Nop
                } else {
                    Op::Put(slot)
                }
            })
            .await;
    }

    /// Caches what a read after `stamp` found, unless a change crossed the read: then it
    /// reads once more (a revocation may have been applied and then overwritten by this
    /// older answer). `fallback` is what to keep if the store has nothing (e.g. an
    /// introspection answer, or unknown). A failing re-read drops the entry.
    async fn settle(
        &self,
        digest: TokenDigest,
        found: Cached,
        stamp: Stamp,
    ) -> Result<Cached, Refusal> {
        if self.changes_now() == stamp.changes {
            // The memory store is read directly; its cache holds only negatives.
            if !(self.store.is_memory() && matches!(found, Cached::Known(_))) {
                self.put_slot(digest, self.slot(found.clone(), stamp)).await;
            }
            return Ok(found);
        }
        let again = self.stamp();
        match self.store.get(&digest).await {
            Ok(record) => {
                let fresh = record.map_or(found, Cached::Known);
                let memory_known = self.store.is_memory() && matches!(fresh, Cached::Known(_));
                if self.changes_now() == again.changes && !memory_known {
                    self.put_slot(digest, self.slot(fresh.clone(), again)).await;
                } else {
                    // Still moving: cache nothing; the next request reads again.
                    self.cache.invalidate(&digest).await;
                }
                Ok(fresh)
            }
            Err(_) => {
                self.cache.invalidate(&digest).await;
                Err(Refusal::ScopeUnavailable)
            }
        }
    }

    /// Makes a record written to the store visible to the next lookup: cached, or (with
    /// the memory store, which lookups read directly) any older cache entry dropped.
    async fn remember(&self, digest: TokenDigest, record: Record) {
        if self.store.is_memory() {
            self.cache.invalidate(&digest).await;
        } else {
            let slot = self.slot(Cached::Known(record), self.stamp());
            self.put_slot(digest, slot).await;
        }
    }

    /// A change another replica published: cached copies are replaced; tokens this
    /// replica has not looked up are read from the store when they are.
    async fn apply_change(&self, digest: TokenDigest, record: Record) {
        if self.cache.contains_key(&digest) {
            let slot = self.slot(Cached::Known(record), self.stamp());
            self.put_slot(digest, slot).await;
        }
    }

    /// Counts the store's active entries again (Redis: other replicas add and remove).
    async fn recount(&self) {
        match self.store.snapshot().await {
            Ok(records) => {
                let active = records
                    .iter()
                    .filter(|(_, r)| matches!(r, Record::Active(_)))
                    .count();
                self.active
                    .store(i64::try_from(active).unwrap_or(i64::MAX), Ordering::Relaxed);
                self.publish_count();
            }
            Err(error) => tracing::warn!(%error, "counting the scope store failed"),
        }
    }

    /// Cache, then (once per digest, however many ask at the same time) store and
    /// introspection. Failures are not cached.
    async fn lookup<F>(
        &self,
        digest: TokenDigest,
        secret: &mut Option<F>,
    ) -> Result<Cached, Refusal>
    where
        F: FnOnce() -> Option<TokenSecret>,
    {
        // With the memory store the store is itself the in-memory tier: read it directly
        // (and count it as the cache), so entries are not held twice. The moka cache then
        // holds only negative and in-flight lookups.
        if self.store.is_memory() {
            if let Ok(Some(record)) = self.store.get(&digest).await {
                self.metrics
                    .scope_lookup(LookupTier::Cache, LookupResult::Hit);
                return Ok(Cached::Known(record));
            }
        }
        if let Some(slot) = self.cache.get(&digest).await {
            match self.store.fanout() {
                Some(health) if !health.trusts(slot.epoch) => {
                    // Confirmed while fan-out messages may have been missed: ask Redis.
                    if let Some(cached) = self.reconfirm(digest, &slot, health).await? {
                        return Ok(cached);
                    }
                    // Gone from Redis (and not merely expired): look it up afresh.
                }
                _ => {
                    self.metrics
                        .scope_lookup(LookupTier::Cache, LookupResult::Hit);
                    return Ok(slot.cached);
                }
            }
        }
        self.metrics
            .scope_lookup(LookupTier::Cache, LookupResult::Miss);
        let token = if self.introspector.is_some() {
            secret.take().and_then(|f| f())
        } else {
            None
        };
        let slot = self
            .cache
            .try_get_with(digest, self.load(digest, token))
            .await
            .map_err(|_| Refusal::ScopeUnavailable)?;
        if self.changes_now() != slot.changes {
            // A change (a local revoke, a published one) crossed this load's read, and the
            // cache may now hold this older answer over it: settle reads once more.
            let stamp = Stamp {
                epoch: slot.epoch,
                changes: slot.changes,
            };
            return self.settle(digest, slot.cached, stamp).await;
        }
        Ok(slot.cached)
    }

    /// Re-reads a cached entry from Redis. While Redis cannot answer, the entry serves
    /// until `max_staleness` past its last confirmation, then the token is refused 503.
    /// `None`: Redis no longer has it (the caller looks it up like an unknown token).
    async fn reconfirm(
        &self,
        digest: TokenDigest,
        slot: &Slot,
        health: &FanoutHealth,
    ) -> Result<Option<Cached>, Refusal> {
        if health.is_reachable() {
            let stamp = self.stamp();
            match self.store.get(&digest).await {
                Ok(Some(record)) => {
                    self.metrics
                        .scope_lookup(LookupTier::Store, LookupResult::Hit);
                    return self
                        .settle(digest, Cached::Known(record), stamp)
                        .await
                        .map(Some);
                }
                Ok(None) => {
                    self.metrics
                        .scope_lookup(LookupTier::Store, LookupResult::Miss);
                    self.cache.invalidate(&digest).await;
                    // Redis drops a scope at its expiry: still answer `token_expired`.
                    if let Cached::Known(Record::Active(active)) = &slot.cached {
                        if active.entry.is_expired_at(OffsetDateTime::now_utc()) {
                            return Ok(Some(slot.cached.clone()));
                        }
                    }
                    return Ok(None);
                }
                Err(_) => self
                    .metrics
                    .scope_lookup(LookupTier::Store, LookupResult::Error),
            }
        }
        let confirmed = health.confirmed_until(slot.epoch, slot.verified_at);
        if confirmed.elapsed() <= self.settings.max_staleness {
            Ok(Some(slot.cached.clone()))
        } else {
            Err(Refusal::ScopeUnavailable)
        }
    }

    async fn load(&self, digest: TokenDigest, token: Option<TokenSecret>) -> Result<Slot, ()> {
        let stamp = self.stamp();
        if let Some(health) = self.store.fanout() {
            // Known to be down: answer at once rather than wait for a timeout.
            if !health.is_reachable() {
                self.metrics
                    .scope_lookup(LookupTier::Store, LookupResult::Error);
                return Err(());
            }
        }
        let store_failed = match self.store.get(&digest).await {
            Ok(Some(record)) => {
                self.metrics
                    .scope_lookup(LookupTier::Store, LookupResult::Hit);
                return Ok(self.slot(Cached::Known(record), stamp));
            }
            Ok(None) => {
                self.metrics
                    .scope_lookup(LookupTier::Store, LookupResult::Miss);
                false
            }
            Err(error) => {
                self.metrics
                    .scope_lookup(LookupTier::Store, LookupResult::Error);
                tracing::warn!(%error, token_id = %digest.id(), "scope store lookup failed");
                true
            }
        };
        let (Some(introspector), Some(token)) = (&self.introspector, token) else {
            // Without introspection the store is the authority; if it failed, fail closed.
            return if store_failed {
                Err(())
            } else {
                Ok(self.slot(Cached::Unknown, stamp))
            };
        };
        if store_failed && self.store.fanout().is_some() {
            // The shared store is failing: introspecting now would learn a token other
            // replicas cannot see and could not hear revoked.
            return Err(());
        }
        if let Store::Redis(redis) = &self.store {
            if let Some(shared) = self.await_other_replica(redis, &digest).await? {
                return Ok(self.slot(shared, stamp));
            }
        }
        match self.ask_upstream(introspector, digest, &token).await {
            Some(Answer::Known(scope)) => {
                let record = scope.into_record(Source::Introspection);
                match self.store.put_unless_revoked(digest, record.clone()).await {
                    Ok(true) => {
                        self.active.fetch_add(1, Ordering::Relaxed);
                        self.publish_count();
                    }
                    // Revoked while the upstream answered: the revocation stands.
                    Ok(false) => {
                        return match self.store.get(&digest).await {
                            Ok(Some(revoked)) => Ok(self.slot(Cached::Known(revoked), stamp)),
                            _ => Err(()),
                        };
                    }
                    // Still serve it from the cache: the upstream just vouched for it.
                    Err(error) => tracing::warn!(%error, "could not store an introspected scope"),
                }
                self.metrics.token_learned(Source::Introspection);
                Ok(self.slot(Cached::Known(record), stamp))
            }
            Some(Answer::Unknown) => {
                if let Store::Redis(redis) = &self.store {
                    if let Err(error) = redis.put_unknown(&digest, self.settings.negative_ttl).await
                    {
                        tracing::warn!(%error, "could not share an unknown token");
                    }
                }
                Ok(self.slot(Cached::Unknown, stamp))
            }
            None => Err(()),
        }
    }

    /// With several replicas, one introspects a token and the others read its answer
    /// from Redis. `Some` when another replica answered within the wait; `None` when
    /// this replica should ask the upstream itself.
    async fn await_other_replica(
        &self,
        redis: &RedisStore,
        digest: &TokenDigest,
    ) -> Result<Option<Cached>, ()> {
        if redis.claim_introspection(digest).await.map_err(|_| ())? {
            return Ok(None);
        }
        let deadline = Instant::now() + SHARED_INTROSPECTION_WAIT;
        while Instant::now() < deadline {
            tokio::time::sleep(SHARED_INTROSPECTION_POLL).await;
            match redis.get_shared(digest).await {
                Ok(redis_store::Shared::Record(record)) => return Ok(Some(Cached::Known(record))),
                Ok(redis_store::Shared::Unknown) => return Ok(Some(Cached::Unknown)),
                Ok(redis_store::Shared::Nothing) => {}
                Err(_) => return Err(()),
            }
        }
        Ok(None)
    }

    /// One introspection call, counted by its result; `None` when the upstream could not
    /// answer.
    async fn ask_upstream(
        &self,
        introspector: &Introspector,
        digest: TokenDigest,
        token: &TokenSecret,
    ) -> Option<Answer> {
        let answer = introspector.lookup(token.expose()).await;
        let result = match &answer {
            Ok(Answer::Known(_)) => LookupResult::Hit,
            Ok(Answer::Unknown) => LookupResult::Miss,
            Err(error) => {
                tracing::warn!(error = %error.0, token_id = %digest.id(), "introspection failed");
                LookupResult::Error
            }
        };
        self.metrics.scope_lookup(LookupTier::Introspection, result);
        answer.ok()
    }

    fn spawn_revalidation(self: &Arc<Self>, digest: TokenDigest, token: TokenSecret) {
        {
            let mut inflight = self.revalidating.lock().unwrap_or_else(|e| e.into_inner());
            if !inflight.insert(digest) {
                return;
            }
        }
        let table = Arc::clone(self);
        tokio::spawn(async move {
            if !table.revalidate(digest, token).await {
                // Failed: hold this token's slot a while so an upstream outage is not
                // hammered at request rate.
                tokio::time::sleep(REVALIDATION_RETRY_BACKOFF).await;
            }
            table
                .revalidating
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&digest);
        });
    }

    /// Re-confirms one entry with the upstream: 200 refreshes it, 404 revokes it, an
    /// error keeps it (counted). Returns false when the upstream could not answer.
    async fn revalidate(&self, digest: TokenDigest, token: TokenSecret) -> bool {
        let Some(introspector) = &self.introspector else {
            return true;
        };
        match self.ask_upstream(introspector, digest, &token).await {
            Some(Answer::Known(scope)) => {
                let source = match self.store.get(&digest).await {
                    Ok(Some(Record::Active(a))) => a.entry.source,
                    // Revoked meanwhile (or gone): a late answer must not resurrect it.
                    _ => return true,
                };
                let record = scope.into_record(source);
                match self.store.put_unless_revoked(digest, record.clone()).await {
                    Ok(true) => self.remember(digest, record).await,
                    Ok(false) => {}
                    Err(error) => tracing::warn!(%error, "could not store a revalidated scope"),
                }
                true
            }
            Some(Answer::Unknown) => {
                tracing::info!(token_id = %digest.id(), "token deleted upstream; revoking");
                if let Err(error) = self.revoke(digest, Source::Introspection).await {
                    tracing::warn!(%error, "could not store a revocation");
                }
                true
            }
            None => false,
        }
    }

    /// Records a token's scope (mint, admin registration) durably, then caches it. A
    /// revoked token stays revoked.
    pub async fn learn(
        &self,
        digest: TokenDigest,
        entry: ScopeEntry,
    ) -> Result<Arc<ScopeEntry>, LearnError> {
        let previous = self.store.get(&digest).await.map_err(LearnError::Store)?;
        if matches!(previous, Some(Record::Revoked(_))) {
            return Err(LearnError::Revoked);
        }
        let source = entry.source;
        let entry = Arc::new(entry);
        let record = Record::Active(Active {
            entry: entry.clone(),
            confirmed_at: OffsetDateTime::now_utc(),
        });
        self.note_change();
        // Conditional in the store: a revocation that landed since the read above (here
        // or on another replica) wins.
        if !self
            .store
            .put_unless_revoked(digest, record.clone())
            .await
            .map_err(LearnError::Store)?
        {
            return Err(LearnError::Revoked);
        }
        self.remember(digest, record).await;
        if previous.is_none() {
            self.active.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.token_learned(source);
        self.publish_count();
        Ok(entry)
    }

    /// Revokes a token on this replica, effective for the next request, and remembers
    /// the revocation durably until the token's expiry (or [`TOMBSTONE_RETENTION`]).
    /// Returns whether the token was active.
    pub async fn revoke(&self, digest: TokenDigest, source: Source) -> Result<bool, StoreError> {
        let now = OffsetDateTime::now_utc();
        // Refused here from now on, even if the store cannot be read or written (the
        // caller then hears the error and retries; other replicas wait for that).
        self.note_change();
        if !self.store.is_memory() {
            let provisional = Record::Revoked(Tombstone {
                revoked_at: now,
                retain_until: now + TOMBSTONE_RETENTION,
            });
            self.remember(digest, provisional).await;
        }
        let previous = self.store.get(&digest).await?;
        let retain_until = match &previous {
            Some(Record::Active(a)) => a.entry.expires_at.unwrap_or(now + TOMBSTONE_RETENTION),
            Some(Record::Revoked(t)) => t.retain_until,
            None => now + TOMBSTONE_RETENTION,
        };
        let record = Record::Revoked(Tombstone {
            revoked_at: now,
            retain_until,
        });
        self.store.put(digest, record.clone()).await?;
        self.remember(digest, record).await;
        let was_active = matches!(previous, Some(Record::Active(_)));
        if was_active {
            self.active.fetch_sub(1, Ordering::Relaxed);
            self.metrics.token_revoked(source);
            self.publish_count();
        }
        Ok(was_active)
    }

    /// The active entry for a digest, if any.
    pub async fn get(&self, digest: &TokenDigest) -> Result<Option<Arc<ScopeEntry>>, StoreError> {
        Ok(match self.store.get(digest).await? {
            Some(Record::Active(a)) => Some(a.entry),
            _ => None,
        })
    }

    /// Finds an active entry by its public id.
    pub async fn find_by_id(
        &self,
        id: TokenId,
    ) -> Result<Option<(TokenDigest, Arc<ScopeEntry>)>, StoreError> {
        Ok(self
            .store
            .snapshot()
            .await?
            .into_iter()
            .find_map(|(digest, record)| match record {
                Record::Active(a) if digest.id() == id => Some((digest, a.entry)),
                _ => None,
            }))
    }

    /// Every active entry, ordered by id for stable listings.
    pub async fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let mut listed: Vec<Listed> = self
            .store
            .snapshot()
            .await?
            .into_iter()
            .filter_map(|(digest, record)| match record {
                Record::Active(a) => Some(Listed {
                    id: digest.id(),
                    entry: a.entry,
                }),
                Record::Revoked(_) => None,
            })
            .collect();
        listed.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        Ok(listed)
    }

    /// Removes entries expired, and tombstones past their retention, for longer than
    /// [`SWEEP_GRACE`]. Returns how many records went.
    pub async fn sweep(&self, now: OffsetDateTime) -> Result<usize, StoreError> {
        if matches!(self.store, Store::Redis(_)) {
            // Redis expires scopes and tombstones itself (`PXAT`); only the count moves.
            self.recount().await;
            return Ok(0);
        }
        let horizon = now - SWEEP_GRACE;
        let mut gone_active = 0i64;
        let doomed: Vec<TokenDigest> = self
            .store
            .snapshot()
            .await?
            .into_iter()
            .filter_map(|(digest, record)| match record {
                Record::Active(a) if a.entry.expires_at.is_some_and(|at| at < horizon) => {
                    gone_active += 1;
                    Some(digest)
                }
                Record::Revoked(t) if t.retain_until < horizon => Some(digest),
                _ => None,
            })
            .collect();
        let count = doomed.len();
        for digest in &doomed {
            self.cache.invalidate(digest).await;
        }
        self.store.remove_all(doomed).await?;
        if gone_active > 0 {
            self.active.fetch_sub(gone_active, Ordering::Relaxed);
            self.publish_count();
        }
        Ok(count)
    }

    /// Whether the store answers (for `/readyz`).
    pub fn is_ready(&self) -> bool {
        self.store.check().is_ok()
    }

    fn publish_count(&self) {
        self.metrics
            .set_scope_entries(self.active.load(Ordering::Relaxed).max(0));
    }
}
