//! The in-memory store: the scope table's first form. Nothing survives a restart.

use std::collections::HashMap;
use std::sync::RwLock;

use super::{Record, TokenDigest};

/// A plain map behind a lock; reads vastly outnumber writes and the moka cache in front
/// absorbs the hot path, so a `RwLock` is enough.
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: RwLock<HashMap<TokenDigest, Record>>,
}

impl MemoryStore {
    pub fn get(&self, digest: &TokenDigest) -> Option<Record> {
        self.read().get(digest).cloned()
    }

    pub fn put(&self, digest: TokenDigest, record: Record) {
        self.write().insert(digest, record);
    }

    /// Every record, for listings and lookups by id.
    pub fn snapshot(&self) -> Vec<(TokenDigest, Record)> {
        self.read()
            .iter()
            .map(|(digest, record)| (*digest, record.clone()))
            .collect()
    }

    pub fn active_count(&self) -> usize {
        self.read()
            .values()
            .filter(|r| matches!(r, Record::Active(_)))
            .count()
    }

    // A poisoned lock only means another thread panicked mid-insert of a whole value;
    // the map itself is still consistent, so keep serving rather than propagate.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<TokenDigest, Record>> {
        self.records.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<TokenDigest, Record>> {
        self.records.write().unwrap_or_else(|e| e.into_inner())
    }
}
