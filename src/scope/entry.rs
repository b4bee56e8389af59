//! What the scope table knows about one token.

use time::OffsetDateTime;
use uuid::Uuid;

/// Where a scope entry came from (also the `source` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Learned from a `POST /v1/repo_token` answered through the admin listener.
    Mint,
    /// Registered with `POST /admin/tokens`.
    Admin,
    /// Learned from the upstream by introspection.
    Introspection,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Mint, Source::Admin, Source::Introspection];

    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Mint => "mint",
            Source::Admin => "admin",
            Source::Introspection => "introspection",
        }
    }

    pub const fn index(self) -> usize {
        match self {
            Source::Mint => 0,
            Source::Admin => 1,
            Source::Introspection => 2,
        }
    }
}

/// A token's scope: the mint response's shape, without the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeEntry {
    // Boxed slices rather than String/Vec: no spare capacity word, 16 B less per entry
    // (a million cached scopes is the sizing target).
    pub name: Box<str>,
    pub repo_ids: Box<[Uuid]>,
    /// `None`: the token does not expire.
    pub expires_at: Option<OffsetDateTime>,
    pub source: Source,
}

impl ScopeEntry {
    pub fn is_expired_at(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    pub fn covers(&self, repo_id: &Uuid) -> bool {
        self.repo_ids.contains(repo_id)
    }
}
