//! Pure parsing of a sandbox request into a typed [`Target`] or a [`Refusal`].
//!
//! Nothing here does I/O, touches a cache or records a metric, so every rule of SPEC §4
//! rows 1–5 and §5 can be tested (and fuzzed) as a plain function of method, target and
//! headers. The token itself never leaves this module: it is hashed into a [`TokenDigest`]
//! while the header is borrowed, and only the digest travels on.

use std::borrow::Cow;

use base64::Engine as _;
use http::header::AUTHORIZATION;
use http::{HeaderMap, Method, Uri, Version};
use uuid::Uuid;

use crate::policy::OperationPolicy;
use crate::refusal::Refusal;
use crate::scope::TokenDigest;

/// The prefix of Relace repo tokens.
pub const REPO_TOKEN_PREFIX: &str = "rlcr-";
const TOKEN_BODY_MIN: usize = 16;
const TOKEN_BODY_MAX: usize = 128;

/// The credential a request presented, reduced to what the decision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// An `rlcr-` repo token, known only by its digest from here on.
    RepoToken(TokenDigest),
    /// Any other credential (an account key); only reachable with `proxy.allow_account_keys`.
    AccountKey,
}

/// The class of route a request addressed: a closed set, safe for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// The path could not be parsed (bad path).
    Invalid,
    /// Not under `/v1/repo/<uuid>`.
    NotRepo,
    /// `/v1/repo/<uuid>` itself.
    Repo,
    /// `/v1/repo/<uuid>/file/…`.
    RepoFile,
    /// Any other operation below `/v1/repo/<uuid>/`.
    RepoOperation,
    /// Git smart HTTP below `/v1/repo/<uuid>.git/`.
    Git,
}

impl RouteClass {
    pub const fn as_str(self) -> &'static str {
        match self {
            RouteClass::Invalid => "invalid",
            RouteClass::NotRepo => "not_repo",
            RouteClass::Repo => "repo",
            RouteClass::RepoFile => "repo_file",
            RouteClass::RepoOperation => "repo_operation",
            RouteClass::Git => "git",
        }
    }
}

/// A request that passed rows 1–5 of the decision: who asks, for which repo, doing what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub credential: Credential,
    /// The repo id from the path, compared by value (so case does not matter).
    pub repo_id: Uuid,
    pub route: RouteClass,
    /// Row 10 is decided after the scope (rows 6–9), but it is a pure function of the
    /// request, so it is computed here and carried along.
    pub denied_by_policy: bool,
}

/// What the decision needs to know besides the request itself.
#[derive(Debug, Clone)]
pub struct ClassifyOptions {
    pub allow_account_keys: bool,
    pub policy: OperationPolicy,
}

/// The outcome of [`classify`]: the route class is known even for most refusals, for logs.
#[derive(Debug)]
pub struct Classification {
    pub route: RouteClass,
    pub outcome: Result<Target, Refusal>,
}

/// SPEC §4 rows 1–5, in that order.
pub fn classify(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
    options: &ClassifyOptions,
) -> Classification {
    let path = match parse_path(method, uri, version) {
        Ok(path) => path,
        Err(refusal) => {
            return Classification {
                route: RouteClass::Invalid,
                outcome: Err(refusal),
            }
        }
    };
    let route = path.route_class();
    let outcome = decide(method, headers, options, &path);
    Classification { route, outcome }
}

fn decide(
    method: &Method,
    headers: &HeaderMap,
    options: &ClassifyOptions,
    path: &RepoPath<'_>,
) -> Result<Target, Refusal> {
    let credential = parse_credential(headers, path.looks_like_git())?;
    if credential == Credential::AccountKey && !options.allow_account_keys {
        return Err(Refusal::AccountKeyForbidden);
    }
    let Some(repo_id) = path.repo_id else {
        return Err(Refusal::RouteNotAllowed);
    };
    let denied_by_policy = options
        .policy
        .denies(method, path.git, path.operation.as_deref());
    Ok(Target {
        credential,
        repo_id,
        route: path.route_class(),
        denied_by_policy,
    })
}

