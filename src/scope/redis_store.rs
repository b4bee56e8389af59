//! The shared store: Redis, for several replicas behind one Service (SPEC §3, §7).
//!
//! Layout, per token digest `<hex>` (the hash tag keeps one token's keys in one slot):
//! - `scopegate:{<hex>}:s` — the active record; expires in Redis at the token's
//!   `expires_at` (`PXAT`), so Redis forgets expired tokens on its own;
//! - `scopegate:{<hex>}:r` — the tombstone of a revoked token, expiring at its
//!   `retain_until`; a tombstone wins over an active record, so a replayed mint on another
//!   replica cannot resurrect a revoked token;
//! - `scopegate:{<hex>}:n` — "the upstream does not know this token", for `negative_ttl`;
//! - `scopegate:{<hex>}:l` — a short claim on introspecting the token, so concurrent misses
//!   on several replicas make one upstream call.
//!
//! Every write is atomic with the `PUBLISH` of the change on [`CHANNEL`] (a revocation
//! one `MULTI`/`EXEC`, an active scope one Lua script that first checks for a
//! tombstone), so a change is announced exactly when it is visible. Keys, values and
//! messages hold digests and scopes only. The subscription and reachability are watched
//! by [`super::fanout`].

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::fanout::{FanoutHealth, Message};
use super::{codec, Record, StoreError, TokenDigest, Tombstone};

/// Where every change is published.
pub const CHANNEL: &str = "scopegate:events";
/// How long one command may take before the store counts as failing.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one replica may hold the claim on introspecting a token.
const INTROSPECTION_CLAIM: Duration = Duration::from_secs(3);
/// Keys are read in batches of this many when listing.
const SCAN_BATCH: usize = 500;
/// KEYS: scope, tombstone, negative. ARGV: value, PXAT in ms or "", channel, message.
/// A tombstone wins: nothing is written or published and 0 is returned.
const LEARN_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
end
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

/// What a replica waiting for another replica's introspection finds.
pub enum Shared {
    Record(Record),
    Unknown,
    Nothing,
}

/// A handle to the shared store; cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    /// Writes an active record only if no tombstone exists, and announces it.
    learn_script: Arc<redis::Script>,
    /// Established in the background, so the gateway starts (unready) without Redis.
    conn: Arc<OnceCell<ConnectionManager>>,
    health: Arc<FanoutHealth>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisStore")
    }
}

fn key(digest: &TokenDigest, kind: char) -> String {
    format!("scopegate:{{{}}}:{kind}", digest.to_hex())
}

