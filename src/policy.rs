//! The operation policy of SPEC §4 row 10: which repo operations repo tokens may not use
//! even on repos they are scoped to.
//!
//! A rule is `"<METHOD> /<operation>"`, where `<operation>` is the first segment below
//! `/v1/repo/<id>/` (`git`, `pull`, `checkout`, …) and `<METHOD>` may be `*`. The default
//! denies `POST /git`, which runs arbitrary git arguments server-side (RELACE_API.md a.3).

use http::Method;

/// The rules in force by default.
pub const DEFAULT_DENY: &[&str] = &["POST /git"];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// `None` matches every method.
    method: Option<Method>,
    operation: String,
}

/// A parsed, validated list of deny rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperationPolicy {
    deny: Vec<Rule>,
}

impl OperationPolicy {
    /// Parses rules such as `"POST /git"` or `"* /checkout"`; the error names the bad rule.
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Self, String> {
        let mut deny = Vec::with_capacity(rules.len());
        for rule in rules {
            let rule = rule.as_ref();
            let (method, operation) = rule
                .split_once(' ')
                .ok_or_else(|| format!("{rule:?} is not of the form \"METHOD /operation\""))?;
            let method = match method {
                "*" => None,
                m => Some(
                    Method::from_bytes(m.as_bytes())
                        .map_err(|_| format!("{rule:?}: {m:?} is not an HTTP method"))?,
                ),
            };
            let operation = operation
                .trim()
                .strip_prefix('/')
                .filter(|op| !op.is_empty() && !op.contains('/'))
                .ok_or_else(|| {
                    format!("{rule:?}: the operation must be one path segment such as /git")
                })?;
            deny.push(Rule {
                method,
                operation: operation.to_owned(),
            });
        }
        Ok(Self { deny })
    }

    /// The default policy (`POST /git` denied).
    pub fn default_deny() -> Self {
        Self::parse(DEFAULT_DENY).unwrap_or_default()
    }

    /// Whether a repo-route request is denied. Git smart-HTTP routes are governed by the
    /// scope alone (they are how clone and push work).
    pub fn denies(&self, method: &Method, git: bool, operation: Option<&str>) -> bool {
        let Some(operation) = operation else {
            return false;
        };
        // Case-insensitive on both: a case-folding router would dispatch `POST /GIT` or
        // `post /git` to the same handler.
        !git && self.deny.iter().any(|rule| {
            rule.operation.eq_ignore_ascii_case(operation)
                && rule
                    .method
                    .as_ref()
                    .is_none_or(|m| m.as_str().eq_ignore_ascii_case(method.as_str()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_denies_post_git_only() {
        let p = OperationPolicy::default_deny();
        assert!(p.denies(&Method::POST, false, Some("git")));
        assert!(!p.denies(&Method::GET, false, Some("git")));
        assert!(!p.denies(&Method::POST, false, Some("search")));
        assert!(!p.denies(&Method::POST, true, Some("git")));
        assert!(!p.denies(&Method::POST, false, None));
        // A case-folding router would dispatch these to the same handler.
        assert!(p.denies(&Method::POST, false, Some("GIT")));
        let lower = Method::from_bytes(b"post").unwrap();
        assert!(p.denies(&lower, false, Some("git")));
    }

    #[test]
    fn wildcard_and_errors() {
        let p = OperationPolicy::parse(&["* /pull"]).unwrap();
        assert!(p.denies(&Method::PATCH, false, Some("pull")));
        assert!(OperationPolicy::parse(&["POST"]).is_err());
        assert!(OperationPolicy::parse(&["POST git"]).is_err());
        assert!(OperationPolicy::parse(&["POST /a/b"]).is_err());
        assert!(OperationPolicy::parse(&["P(ST /git"]).is_err());
    }
}