/// The authorization-relevant parts of a canonical path.
#[derive(Debug, PartialEq, Eq)]
pub struct RepoPath<'a> {
    /// The repo id when the path is `/v1/repo/<uuid>[.git]…`.
    pub repo_id: Option<Uuid>,
    /// The third segment ends in `.git` (used for the challenge even when it is no UUID).
    pub git_suffix: bool,
    /// The repo route is a git smart-HTTP route.
    pub git: bool,
    /// The first decoded segment below the repo id (`file`, `search`, `info`, …).
    pub operation: Option<Cow<'a, str>>,
}

impl RepoPath<'_> {
    fn looks_like_git(&self) -> bool {
        self.git_suffix
    }

    pub fn route_class(&self) -> RouteClass {
        match (self.repo_id, self.git, self.operation.as_deref()) {
            (None, _, _) => RouteClass::NotRepo,
            (Some(_), true, _) => RouteClass::Git,
            (Some(_), false, None) => RouteClass::Repo,
            (Some(_), false, Some("file")) => RouteClass::RepoFile,
            (Some(_), false, Some(_)) => RouteClass::RepoOperation,
        }
    }
}

/// SPEC §5: decode once, refuse anything that is not canonical, never normalise.
pub fn parse_path<'a>(
    method: &Method,
    uri: &'a Uri,
    version: Version,
) -> Result<RepoPath<'a>, Refusal> {
    // HTTP/1 absolute form (`GET http://host/…`) and authority form (CONNECT) carry a
    // scheme or an authority in the request line; a gateway that routed on them could be
    // steered to another host. HTTP/2 always carries `:scheme` and `:authority` beside
    // `:path`, so there only CONNECT (which has no path) is refused.
    let http1 = version < Version::HTTP_2;
    if method == Method::CONNECT || (http1 && (uri.scheme().is_some() || uri.authority().is_some()))
    {
        return Err(Refusal::BadPath);
    }
    parse_raw_path(uri.path())
}

/// [`parse_path`] on the raw path bytes (without the query).
pub fn parse_raw_path(raw: &str) -> Result<RepoPath<'_>, Refusal> {
    let Some(rest) = raw.strip_prefix('/') else {
        // `*` (asterisk form) or anything else that is not origin form.
        return Err(Refusal::BadPath);
    };
    let mut first_three: [Option<Cow<'_, str>>; 4] = [None, None, None, None];
    let mut segments = rest.split('/').peekable();
    let mut index = 0usize;
    while let Some(raw_segment) = segments.next() {
        let is_last = segments.peek().is_none();
        // `v1`, `repo` and the repo id need no escaping and no parameters; spelled any
        // other way, a router that does not decode (or strips `;`) would not see the
        // route scopegate authorized.
        if index < 3 && raw_segment.bytes().any(|b| b == b'%' || b == b';') {
            return Err(Refusal::BadPath);
        }
        let decoded = decode_segment(raw_segment)?;
        check_components(&decoded, index, is_last)?;
        if index < first_three.len() {
            first_three[index] = Some(decoded);
        }
        index += 1;
    }
    let [v1, repo, id, operation] = first_three;
    let id = id.unwrap_or(Cow::Borrowed(""));
    let git_suffix = id.ends_with(".git");
    let is_repo_prefix = v1.as_deref() == Some("v1") && repo.as_deref() == Some("repo");
    let (repo_id, git) = if is_repo_prefix {
        match parse_repo_id(&id) {
            Some((uuid, git)) => (Some(uuid), git),
            None => (None, false),
        }
    } else {
        (None, false)
    };
    // A trailing slash (`/v1/repo/<id>/`) addresses the repo itself, not an operation.
    // The policy sees what a `;`-stripping router would dispatch on (`git;x=1` is `git`).
    let operation = operation.filter(|op| !op.is_empty()).map(|op| match op {
        Cow::Borrowed(b) => Cow::Borrowed(b.split(';').next().unwrap_or(b)),
        Cow::Owned(o) => Cow::Owned(o.split(';').next().unwrap_or(&o).to_owned()),
    });
    Ok(RepoPath {
        repo_id,
        git_suffix,
        git,
        operation: if repo_id.is_some() { operation } else { None },
    })
}

