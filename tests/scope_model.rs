//! Model-based property test of the scope table (SPEC §4 rows 6–9, §7 lifecycle).
//!
//! Random sequences of learn / revoke / lookup / sweep / reopen over a small pool of
//! tokens and repos are applied to a memory table, an embedded (redb) table and a plain
//! `HashMap` model; every decision, every operation's result, every `get`, the listing
//! and the entry gauge must agree with the model after every step.
//!
//! The model's rules:
//! - learning a revoked token fails with `LearnError::Revoked` and changes nothing;
//!   learning a known active token replaces its scope;
//! - revoking records a tombstone whatever the token's state (an unknown token too); the
//!   tombstone is kept until the token's expiry, or 30 days for a token without one, and a
//!   second revocation keeps the first one's retention;
//! - decisions: unknown → `unknown_token`, revoked → `token_revoked` (beats expiry),
//!   expired → `token_expired` (beats scope), repo not in scope → `repo_out_of_scope`;
//! - a sweep removes expired entries and tombstones whose time passed (more than
//!   an hour ago): a far-past expiry goes, a far-future one or none stays.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Uri, Version};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use scopegate::metrics::Metrics;
use scopegate::policy::OperationPolicy;
use scopegate::refusal::Refusal;
use scopegate::request::{classify, ClassifyOptions};
use scopegate::scope::{
    EmbeddedStore, LearnError, ScopeEntry, ScopeTable, Source, Store, TableSettings, TokenDigest,
};
use time::macros::datetime;
use time::OffsetDateTime;
use uuid::Uuid;

const TOKENS: usize = 6;
const REPOS: [&str; 3] = [
    "3f2c9a1e-7b4d-4e8a-9c6f-1a2b3c4d5e6f",
    "8e1d2c3b-4a59-4f6e-8d7c-6b5a49382716",
    "0c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e",
];

fn token(i: usize) -> String {
    format!("rlcr-modeltoken{i:02}abcdef0123456789")
}

fn repo(i: usize) -> Uuid {
    Uuid::parse_str(REPOS[i]).expect("uuid")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    None,
    /// Far in the past: expired, and swept by the next sweep.
    Past,
    /// Far in the future.
    Future,
}

impl Expiry {
    fn at(self) -> Option<OffsetDateTime> {
        match self {
            Expiry::None => None,
            Expiry::Past => Some(datetime!(2000-01-01 0:00 UTC)),
            Expiry::Future => Some(datetime!(2100-01-01 0:00 UTC)),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Learn {
        token: usize,
        /// Bit `i` set: `REPOS[i]` is in scope.
        repos: u8,
        expiry: Expiry,
        admin: bool,
    },
    Revoke {
        token: usize,
        admin: bool,
    },
    Lookup {
        token: usize,
        repo: usize,
        /// Write the repo id in upper case (ids compare case-insensitively).
        upper: bool,
    },
    Sweep,
    /// Drop the embedded table and open a new one on the same file (a restart); the
    /// memory table is unaffected.
    Reopen,
}

fn expiry() -> impl Strategy<Value = Expiry> {
    prop_oneof![Just(Expiry::None), Just(Expiry::Past), Just(Expiry::Future)]
}

/// A token of the pool, biased towards the first two so that histories of one token
/// (learn, revoke, revoke again, sweep, learn again…) are common.
fn any_token() -> impl Strategy<Value = usize> {
    prop_oneof![2 => 0..2usize, 1 => 0..TOKENS]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any_token(), 0u8..8, expiry(), any::<bool>()).prop_map(|(token, repos, expiry, admin)| {
            Op::Learn { token, repos, expiry, admin }
        }),
        2 => (any_token(), any::<bool>()).prop_map(|(token, admin)| Op::Revoke { token, admin }),
        4 => (any_token(), 0..REPOS.len(), any::<bool>())
            .prop_map(|(token, repo, upper)| Op::Lookup { token, repo, upper }),
        1 => Just(Op::Sweep),
        1 => Just(Op::Reopen),
    ]
}

/// Whether a tombstone outlives the next sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retention {
    /// Until a far-past expiry: the next sweep removes it.
    Past,
    /// Until a far-future expiry, or 30 days from the revocation.
    Kept,
}

#[derive(Debug, Clone)]
enum ModelState {
    Active {
        repos: u8,
        expiry: Expiry,
        source: Source,
    },
    Revoked(Retention),
}

#[derive(Default)]
struct Model {
    tokens: HashMap<usize, ModelState>,
}