fn unix_ms(at: OffsetDateTime) -> i64 {
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn digest_of_key(key: &[u8]) -> Option<TokenDigest> {
    let hex = key.strip_prefix(b"scopegate:{")?.get(..64)?;
    let mut bytes = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        bytes[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(TokenDigest::from_bytes(bytes))
}

impl RedisStore {
    /// Parses the URL; connecting happens in the background ([`Self::connect_loop`]).
    pub fn new(url: &str, health: Arc<FanoutHealth>) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::new(format!("scopes.redis_url: {e}")))?;
        Ok(Self {
            client,
            learn_script: Arc::new(redis::Script::new(LEARN_SCRIPT)),
            conn: Arc::new(OnceCell::new()),
            health,
        })
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    pub fn health(&self) -> &Arc<FanoutHealth> {
        &self.health
    }

    /// Establishes the managed connection, retrying with backoff until it works. The
    /// connection manager then reconnects by itself after failures.
    pub async fn connect_loop(&self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(COMMAND_TIMEOUT))
                .set_response_timeout(Some(COMMAND_TIMEOUT))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            match self.client.get_connection_manager_with_config(config).await {
                Ok(conn) => {
                    let _ = self.conn.set(conn);
                    return;
                }
                Err(error) => {
                    self.health.store_failed();
                    tracing::warn!(%error, retry_in = ?backoff, "cannot connect to Redis");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn conn(&self) -> Result<ConnectionManager, StoreError> {
        self.conn
            .get()
            .cloned()
            .ok_or_else(|| StoreError::new("not connected to Redis yet"))
    }

    /// Runs one command round trip, noting failures for readiness and staleness.
    async fn run<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(COMMAND_TIMEOUT, op).await {
            Ok(Ok(value)) => Ok(value),
            // Counted; readiness follows the PING alone, so one slow listing or a
            // single failed write does not take the replica out of service.
            Ok(Err(error)) => {
                self.health.command_failed();
                Err(StoreError::new(format!("redis: {error}")))
            }
            Err(_) => {
                self.health.command_failed();
                Err(StoreError::new("redis: no answer within 1s"))
            }
        }
    }

    pub async fn get(&self, digest: &TokenDigest) -> Result<Option<Record>, StoreError> {
        match self.get_shared(digest).await? {
            Shared::Record(record) => Ok(Some(record)),
            Shared::Unknown | Shared::Nothing => Ok(None),
        }
    }

    /// The record (a tombstone first), else whether the upstream is known not to know it.
    pub async fn get_shared(&self, digest: &TokenDigest) -> Result<Shared, StoreError> {
        let mut conn = self.conn()?;
        let keys = [key(digest, 'r'), key(digest, 's'), key(digest, 'n')];
        let values: Vec<Option<Vec<u8>>> = self.run(conn.mget(&keys)).await?;
        let mut values = values.into_iter();
        let (revoked, active, negative) = (values.next(), values.next(), values.next());
        if let Some(value) = revoked.flatten().or(active.flatten()) {
            return codec::decode(&value).map(Shared::Record);
        }
        Ok(match negative.flatten() {
            Some(_) => Shared::Unknown,
            None => Shared::Nothing,
        })
    }

    /// Writes a record and announces it; durable as Redis's persistence makes it (AOF
    /// `appendfsync always` for every acknowledged write). An active record goes through
    /// the conditional write: under a tombstone it would never be read anyway.
    pub async fn put(&self, digest: &TokenDigest, record: &Record) -> Result<(), StoreError> {
        match record {
            Record::Active(_) => self.put_unless_revoked(digest, record).await.map(drop),
            Record::Revoked(tombstone) => self.put_tombstone(digest, record, tombstone).await,
        }
    }

    /// A revocation: the tombstone set, the scope deleted and the change announced, in
    /// one `MULTI`/`EXEC`.
    async fn put_tombstone(
        &self,
        digest: &TokenDigest,
        record: &Record,
        tombstone: &Tombstone,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let value = codec::encode(record);
        let message = Message::encode(self.health.replica(), digest, &value);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(key(digest, 'r'))
            .arg(&value)
            .arg("PXAT")
            .arg(unix_ms(tombstone.retain_until).max(1))
            .ignore()
            .del(key(digest, 's'))
            .ignore()
            .publish(CHANNEL, message)
            .ignore();
        self.run(pipe.query_async::<()>(&mut conn)).await
    }

    /// Writes an active record unless the token has a tombstone (checked inside Redis, so
    /// a revocation on another replica between a read and this write wins), and
    /// announces it. False when revoked.
    pub async fn put_unless_revoked(
        &self,
        digest: &TokenDigest,
        record: &Record,
    ) -> Result<bool, StoreError> {
        let active = match record {
            Record::Active(active) => active,
            Record::Revoked(tombstone) => {
                self.put_tombstone(digest, record, tombstone).await?;
                return Ok(true);
            }
        };
        let mut conn = self.conn()?;
        let value = codec::encode(record);
        let message = Message::encode(self.health.replica(), digest, &value);
        let pxat = active
            .entry
            .expires_at
            .map(|at| unix_ms(at).max(1).to_string())
            .unwrap_or_default();
        let mut invocation = self.learn_script.prepare_invoke();
        invocation
            .key(key(digest, 's'))
            .key(key(digest, 'r'))
            .key(key(digest, 'n'))
            .arg(value)
            .arg(pxat)
            .arg(CHANNEL)
            .arg(message);
        let written: i64 = self.run(invocation.invoke_async(&mut conn)).await?;
        Ok(written == 1)
    }

    /// Remembers for `ttl` that the upstream does not know this token (shared negative).
    pub async fn put_unknown(&self, digest: &TokenDigest, ttl: Duration) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.run(
            redis::cmd("SET")
                .arg(key(digest, 'n'))
                .arg(1)
                .arg("PX")
                .arg(ms)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// Claims the introspection of a token for this replica; false when another replica
    /// holds the claim (it will share the answer through the store).
    pub async fn claim_introspection(&self, digest: &TokenDigest) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let ms = u64::try_from(INTROSPECTION_CLAIM.as_millis()).unwrap_or(3000);
        let answer: Option<String> = self
            .run(
                redis::cmd("SET")
                    .arg(key(digest, 'l'))
                    .arg(self.health.replica())
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(answer.is_some())
    }

    pub async fn remove_all(&self, digests: &[TokenDigest]) -> Result<(), StoreError> {
        if digests.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn()?;
        let mut pipe = redis::pipe();
        for digest in digests {
            pipe.del(&[key(digest, 's'), key(digest, 'r'), key(digest, 'n')])
                .ignore();
        }
        self.run(pipe.query_async::<()>(&mut conn)).await
    }

    /// Every record (admin listings and counts): SCAN, then MGET in batches.
    pub async fn snapshot(&self) -> Result<Vec<(TokenDigest, Record)>, StoreError> {
        let mut conn = self.conn()?;
        let mut digests = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .run(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg("scopegate:{*}:[sr]")
                        .arg("COUNT")
                        .arg(SCAN_BATCH)
                        .query_async(&mut conn),
                )
                .await?;
            digests.extend(keys.iter().filter_map(|k| digest_of_key(k)));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        digests.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        digests.dedup();
        let mut out = Vec::with_capacity(digests.len());
        for batch in digests.chunks(SCAN_BATCH) {
            let mut pipe = redis::pipe();
            for digest in batch {
                pipe.mget(&[key(digest, 'r'), key(digest, 's')]);
            }
            let values: Vec<Vec<Option<Vec<u8>>>> = self.run(pipe.query_async(&mut conn)).await?;
            for (digest, pair) in batch.iter().zip(values) {
                // A tombstone wins; a key that expired between SCAN and MGET is gone.
                if let Some(value) = pair.into_iter().flatten().next() {
                    out.push((*digest, codec::decode(&value)?));
                }
            }
        }
        Ok(out)
    }

    /// One round trip that publishes this replica's heartbeat: Redis answering is
    /// readiness, and hearing it back proves the subscription delivers.
    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let message = Message::heartbeat(self.health.replica());
        self.run(
            redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(message)
                .query_async::<()>(&mut conn),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_the_digest_only_and_parse_back() {
        let digest = TokenDigest::of("rlcr-abcdefghijklmnop1234");
        let k = key(&digest, 's');
        assert!(!k.contains("rlcr-"));
        assert_eq!(k, format!("scopegate:{{{}}}:s", digest.to_hex()));
        assert_eq!(digest_of_key(k.as_bytes()), Some(digest));
        assert_eq!(digest_of_key(b"scopegate:{zz}:s"), None);
        assert_eq!(digest_of_key(b"other"), None);
    }
}
