//! Writes an embedded scope store for the cold-token load case of `scripts/bench`:
//! `cargo run --release --example seed-scopes -- <file> <count> <repo-uuid>`.
//!
//! Token i is `rlcr-cold` followed by i as 32 decimal digits (what the benchmark's wrk
//! script sends), each scoped to `<repo-uuid>` for a day. Only digests are written, in
//! one transaction.

use std::sync::Arc;

use anyhow::Context;
use scopegate::scope::{Active, EmbeddedStore, Record, ScopeEntry, Source, TokenDigest};
use time::OffsetDateTime;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: seed-scopes <file> <count> <repo-uuid>";
    let path = args.next().context(usage)?;
    let count: u64 = args.next().context(usage)?.parse().context("count")?;
    let repo: uuid::Uuid = args.next().context(usage)?.parse().context("repo uuid")?;
    let now = OffsetDateTime::now_utc();
    let records: Vec<(TokenDigest, Record)> = (0..count)
        .map(|i| {
            let entry = ScopeEntry {
                name: format!("cold-{i}").into(),
                repo_ids: Box::new([repo]),
                expires_at: Some(now + time::Duration::days(1)),
                source: Source::Admin,
            };
            let record = Record::Active(Active {
                entry: Arc::new(entry),
                confirmed_at: now,
            });
            (TokenDigest::of(&format!("rlcr-cold{i:032}")), record)
        })
        .collect();
    EmbeddedStore::open(std::path::Path::new(&path))?.put_all(&records)?;
    println!("seeded {count} tokens into {path}");
    Ok(())
}