impl Model {
    /// `Ok(())` for a successful learn, `Err(())` for a refused one (revoked).
    fn learn(&mut self, token: usize, repos: u8, expiry: Expiry, source: Source) -> Result<(), ()> {
        if matches!(self.tokens.get(&token), Some(ModelState::Revoked(_))) {
            return Err(());
        }
        self.tokens.insert(
            token,
            ModelState::Active {
                repos,
                expiry,
                source,
            },
        );
        Ok(())
    }

    /// Whether the token was active.
    fn revoke(&mut self, token: usize) -> bool {
        let (retention, was_active) = match self.tokens.get(&token) {
            Some(ModelState::Active { expiry, .. }) => (
                match expiry {
                    Expiry::Past => Retention::Past,
                    Expiry::None | Expiry::Future => Retention::Kept,
                },
                true,
            ),
            Some(ModelState::Revoked(retention)) => (*retention, false),
            None => (Retention::Kept, false),
        };
        self.tokens.insert(token, ModelState::Revoked(retention));
        was_active
    }

    fn decide(&self, token: usize, repo: usize) -> Result<(), Refusal> {
        match self.tokens.get(&token) {
            None => Err(Refusal::UnknownToken),
            Some(ModelState::Revoked(_)) => Err(Refusal::TokenRevoked),
            Some(ModelState::Active {
                expiry: Expiry::Past,
                ..
            }) => Err(Refusal::TokenExpired),
            Some(ModelState::Active { repos, .. }) if repos & (1 << repo) == 0 => {
                Err(Refusal::RepoOutOfScope)
            }
            Some(ModelState::Active { .. }) => Ok(()),
        }
    }

    /// How many records go.
    fn sweep(&mut self) -> usize {
        let before = self.tokens.len();
        self.tokens.retain(|_, state| {
            !matches!(
                state,
                ModelState::Active {
                    expiry: Expiry::Past,
                    ..
                } | ModelState::Revoked(Retention::Past)
            )
        });
        before - self.tokens.len()
    }

    fn active(&self) -> BTreeSet<usize> {
        self.tokens
            .iter()
            .filter(|(_, s)| matches!(s, ModelState::Active { .. }))
            .map(|(t, _)| *t)
            .collect()
    }
}

fn options() -> ClassifyOptions {
    ClassifyOptions {
        allow_account_keys: false,
        policy: OperationPolicy::default_deny(),
    }
}

/// The decision the table takes for a sandbox's `GET /v1/repo/<repo>` with `token`.
async fn decide(
    table: &Arc<ScopeTable>,
    t: usize,
    repo: usize,
    upper: bool,
) -> Result<(), Refusal> {
    let id = if upper {
        REPOS[repo].to_uppercase()
    } else {
        REPOS[repo].to_owned()
    };
    let uri: Uri = format!("/v1/repo/{id}").parse().expect("uri");
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", token(t))).expect("header"),
    );
    let target = classify(&Method::GET, &uri, Version::HTTP_11, &headers, &options())
        .outcome
        .expect("a well-formed repo request passes rows 1-5");
    table.authorize(&target, || None).await.map(|_| ())
}

fn entry(repos: u8, expiry: Expiry, source: Source) -> ScopeEntry {
    ScopeEntry {
        name: format!("model-{repos}").into(),
        repo_ids: (0..REPOS.len())
            .filter(|i| repos & (1 << i) != 0)
            .map(repo)
            .collect(),
        expires_at: expiry.at(),
        source,
    }
}

fn settings() -> TableSettings {
    TableSettings {
        cache_capacity: 1000,
        negative_ttl: Duration::from_secs(10),
        revalidate_after: Duration::from_secs(60),
        max_staleness: Duration::from_secs(30),
    }
}

async fn open_embedded(path: &Path) -> Arc<ScopeTable> {
    let store = EmbeddedStore::open(path).expect("open embedded store");
    ScopeTable::open(
        settings(),
        Store::Embedded(store),
        None,
        Metrics::new().expect("metrics"),
    )
    .await
    .expect("open table")
}

/// The table's listing as `(id, entry)` pairs.
async fn listing(table: &ScopeTable) -> Vec<(String, ScopeEntry)> {
    table
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|l| (l.id.as_str().to_owned(), (*l.entry).clone()))
        .collect()
}

/// A table and the metrics handle it reports through.
struct Subject {
    name: &'static str,
    table: Arc<ScopeTable>,
    metrics: Metrics,
}

impl Subject {
    async fn memory() -> Self {
        let metrics = Metrics::new().expect("metrics");
        Subject {
            name: "memory",
            table: ScopeTable::in_memory(1000, metrics.clone()).await,
            metrics,
        }
    }

    async fn embedded(store: EmbeddedStore) -> Self {
        let metrics = Metrics::new().expect("metrics");
        let table = ScopeTable::open(settings(), Store::Embedded(store), None, metrics.clone())
            .await
            .expect("open table");
        Subject {
            name: "embedded",
            table,
            metrics,
        }
    }

