//! The store tier behind the cache: one enum over the backends, so the table (and the
//! proxy above it) never knows which one is configured.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use super::embedded::EmbeddedStore;
use super::fanout::FanoutHealth;
use super::redis_store::RedisStore;
use super::{Record, TokenDigest};

/// A store that could not answer. The decision fails closed on it (`scope_unavailable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(String);

impl StoreError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }

    pub fn from_display(e: impl fmt::Display) -> Self {
        Self(e.to_string())
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// The configured backend.
pub enum Store {
    /// A map in memory; nothing survives a restart.
    Memory(RwLock<HashMap<TokenDigest, Record>>),
    /// The redb file (durable, the default).
    Embedded(EmbeddedStore),
    /// Redis, shared by replicas, with change fan-out.
    Redis(RedisStore),
}

impl Store {
    pub fn memory() -> Self {
        Store::Memory(RwLock::new(HashMap::new()))
    }

    pub fn is_memory(&self) -> bool {
        matches!(self, Store::Memory(_))
    }

    /// The fan-out state, for the shared store.
    pub fn fanout(&self) -> Option<&Arc<FanoutHealth>> {
        match self {
            Store::Redis(redis) => Some(redis.health()),
            _ => None,
        }
    }

    pub async fn get(&self, digest: &TokenDigest) -> Result<Option<Record>, StoreError> {
        match self {
            Store::Memory(map) => Ok(read(map).get(digest).cloned()),
            // A point read of a memory-mapped B-tree page: cheaper than a thread hop.
            Store::Embedded(store) => store.get(digest),
            Store::Redis(store) => store.get(digest).await,
        }
    }

    /// Durable when it returns (for the embedded store: committed and fsynced).
    pub async fn put(&self, digest: TokenDigest, record: Record) -> Result<(), StoreError> {
        match self {
            Store::Memory(map) => {
                write(map).insert(digest, record);
                Ok(())
            }
            Store::Embedded(store) => blocking(store, move |s| s.put(&digest, &record)).await,
            Store::Redis(store) => store.put(&digest, &record).await,
        }
    }

    /// Writes an active record unless the token is revoked, atomically in the store (so
    /// a revocation that lands between a read and this write, on any replica, wins).
    /// Returns false, writing nothing, when it is revoked.
    pub async fn put_unless_revoked(
        &self,
        digest: TokenDigest,
        record: Record,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(map) => {
                let mut map = write(map);
                if matches!(map.get(&digest), Some(Record::Revoked(_))) {
                    return Ok(false);
                }
                map.insert(digest, record);
                Ok(true)
            }
            Store::Embedded(store) => {
                blocking(store, move |s| s.put_unless_revoked(&digest, &record)).await
            }
            Store::Redis(store) => store.put_unless_revoked(&digest, &record).await,
        }
    }

    pub async fn remove_all(&self, digests: Vec<TokenDigest>) -> Result<(), StoreError> {
        match self {
            Store::Memory(map) => {
                let mut map = write(map);
                for digest in &digests {
                    map.remove(digest);
                }
                Ok(())
            }
            Store::Embedded(store) => blocking(store, move |s| s.remove_all(&digests)).await,
            Store::Redis(store) => store.remove_all(&digests).await,
        }
    }

    pub async fn snapshot(&self) -> Result<Vec<(TokenDigest, Record)>, StoreError> {
        match self {
            Store::Memory(map) => Ok(read(map)
                .iter()
                .map(|(digest, record)| (*digest, record.clone()))
                .collect()),
            Store::Embedded(store) => blocking(store, move |s| s.snapshot()).await,
            Store::Redis(store) => store.snapshot().await,
        }
    }

    /// Whether the store can be read right now (`/readyz`).
    pub fn check(&self) -> Result<(), StoreError> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Embedded(store) => store.check(),
            // Kept current by the once-a-second PING.
            Store::Redis(store) if store.health().is_reachable() => Ok(()),
            Store::Redis(_) => Err(StoreError::new("Redis is not answering")),
        }
    }
}

/// Runs an embedded-store operation on the blocking pool: commits wait for fsync and
/// scans read the whole file, neither belongs on the async workers.
async fn blocking<T, F>(store: &EmbeddedStore, op: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&EmbeddedStore) -> Result<T, StoreError> + Send + 'static,
{
    let store = store.clone();
    tokio::task::spawn_blocking(move || op(&store))
        .await
        .map_err(StoreError::from_display)?
}

// A poisoned lock only means another thread panicked between whole-value inserts; the
// map is still consistent, so keep serving rather than propagate the panic.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}