/// Percent-decodes one raw segment exactly once; refuses malformed escapes, non-UTF-8
/// results, backslashes and control characters.
fn decode_segment(raw: &str) -> Result<Cow<'_, str>, Refusal> {
    let decoded: Cow<'_, [u8]> = if raw.as_bytes().contains(&b'%') {
        Cow::Owned(percent_decode_strict(raw.as_bytes())?)
    } else {
        Cow::Borrowed(raw.as_bytes())
    };
    if decoded.iter().any(|&b| b == b'\\' || b < 0x20 || b == 0x7f) {
        return Err(Refusal::BadPath);
    }
    let text = match decoded {
        Cow::Borrowed(bytes) => std::str::from_utf8(bytes)
            .map(Cow::Borrowed)
            .map_err(|_| Refusal::BadPath)?,
        Cow::Owned(bytes) => String::from_utf8(bytes)
            .map(Cow::Owned)
            .map_err(|_| Refusal::BadPath)?,
    };
    // Slash and backslash look-alikes become separators under Unicode folding (NFKC,
    // best-fit code pages); ASCII text never contains them, so the check is skipped.
    if !text.is_ascii() && text.chars().any(is_separator_like) {
        return Err(Refusal::BadPath);
    }
    Ok(text)
}

fn is_separator_like(c: char) -> bool {
    matches!(
        c,
        '\u{FF0F}' | '\u{FF3C}' | '\u{2215}' | '\u{2044}' | '\u{29F8}' | '\u{29F9}' | '\u{FE68}'
    )
}

/// Unlike `percent_encoding::percent_decode`, which passes a broken escape through as
/// literal text, a `%` not followed by two hex digits is refused: two parsers that
/// disagree about such bytes are how path confusion starts.
fn percent_decode_strict(raw: &[u8]) -> Result<Vec<u8>, Refusal> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hi = raw.get(i + 1).and_then(|b| hex_value(*b));
            let lo = raw.get(i + 2).and_then(|b| hex_value(*b));
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(Refusal::BadPath),
            }
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits a decoded segment on `/` again (an encoded `%2F` counts as a separator for
/// the checks) and refuses what some reading of the path could route elsewhere:
/// - a `%2F` in the first three segments (`v1`, `repo`, the repo id);
/// - dot segments, also behind a `;` parameter (`..;/`, which Tomcat, Spring and Jetty
///   read as `..`) or spelled with dot look-alikes (full-width `．`, the leaders `․‥`,
///   which Unicode-folding readers turn into dots);
/// - empty components before the end (`//`).
fn check_components(decoded: &str, index: usize, is_last_segment: bool) -> Result<(), Refusal> {
    if index < 3 && decoded.contains('/') {
        return Err(Refusal::BadPath);
    }
    let mut components = decoded.split('/').peekable();
    while let Some(component) = components.next() {
        let is_last = is_last_segment && components.peek().is_none();
        if component.is_empty() {
            if is_last {
                continue;
            }
            return Err(Refusal::BadPath);
        }
        // What a `;`-parameter-stripping reader keeps of this component.
        let stem = component.split(';').next().unwrap_or(component);
        if stem.is_empty() || is_dot_like(stem) {
            return Err(Refusal::BadPath);
        }
    }
    Ok(())
}

/// `.`/`..` and their Unicode look-alikes (every char a dot or a dot leader).
fn is_dot_like(component: &str) -> bool {
    component.chars().all(|c| {
        matches!(
            c,
            '.' | '\u{FF0E}' | '\u{FE52}' | '\u{2024}' | '\u{2025}' | '\u{2026}'
        )
    })
}

/// A hyphenated UUID in any case, optionally followed by `.git`. Other UUID spellings
/// (braced, URN, 32 bare hex digits) are not repo ids here: the upstream might read them
/// differently from us.
fn parse_repo_id(segment: &str) -> Option<(Uuid, bool)> {
    let (id, git) = match segment.strip_suffix(".git") {
        Some(id) => (id, true),
        None => (segment, false),
    };
    let bytes = id.as_bytes();
    if bytes.len() != 36 || [8, 13, 18, 23].iter().any(|&i| bytes[i] != b'-') {
        return None;
    }
    Uuid::try_parse(id).ok().map(|uuid| (uuid, git))
}

/// SPEC §4 rows 2–3: exactly one `Authorization` header, Bearer or git's Basic.
pub fn parse_credential(headers: &HeaderMap, git_challenge: bool) -> Result<Credential, Refusal> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(Refusal::MissingCredentials { git: git_challenge });
    };
    if values.next().is_some() {
        return Err(Refusal::MalformedCredentials);
    }
    let value = value.to_str().map_err(|_| Refusal::MalformedCredentials)?;
    let (scheme, rest) = value
        .trim()
        .split_once(' ')
        .ok_or(Refusal::MalformedCredentials)?;
    let rest = rest.trim_start();
    if scheme.eq_ignore_ascii_case("bearer") {
        credential_from_secret(rest)
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| Refusal::MalformedCredentials)?;
        let decoded = std::str::from_utf8(&decoded).map_err(|_| Refusal::MalformedCredentials)?;
        // git sends `user:password`; the username is conventionally `token` but carries
        // no authority, so any username is accepted and only the password is the secret.
        let (user, secret) = decoded
            .split_once(':')
            .ok_or(Refusal::MalformedCredentials)?;
        // The username is forwarded too: one that is itself a Relace credential would
        // carry a second, unchecked credential to the upstream.
        if user.len() >= 3 && user[..3].eq_ignore_ascii_case("rlc") {
            return Err(Refusal::MalformedCredentials);
        }
        credential_from_secret(secret)
    } else {
        Err(Refusal::MalformedCredentials)
    }
}

