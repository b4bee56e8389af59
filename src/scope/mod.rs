//! The scope table: which token may touch which repos, and the decision of SPEC §4 rows
//! 6–10 that turns a [`Target`] into a [`Permit`].
//!
//! Tiers, hottest first: a bounded moka cache keyed by [`TokenDigest`] → the store
//! (memory for now) → introspection (later). Tokens are never keys or values anywhere
//! here: only digests. This module knows nothing of HTTP statuses; it answers in
//! [`Refusal`]s.

mod digest;
mod entry;
mod memory;

use std::sync::Arc;

use moka::sync::Cache;
use time::OffsetDateTime;

pub use digest::{TokenDigest, TokenId, TOKEN_ID_LEN};
pub use entry::{ScopeEntry, Source};
use memory::MemoryStore;

use crate::metrics::{LookupResult, LookupTier, Metrics};
use crate::refusal::Refusal;
use crate::request::{Credential, Target};

/// What a store holds for one digest.
#[derive(Debug, Clone)]
pub enum Record {
    Active(Arc<ScopeEntry>),
    /// Revoked tokens are remembered so they answer `token_revoked`, not `unknown_token`.
    Revoked,
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
        self.token.as_ref().map(|(_, e)| e.name.as_str())
    }
}

/// An entry as listed by the admin API.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: TokenId,
    pub entry: Arc<ScopeEntry>,
}

/// The scope table with its tiers.
pub struct ScopeTable {
    cache: Cache<TokenDigest, Record>,
    store: MemoryStore,
    metrics: Metrics,
}

impl ScopeTable {
    pub fn new(cache_capacity: u64, metrics: Metrics) -> Self {
        Self {
            cache: Cache::new(cache_capacity),
            store: MemoryStore::default(),
            metrics,
        }
    }

    /// SPEC §4 rows 6–10 for a target that passed rows 1–5.
    pub async fn authorize(&self, target: &Target) -> Result<Permit, Refusal> {
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
        let entry = match self.lookup(&digest) {
            None => return Err(Refusal::UnknownToken),
            Some(Record::Revoked) => return Err(Refusal::TokenRevoked),
            Some(Record::Active(entry)) => entry,
        };
        if entry.is_expired_at(OffsetDateTime::now_utc()) {
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

    fn lookup(&self, digest: &TokenDigest) -> Option<Record> {
        if let Some(record) = self.cache.get(digest) {
            self.metrics
                .scope_lookup(LookupTier::Cache, LookupResult::Hit);
            return Some(record);
        }
        self.metrics
            .scope_lookup(LookupTier::Cache, LookupResult::Miss);
        let found = self.store.get(digest);
        match &found {
            Some(record) => {
                self.metrics
                    .scope_lookup(LookupTier::Store, LookupResult::Hit);
                self.cache.insert(*digest, record.clone());
            }
            None => self
                .metrics
                .scope_lookup(LookupTier::Store, LookupResult::Miss),
        }
        found
    }

    /// Records a token's scope (mint, admin registration, introspection). A token that
    /// was revoked stays revoked: a replayed mint answer must not resurrect it.
    pub fn learn(
        &self,
        digest: TokenDigest,
        entry: ScopeEntry,
    ) -> Result<Arc<ScopeEntry>, Revoked> {
        if matches!(self.store.get(&digest), Some(Record::Revoked)) {
            return Err(Revoked);
        }
        let source = entry.source;
        let entry = Arc::new(entry);
        self.store.put(digest, Record::Active(entry.clone()));
        self.cache.insert(digest, Record::Active(entry.clone()));
        self.metrics.token_learned(source);
        self.refresh_gauge();
        Ok(entry)
    }

    /// Revokes a token everywhere on this replica, effective for the next request.
    /// Returns whether the token was known (active) before.
    pub fn revoke(&self, digest: TokenDigest, source: Source) -> bool {
        let was_active = matches!(self.store.get(&digest), Some(Record::Active(_)));
        self.store.put(digest, Record::Revoked);
        self.cache.insert(digest, Record::Revoked);
        if was_active {
            self.metrics.token_revoked(source);
        }
        self.refresh_gauge();
        was_active
    }

    /// The active entry for a digest, if any.
    pub fn get(&self, digest: &TokenDigest) -> Option<Arc<ScopeEntry>> {
        match self.store.get(digest) {
            Some(Record::Active(entry)) => Some(entry),
            _ => None,
        }
    }

    /// Finds an active entry by its public id.
    pub fn find_by_id(&self, id: TokenId) -> Option<(TokenDigest, Arc<ScopeEntry>)> {
        self.store
            .snapshot()
            .into_iter()
            .find_map(|(digest, record)| match record {
                Record::Active(entry) if digest.id() == id => Some((digest, entry)),
                _ => None,
            })
    }

    /// Every active entry, ordered by id for stable listings.
    pub fn list(&self) -> Vec<Listed> {
        let mut listed: Vec<Listed> = self
            .store
            .snapshot()
            .into_iter()
            .filter_map(|(digest, record)| match record {
                Record::Active(entry) => Some(Listed {
                    id: digest.id(),
                    entry,
                }),
                Record::Revoked => None,
            })
            .collect();
        listed.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        listed
    }

    /// Whether the store answers (always, for the memory store).
    pub fn is_ready(&self) -> bool {
        true
    }

    fn refresh_gauge(&self) {
        let count = i64::try_from(self.store.active_count()).unwrap_or(i64::MAX);
        self.metrics.set_scope_entries(count);
    }
}

/// A token that was revoked cannot be learned again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked;