    fn entries_gauge(&self) -> f64 {
        let text = String::from_utf8(self.metrics.render()).expect("utf-8 metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("scopegate_scope_entries "))
            .and_then(|v| v.trim().parse().ok())
            .expect("scopegate_scope_entries sample")
    }
}

/// `get`, `list` and the entry gauge agree with the model.
async fn check_state(subject: &Subject, model: &Model, step: usize) -> Result<(), TestCaseError> {
    let name = subject.name;
    for t in 0..TOKENS {
        let got = subject
            .table
            .get(&TokenDigest::of(&token(t)))
            .await
            .expect("get");
        match (model.tokens.get(&t), got) {
            (
                Some(ModelState::Active {
                    repos,
                    expiry,
                    source,
                }),
                Some(got),
            ) => prop_assert_eq!(
                &*got,
                &entry(*repos, *expiry, *source),
                "{} step {}: get(token {})",
                name,
                step,
                t
            ),
            (Some(ModelState::Active { .. }), None) => {
                prop_assert!(
                    false,
                    "{name} step {step}: active token {t} missing from get"
                )
            }
            (_, Some(got)) => {
                prop_assert!(
                    false,
                    "{name} step {step}: token {t} not active, get = {got:?}"
                )
            }
            (_, None) => {}
        }
    }
    let listed: BTreeSet<String> = subject
        .table
        .list()
        .await
        .expect("list")
        .iter()
        .map(|l| l.id.as_str().to_owned())
        .collect();
    let expected: BTreeSet<String> = model
        .active()
        .iter()
        .map(|t| TokenDigest::of(&token(*t)).id().as_str().to_owned())
        .collect();
    prop_assert_eq!(listed, expected, "{} step {}: list", name, step);
    prop_assert_eq!(
        subject.entries_gauge(),
        model.active().len() as f64,
        "{} step {}: scopegate_scope_entries",
        name,
        step
    );
    Ok(())
}

/// Applies `ops` to a memory table, an embedded table over `open_store()`, and the model.
/// `Op::Reopen` drops the embedded table and builds a new one over `open_store()` again.
async fn run_ops(ops: &[Op], open_store: &dyn Fn() -> EmbeddedStore) -> Result<(), TestCaseError> {
    let mut subjects = [
        Subject::memory().await,
        Subject::embedded(open_store()).await,
    ];
    let mut model = Model::default();
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Learn {
                token: t,
                repos,
                expiry,
                admin,
            } => {
                let source = if admin { Source::Admin } else { Source::Mint };
                let expected = model.learn(t, repos, expiry, source);
                for s in &subjects {
                    let got = s
                        .table
                        .learn(TokenDigest::of(&token(t)), entry(repos, expiry, source))
                        .await;
                    match (expected, got) {
                        (Ok(()), Ok(e)) => prop_assert_eq!(&*e, &entry(repos, expiry, source)),
                        (Err(()), Err(LearnError::Revoked)) => {}
                        (expected, got) => prop_assert!(
                            false,
                            "{} step {step}: {op:?}: expected {expected:?}, got {got:?}",
                            s.name
                        ),
                    }
                }
            }
            Op::Revoke { token: t, admin } => {
                let source = if admin { Source::Admin } else { Source::Mint };
                let expected = model.revoke(t);
                for s in &subjects {
                    let got = s.table.revoke(TokenDigest::of(&token(t)), source).await;
                    prop_assert_eq!(
                        got,
                        Ok(expected),
                        "{} step {}: {:?} (was active?)",
                        s.name,
                        step,
                        op
                    );
                }
            }
            Op::Lookup {
                token: t,
                repo,
                upper,
            } => {
                let expected = model.decide(t, repo);
                for s in &subjects {
                    let got = decide(&s.table, t, repo, upper).await;
                    prop_assert_eq!(got, expected, "{} step {}: {:?}", s.name, step, op);
                }
            }
            Op::Sweep => {
                let expected = model.sweep();
                for s in &subjects {
                    let got = s.table.sweep(OffsetDateTime::now_utc()).await;
                    prop_assert_eq!(got, Ok(expected), "{} step {}: sweep count", s.name, step);
                }
            }
            Op::Reopen => {
                let [_, embedded] = &mut subjects;
                // Replace (and so drop, releasing the file) before opening it again.
                *embedded = Subject::memory().await;
                *embedded = Subject::embedded(open_store()).await;
            }
        }
        for s in &subjects {
            check_state(s, &model, step).await?;
        }
        // Every token's decision on every repo, not just the one looked up.
        for t in 0..TOKENS {
            for r in 0..REPOS.len() {
                let expected = model.decide(t, r);
                for s in &subjects {
                    let got = decide(&s.table, t, r, false).await;
                    prop_assert_eq!(
                        got,
                        expected,
                        "{} step {} after {:?}: token {} repo {}",
                        s.name,
                        step,
                        op,
                        t,
                        r
                    );
                }
            }
        }
    }
    Ok(())
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..40)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The main property: 64 random histories. Opening a redb file costs ~0.1-0.2 s in a
/// debug build, so every case shares one open store, emptied before the case starts;
/// `Op::Reopen` then builds a fresh table (cold cache, recounted entries) over it.
#[test]
fn scope_table_agrees_with_the_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("s.db")).expect("open embedded store");
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 64,
        max_shrink_iters: 1024,
        ..ProptestConfig::default()
    });
    let result = runner.run(&ops(), |ops| {
        let leftovers: Vec<TokenDigest> = store
            .snapshot()
            .expect("snapshot")
            .into_iter()
            .map(|(digest, _)| digest)
            .collect();
        store.remove_all(&leftovers).expect("empty the store");
        prop_assert!(store.snapshot().expect("snapshot").is_empty());
        runtime().block_on(run_ops(&ops, &|| store.clone()))
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

proptest! {
    // Fewer cases: each opens a fresh file and really reopens it on `Op::Reopen`.
    #![proptest_config(ProptestConfig {
        cases: 8,
        max_shrink_iters: 128,
        ..ProptestConfig::default()
    })]

    /// The same property with `Op::Reopen` closing the redb file and opening it again.
    #[test]
    fn scope_table_agrees_with_the_model_across_file_reopens(ops in ops()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.db");
        runtime().block_on(run_ops(&ops, &|| {
            EmbeddedStore::open(&path).expect("open embedded store")
        }))?;
    }
}

