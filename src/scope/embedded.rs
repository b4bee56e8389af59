//! The embedded store: an ACID redb file at `scopes.path`. A mint or registration is
//! committed (and fsynced by redb) before it is acknowledged, so it survives `kill -9`.
//! Keys are token digests; values are the encoded records — no plaintext token is ever
//! written.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};

use super::codec;
use super::{Record, StoreError, TokenDigest};

const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("scopes_v1");

/// A handle to the store file; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EmbeddedStore")
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store file, creating its directory when needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::new(format!("create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::new(format!("open {}: {e}", path.display())))?;
        // Create the table up front so readers never see "table does not exist".
        let tx = db.begin_write().map_err(StoreError::from_display)?;
        tx.open_table(RECORDS).map_err(StoreError::from_display)?;
        tx.commit().map_err(StoreError::from_display)?;
        Ok(Self { db: Arc::new(db) })
    }

    pub fn get(&self, digest: &TokenDigest) -> Result<Option<Record>, StoreError> {
        let tx = self.db.begin_read().map_err(StoreError::from_display)?;
        let table = tx.open_table(RECORDS).map_err(StoreError::from_display)?;
        let Some(value) = table
            .get(digest.as_bytes().as_slice())
            .map_err(StoreError::from_display)?
        else {
            return Ok(None);
        };
        codec::decode(value.value()).map(Some)
    }

    /// Writes and commits one record (durable when this returns).
    pub fn put(&self, digest: &TokenDigest, record: &Record) -> Result<(), StoreError> {
        let bytes = codec::encode(record);
        let tx = self.db.begin_write().map_err(StoreError::from_display)?;
        {
            let mut table = tx.open_table(RECORDS).map_err(StoreError::from_display)?;
            table
                .insert(digest.as_bytes().as_slice(), bytes.as_slice())
                .map_err(StoreError::from_display)?;
        }
        tx.commit().map_err(StoreError::from_display)
    }

    /// Writes `record` unless the stored record is a revocation, in one transaction.
    pub fn put_unless_revoked(
        &self,
        digest: &TokenDigest,
        record: &Record,
    ) -> Result<bool, StoreError> {
        let bytes = codec::encode(record);
        let tx = self.db.begin_write().map_err(StoreError::from_display)?;
        {
            let mut table = tx.open_table(RECORDS).map_err(StoreError::from_display)?;
            let revoked = match table
                .get(digest.as_bytes().as_slice())
                .map_err(StoreError::from_display)?
            {
                Some(existing) => matches!(codec::decode(existing.value())?, Record::Revoked(_)),
                None => false,
            };
            if revoked {
                return Ok(false);
            }
            table
                .insert(digest.as_bytes().as_slice(), bytes.as_slice())
                .map_err(StoreError::from_display)?;
        }
        tx.commit().map_err(StoreError::from_display)?;
        Ok(true)
    }

    /// Writes many records in one transaction (bulk imports, benchmark seeding).
    pub fn put_all(&self, records: &[(TokenDigest, Record)]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(StoreError::from_display)?;
        {
            let mut table = tx.open_table(RECORDS).map_err(StoreError::from_display)?;
            for (digest, record) in records {
                let bytes = codec::encode(record);
                table
                    .insert(digest.as_bytes().as_slice(), bytes.as_slice())
                    .map_err(StoreError::from_display)?;
            }
        }
        tx.commit().map_err(StoreError::from_display)
    }

    /// Removes records in one transaction (sweeping).
    pub fn remove_all(&self, digests: &[TokenDigest]) -> Result<(), StoreError> {
        if digests.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(StoreError::from_display)?;
        {
            let mut table = tx.open_table(RECORDS).map_err(StoreError::from_display)?;
            for digest in digests {
                table
                    .remove(digest.as_bytes().as_slice())
                    .map_err(StoreError::from_display)?;
            }
        }
        tx.commit().map_err(StoreError::from_display)
    }

    /// Every record (listings, sweeping, start-up counts).
    pub fn snapshot(&self) -> Result<Vec<(TokenDigest, Record)>, StoreError> {
        let tx = self.db.begin_read().map_err(StoreError::from_display)?;
        let table = tx.open_table(RECORDS).map_err(StoreError::from_display)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(StoreError::from_display)? {
            let (key, value) = item.map_err(StoreError::from_display)?;
            let Ok(bytes) = <[u8; 32]>::try_from(key.value()) else {
                continue;
            };
            out.push((
                TokenDigest::from_bytes(bytes),
                codec::decode(value.value())?,
            ));
        }
        Ok(out)
    }

    /// Whether the file can be read right now.
    pub fn check(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_read().map_err(StoreError::from_display)?;
        tx.open_table(RECORDS).map_err(StoreError::from_display)?;
        Ok(())
    }
}
