//! The stored form of a [`Record`], shared by every persistent store (the embedded file
//! now, Redis later). JSON with a version tag: readable when debugging a store, and
//! evolvable. Holds no token — the key is the digest.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Active, Record, ScopeEntry, Source, StoreError, Tombstone};

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Wire {
    ActiveV1 {
        name: Box<str>,
        repo_ids: Box<[Uuid]>,
        #[serde(with = "time::serde::rfc3339::option")]
        expires_at: Option<OffsetDateTime>,
        source: Source,
        #[serde(with = "time::serde::rfc3339")]
        confirmed_at: OffsetDateTime,
    },
    RevokedV1 {
        #[serde(with = "time::serde::rfc3339")]
        revoked_at: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        retain_until: OffsetDateTime,
    },
}

pub fn encode(record: &Record) -> Vec<u8> {
    let wire = match record {
        Record::Active(active) => Wire::ActiveV1 {
            name: active.entry.name.clone(),
            repo_ids: active.entry.repo_ids.clone(),
            expires_at: active.entry.expires_at,
            source: active.entry.source,
            confirmed_at: active.confirmed_at,
        },
        Record::Revoked(tombstone) => Wire::RevokedV1 {
            revoked_at: tombstone.revoked_at,
            retain_until: tombstone.retain_until,
        },
    };
    // Serializing this plain data cannot fail; an empty value would decode as an error
    // (and be treated as a store failure), never as a grant.
    serde_json::to_vec(&wire).unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
    let wire: Wire = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::new(format!("undecodable scope record: {e}")))?;
    Ok(match wire {
        Wire::ActiveV1 {
            name,
            repo_ids,
            expires_at,
            source,
            confirmed_at,
        } => Record::Active(Active {
            entry: Arc::new(ScopeEntry {
                name,
                repo_ids,
                expires_at,
                source,
            }),
            confirmed_at,
        }),
        Wire::RevokedV1 {
            revoked_at,
            retain_until,
        } => Record::Revoked(Tombstone {
            revoked_at,
            retain_until,
        }),
    })
}