fn credential_from_secret(secret: &str) -> Result<Credential, Refusal> {
    if secret.is_empty() || secret.contains(char::is_whitespace) {
        return Err(Refusal::MalformedCredentials);
    }
    if secret.starts_with(REPO_TOKEN_PREFIX) {
        if !is_well_formed_repo_token(secret) {
            return Err(Refusal::MalformedCredentials);
        }
        Ok(Credential::RepoToken(TokenDigest::of(secret)))
    } else {
        Ok(Credential::AccountKey)
    }
}

/// A presented repo token, held only while the one upstream call that needs it (an
/// introspection) is made. `Debug` prints nothing of it.
pub struct TokenSecret(String);

impl TokenSecret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

/// Re-reads the repo token from a request already classified as carrying one. Only
/// called on a cache miss or a revalidation, so the hot path never copies the token.
pub fn presented_repo_token(headers: &HeaderMap) -> Option<TokenSecret> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim_start();
    let secret = if scheme.eq_ignore_ascii_case("bearer") {
        rest.to_owned()
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        decoded.split_once(':')?.1.to_owned()
    } else {
        return None;
    };
    is_well_formed_repo_token(&secret).then_some(TokenSecret(secret))
}

/// `rlcr-` followed by 16..=128 ASCII letters or digits.
pub fn is_well_formed_repo_token(token: &str) -> bool {
    token.strip_prefix(REPO_TOKEN_PREFIX).is_some_and(|body| {
        (TOKEN_BODY_MIN..=TOKEN_BODY_MAX).contains(&body.len())
            && body.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "123e4567-e89b-12d3-a456-426614174000";

    fn path(raw: &str) -> Result<RepoPath<'_>, Refusal> {
        parse_raw_path(raw)
    }

    #[test]
    fn plain_repo_paths_parse() {
        let p = path("/v1/repo/123e4567-e89b-12d3-a456-426614174000/file/src/main.rs").unwrap();
        assert_eq!(p.repo_id, Some(Uuid::parse_str(ID).unwrap()));
        assert_eq!(p.route_class(), RouteClass::RepoFile);
        let p = path("/v1/repo/123E4567-E89B-12D3-A456-426614174000").unwrap();
        assert_eq!(p.route_class(), RouteClass::Repo);
        let p = path("/v1/repo/123e4567-e89b-12d3-a456-426614174000.git/info/refs").unwrap();
        assert_eq!(p.route_class(), RouteClass::Git);
        assert!(p.git_suffix);
    }

    #[test]
    fn non_canonical_paths_are_refused() {
        for raw in [
            "/v1/repo/x/../y",
            "/v1/repo/x/%2e%2e/y",
            "/v1/repo/x/%2E/y",
            "/v1//repo/x",
            "//v1/repo/x",
            "/v1%2Frepo/x",
            "/v1/repo%2Fx",
            "/v1/repo/a%2F..%2Fb/x",
            "/v1/repo/x/file/a\\b",
            "/v1/repo/x/file/a%5Cb",
            "/v1/repo/x/file/a%00b",
            "/v1/repo/x/file/a%0Ab",
            "/v1/repo/x/file/%ff",
            "/v1/repo/x/file/%zz",
            "/v1/repo/x/file/%4",
            "/v1/repo/x/file/..%2Fy",
            "/v1/repo/x/file/a%2F%2Fb",
            "/v1/repo/x/..;/y",
            "/v1/repo/x/%2e%2e;a=b/y",
            "/v1/repo/x/;/y",
            "/v1/%72epo/x",
            "/v1/repo;a/x",
            "/v1/repo/x/%ef%bc%8e%ef%bc%8e/y",
            "/v1/repo/x/file/a%ef%bc%8fb",
            "*",
        ] {
            assert_eq!(path(raw).err(), Some(Refusal::BadPath), "{raw}");
        }
    }

    #[test]
    fn absolute_form_is_refused_on_http1_but_normal_on_http2() {
        let uri: Uri = format!("http://evil.example/v1/repo/{ID}").parse().unwrap();
        assert_eq!(
            parse_path(&Method::GET, &uri, Version::HTTP_11).err(),
            Some(Refusal::BadPath)
        );
        assert!(parse_path(&Method::GET, &uri, Version::HTTP_2).is_ok());
        let connect: Uri = "evil.example:443".parse().unwrap();
        assert_eq!(
            parse_path(&Method::CONNECT, &connect, Version::HTTP_2).err(),
            Some(Refusal::BadPath)
        );
    }

    #[test]
    fn decoding_happens_once() {
        let raw = format!("/v1/repo/{ID}/file/%252e%252e/x");
        let p = path(&raw).unwrap();
        assert_eq!(p.route_class(), RouteClass::RepoFile);
    }

    #[test]
    fn encoded_slash_inside_a_file_path_is_fine() {
        let raw = format!("/v1/repo/{ID}/file/src%2Fmain.rs");
        let p = path(&raw).unwrap();
        assert_eq!(p.route_class(), RouteClass::RepoFile);
        assert!(path(&format!("/v1/repo/{ID}/file/dir%2F")).is_ok());
        assert!(path(&format!("/v1/repo/{ID}/")).is_ok());
    }

    #[test]
    fn non_uuid_ids_are_not_repo_routes() {
        for raw in [
            "/v1/repo/abc/file/x",
            "/v1/repo/123e4567e89b12d3a456426614174000",
            "/v1/repo/{123e4567-e89b-12d3-a456-426614174000}",
            "/V1/Repo/123e4567-e89b-12d3-a456-426614174000",
            "/v1/repo",
            "/v1/repo_token/abc",
            "/",
        ] {
            assert_eq!(path(raw).unwrap().repo_id, None, "{raw}");
        }
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn credentials_parse() {
        let tok = "rlcr-0123456789abcdef0123";
        let digest = TokenDigest::of(tok);
        assert_eq!(
            parse_credential(&headers(&[&format!("Bearer {tok}")]), false),
            Ok(Credential::RepoToken(digest))
        );
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("token:{tok}"));
        assert_eq!(
            parse_credential(&headers(&[&format!("Basic {basic}")]), true),
            Ok(Credential::RepoToken(digest))
        );
        assert_eq!(
            parse_credential(&headers(&["Bearer rlc-accountkey"]), false),
            Ok(Credential::AccountKey)
        );
        assert_eq!(
            parse_credential(&headers(&[]), true),
            Err(Refusal::MissingCredentials { git: true })
        );
        for bad in [
            "Bearer rlcr-short",
            "Bearer rlcr-0123456789abcdef012_",
            "Digest abc",
            "Basic !!!",
            "Bearer",
            "Bearer ",
        ] {
            assert_eq!(
                parse_credential(&headers(&[bad]), false),
                Err(Refusal::MalformedCredentials),
                "{bad}"
            );
        }
        assert_eq!(
            parse_credential(&headers(&[&format!("Bearer {tok}"), "Bearer x"]), false),
            Err(Refusal::MalformedCredentials)
        );
    }
}