/// Every decision taken before a restart is taken the same after it: learned scopes,
/// expiries and tombstones (of known and unknown tokens) are all in the file.
#[test]
fn reopening_the_embedded_store_preserves_every_decision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.db");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let table = open_embedded(&path).await;
        let d = |t: usize| TokenDigest::of(&token(t));
        // 0: every repo, no expiry. 1: one repo, far-future expiry. 2: expired.
        // 3: learned, then revoked. 4: revoked without ever being learned. 5: unknown.
        for (t, repos, expiry, source) in [
            (0, 0b111, Expiry::None, Source::Mint),
            (1, 0b010, Expiry::Future, Source::Admin),
            (2, 0b001, Expiry::Past, Source::Admin),
            (3, 0b001, Expiry::None, Source::Mint),
        ] {
            table
                .learn(d(t), entry(repos, expiry, source))
                .await
                .unwrap_or_else(|e| panic!("learn {t}: {e:?}"));
        }
        assert_eq!(table.revoke(d(3), Source::Admin).await, Ok(true));
        assert_eq!(table.revoke(d(4), Source::Admin).await, Ok(false));

        let expected = [
            [Ok(()), Ok(()), Ok(())],
            [
                Err(Refusal::RepoOutOfScope),
                Ok(()),
                Err(Refusal::RepoOutOfScope),
            ],
            [Err(Refusal::TokenExpired); 3],
            [Err(Refusal::TokenRevoked); 3],
            [Err(Refusal::TokenRevoked); 3],
            [Err(Refusal::UnknownToken); 3],
        ];
        let decisions = |table: Arc<ScopeTable>| async move {
            let mut all = Vec::new();
            for t in 0..TOKENS {
                let mut row = Vec::new();
                for r in 0..REPOS.len() {
                    row.push(decide(&table, t, r, false).await);
                }
                all.push(row);
            }
            all
        };
        let before = decisions(table.clone()).await;
        assert_eq!(before, expected.map(|row| row.to_vec()).to_vec());
        let listed_before = listing(&table).await;
        assert_eq!(listed_before.len(), 3);
        drop(table);

        let table = open_embedded(&path).await;
        assert_eq!(
            decisions(table.clone()).await,
            before,
            "decisions after reopening"
        );
        let listed_after = listing(&table).await;
        assert_eq!(listed_after, listed_before, "listing after reopening");
        // The tombstones are durable: neither revoked token can be learned again.
        for t in [3, 4] {
            assert_eq!(
                table
                    .learn(d(t), entry(0b111, Expiry::None, Source::Admin))
                    .await
                    .map(|_| ()),
                Err(LearnError::Revoked),
                "token {t} resurrected after reopening"
            );
        }
        // A sweep after reopening still finds the expired entry.
        assert_eq!(table.sweep(OffsetDateTime::now_utc()).await, Ok(1));
        assert_eq!(
            decide(&table, 2, 0, false).await,
            Err(Refusal::UnknownToken)
        );
    });
}
