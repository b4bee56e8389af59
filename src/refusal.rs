//! Every way scopegate answers a request itself instead of forwarding it.
//!
//! The variants are the `code`s of SPEC §4 plus the two upstream failures. They carry no
//! HTTP knowledge: `proxy::refusal_response` is the one place that turns a `Refusal` into
//! a status, headers and the JSON body.

/// Why a request was not (or could not be) forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// §4 row 1: the path is not canonical (SPEC §5).
    BadPath,
    /// §4 row 2: no `Authorization` header. `git` selects the Basic challenge.
    MissingCredentials { git: bool },
    /// §4 row 3: duplicate header, unknown scheme, bad Base64 or a malformed `rlcr-` token.
    MalformedCredentials,
    /// §4 row 4: a credential that is not a repo token.
    AccountKeyForbidden,
    /// §4 row 5: the path is not a repo route.
    RouteNotAllowed,
    /// §4 row 6: the token is not in the scope table.
    UnknownToken,
    /// §4 row 7.
    TokenRevoked,
    /// §4 row 8.
    TokenExpired,
    /// §4 row 9.
    RepoOutOfScope,
    /// §4 row 10: denied by the operation policy.
    OperationNotAllowed,
    /// §4 row 11: the scope could not be decided; fail closed.
    ScopeUnavailable,
    /// The upstream could not be reached (connect error or timeout, reset before the head).
    UpstreamUnavailable,
    /// The upstream sent no response head within `upstream.response_header_timeout`.
    UpstreamTimeout,
    /// The client's request body broke off or was malformed (chunk framing) before it
    /// was complete.
    BadRequestBody,
}

impl Refusal {
    /// Every variant, in decision order; used to pre-resolve metric label children.
    pub const ALL: [Refusal; 14] = [
        Refusal::BadPath,
        Refusal::MissingCredentials { git: false },
        Refusal::MalformedCredentials,
        Refusal::AccountKeyForbidden,
        Refusal::RouteNotAllowed,
        Refusal::UnknownToken,
        Refusal::TokenRevoked,
        Refusal::TokenExpired,
        Refusal::RepoOutOfScope,
        Refusal::OperationNotAllowed,
        Refusal::ScopeUnavailable,
        Refusal::UpstreamUnavailable,
        Refusal::UpstreamTimeout,
        Refusal::BadRequestBody,
    ];

    /// The machine-readable `code` of SPEC §4 (also the `decision` metric label).
    pub const fn code(self) -> &'static str {
        match self {
            Refusal::BadPath => "bad_path",
            Refusal::MissingCredentials { .. } => "missing_credentials",
            Refusal::MalformedCredentials => "malformed_credentials",
            Refusal::AccountKeyForbidden => "account_key_forbidden",
            Refusal::RouteNotAllowed => "route_not_allowed",
            Refusal::UnknownToken => "unknown_token",
            Refusal::TokenRevoked => "token_revoked",
            Refusal::TokenExpired => "token_expired",
            Refusal::RepoOutOfScope => "repo_out_of_scope",
            Refusal::OperationNotAllowed => "operation_not_allowed",
            Refusal::ScopeUnavailable => "scope_unavailable",
            Refusal::UpstreamUnavailable => "upstream_unavailable",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::BadRequestBody => "bad_request",
        }
    }

    /// A dense index into `ALL`, for label-child arrays.
    pub const fn index(self) -> usize {
        match self {
            Refusal::BadPath => 0,
            Refusal::MissingCredentials { .. } => 1,
            Refusal::MalformedCredentials => 2,
            Refusal::AccountKeyForbidden => 3,
            Refusal::RouteNotAllowed => 4,
            Refusal::UnknownToken => 5,
            Refusal::TokenRevoked => 6,
            Refusal::TokenExpired => 7,
            Refusal::RepoOutOfScope => 8,
            Refusal::OperationNotAllowed => 9,
            Refusal::ScopeUnavailable => 10,
            Refusal::UpstreamUnavailable => 11,
            Refusal::UpstreamTimeout => 12,
            Refusal::BadRequestBody => 13,
        }
    }

    /// The human message: says what to do, never echoes the credential.
    pub const fn message(self) -> &'static str {
        match self {
            Refusal::BadPath => {
                "the request path is not canonical (dot segments, empty segments, an encoded '/' \
                 in /v1/repo/<id>, backslashes or control characters are refused); send the plain path"
            }
            Refusal::MissingCredentials { git: true } => {
                "credentials required: use http://token:<rlcr- repo token>@<gateway>/v1/repo/<id>.git"
            }
            Refusal::MissingCredentials { git: false } => {
                "credentials required: send 'Authorization: Bearer <rlcr- repo token>'"
            }
            Refusal::MalformedCredentials => {
                "the Authorization header is malformed: send exactly one 'Bearer rlcr-…' \
                 or git's Basic 'token:rlcr-…' credential"
            }
            Refusal::AccountKeyForbidden => {
                "account keys are not accepted here: use an rlcr- repo token minted for this sandbox"
            }
            Refusal::RouteNotAllowed => {
                "repo tokens may only call /v1/repo/<repo uuid>/… routes through this gateway"
            }
            Refusal::UnknownToken => {
                "this repo token is not known to the gateway: mint it through the gateway's admin \
                 listener or register it with POST /admin/tokens"
            }
            Refusal::TokenRevoked => "this repo token was revoked: mint a new one",
            Refusal::TokenExpired => "this repo token has expired: mint a new one",
            Refusal::RepoOutOfScope => {
                "this repo token is not scoped to this repo: mint a token that includes it"
            }
            Refusal::OperationNotAllowed => {
                "this operation is not allowed for repo tokens by the gateway's policy"
            }
            Refusal::ScopeUnavailable => {
                "the gateway cannot decide this token's scope right now; retry shortly"
            }
            Refusal::UpstreamUnavailable => "the Relace API could not be reached; retry shortly",
            Refusal::UpstreamTimeout => {
                "the Relace API did not answer in time; retry shortly"
            }
            Refusal::BadRequestBody => {
                "the request body was cut off or malformed; send it again complete"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_position_in_all() {
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
        }
    }
}
