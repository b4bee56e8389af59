//! Measures the resident memory of a scope table holding N cached entries (default
//! 1,000,000), for the closing notes: `cargo run --release --example scope-rss [N]`.

use std::sync::Arc;

use scopegate::metrics::Metrics;
use scopegate::scope::{ScopeEntry, ScopeTable, Source, TokenDigest};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let table: Arc<ScopeTable> = ScopeTable::in_memory(n, Metrics::new()?).await;
    let repos = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()];
    let before = rss_kib();
    for i in 0..n {
        let token = format!("rlcr-{i:040x}");
        let entry = ScopeEntry {
            name: format!("sandbox-{i}").into(),
            repo_ids: repos.into(),
            expires_at: Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1)),
            source: Source::Mint,
        };
        if table.learn(TokenDigest::of(&token), entry).await.is_err() {
            anyhow::bail!("learn failed at {i}");
        }
    }
    let after = rss_kib();
    println!(
        "entries={n} rss_before={:.1}MiB rss_after={:.1}MiB per_entry={:.0}B (memory store; its entries are read directly, not copied into the cache)",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before) * 1024) as f64 / n.max(1) as f64
    );
    Ok(())
}
