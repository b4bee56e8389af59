//! SPEC §7 durability with the real binary: with `scopes.store = "embedded"`, an
//! acknowledged mint, registration or revocation survives `kill -9` and a restart on the
//! same file; the file never holds a plaintext token; a store path that cannot be created
//! stops the binary at start-up with a message naming `scopes.path`.

mod support;
use support::*;

use std::io::Read as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A TOML basic string holding `path` (JSON string escaping is valid TOML for these).
fn toml_path(path: &Path) -> String {
    serde_json::to_string(path.to_str().expect("UTF-8 temp path")).expect("encode path")
}

/// The default test gateway in front of `upstream_url`, on the embedded store at `db`.
fn embedded_builder(upstream_url: &str, db: &Path) -> GatewayBuilder {
    Gateway::builder(upstream_url)
        .set("scopes.store", "\"embedded\"")
        .set("scopes.path", &toml_path(db))
}

async fn proxy_get(gp: &GatewayProcess, token: &str, repo: &str) -> RawResponse {
    call_with_auth(gp.proxy, "GET", &format!("/v1/repo/{repo}"), &bearer(token)).await
}

/// Requests the fake upstream received for `GET /v1/repo/<repo>` carrying `token`.
fn forwarded_with(fake: &FakeRelace, token: &str, repo: &str) -> usize {
    let target = format!("/v1/repo/{repo}");
    let auth = bearer(token);
    fake.requests()
        .iter()
        .filter(|r| r.target == target && r.header("authorization") == Some(auth.as_str()))
        .count()
}

/// `token` goes through the proxy to the fake upstream: 200, and one more request there.
async fn assert_forwarded(gp: &GatewayProcess, fake: &FakeRelace, token: &str, what: &str) {
    let before = forwarded_with(fake, token, REPO_A);
    let r = proxy_get(gp, token, REPO_A).await;
    assert_eq!(
        r.status,
        200,
        "{what}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        forwarded_with(fake, token, REPO_A),
        before + 1,
        "{what}: the upstream must have received the request"
    );
}

/// `token` is refused by the gateway itself with `status` and `code`; the upstream never
/// sees it.
async fn assert_refused(
    gp: &GatewayProcess,
    fake: &FakeRelace,
    token: &str,
    repo: &str,
    status: u16,
    code: &str,
) {
    let before = forwarded_with(fake, token, repo);
    let r = proxy_get(gp, token, repo).await;
    assert_eq!(
        r.status,
        status,
        "expected {code}: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["code"], code);
    assert_eq!(
        forwarded_with(fake, token, repo),
        before,
        "a refused request must not reach the upstream"
    );
}

async fn register(gp: &GatewayProcess, token: &str, name: &str) -> RawResponse {
    let body = serde_json::json!({ "token": token, "name": name, "repo_ids": [REPO_A] });
    register_at(gp.admin, &body).await
}

/// Every regular file below `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn sha256(data: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_scopes_survive_kill_9_and_never_touch_disk_in_plaintext() {
    let fake = FakeRelace::start().await;
    let data = tempfile::tempdir().expect("tempdir");
    let db = data.path().join("state").join("scopes.db");
    let builder = embedded_builder(&fake.url(), &db);

    let mut gp = GatewayProcess::spawn(&builder);
    let ready = call(gp.admin, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "/readyz on the embedded store");

    // 1. Minted through the admin passthrough (the orchestrator's path).
    let mint = mint_at(gp.admin, "durable-mint", &[REPO_A], Some(3600)).await;
    let minted = mint["token"].as_str().expect("token").to_owned();

    // 2. Registered through the admin API.
    let registered = new_token();
    let r = register(&gp, &registered, "durable-admin").await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    // 3. Registered, then revoked.
    let revoked = new_token();
    let r = register(&gp, &revoked, "durable-revoked").await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let target = format!("/admin/tokens/{revoked}");
    let r = call_with_auth(gp.admin, "DELETE", &target, &bearer(ADMIN_TOKEN)).await;
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));

    assert_forwarded(&gp, &fake, &minted, "minted, before the crash").await;
    assert_forwarded(&gp, &fake, &registered, "registered, before the crash").await;
    assert_refused(&gp, &fake, &revoked, REPO_A, 401, "token_revoked").await;
    let listed_before = listing_at(gp.admin).await;

    // kill -9: no graceful shutdown, nothing flushed on the way out.
    gp.child.kill().expect("SIGKILL");
    let status = gp.child.wait().expect("wait");
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL, not exited");
    drop(gp);

    // A new process on the same file, in front of the same (still running) upstream.
    let gp = GatewayProcess::spawn(&builder);
    let ready = call(gp.admin, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "/readyz on the reopened embedded store");

    assert_forwarded(&gp, &fake, &minted, "minted, after the crash").await;
    assert_forwarded(&gp, &fake, &registered, "registered, after the crash").await;
    // Still revoked, not merely forgotten.
    assert_refused(&gp, &fake, &revoked, REPO_A, 401, "token_revoked").await;
    // The scope itself survived, not just the token's existence.
    assert_refused(&gp, &fake, &registered, REPO_B, 403, "repo_out_of_scope").await;
    assert_refused(&gp, &fake, &minted, REPO_B, 403, "repo_out_of_scope").await;
    assert_refused(&gp, &fake, &new_token(), REPO_A, 401, "unknown_token").await;

    // Exactly the two active tokens, with their sources, as before the crash.
    let listed = listing_at(gp.admin).await;
    assert_eq!(
        listed, listed_before,
        "the listing survives the crash unchanged"
    );
    let tokens = listed["tokens"].as_array().expect("tokens array");
    assert_eq!(tokens.len(), 2, "{listed}");
    for (token, name, source) in [
        (&minted, "durable-mint", "mint"),
        (&registered, "durable-admin", "admin"),
    ] {
        let id = token_id(token);
        let entry = tokens
            .iter()
            .find(|t| t["id"] == id)
            .unwrap_or_else(|| panic!("{source} token {id} not listed: {listed}"));
        assert_eq!(entry["source"], source, "{entry}");
        assert_eq!(entry["name"], name, "{entry}");
        assert_eq!(entry["repo_ids"], serde_json::json!([REPO_A]), "{entry}");
    }
    let minted_entry = tokens.iter().find(|t| t["source"] == "mint").expect("mint");
    assert!(
        minted_entry["expires_at"].is_string(),
        "the minted token's expiry survives: {minted_entry}"
    );
    let revoked_id = token_id(&revoked);
    assert!(
        tokens.iter().all(|t| t["id"] != revoked_id),
        "the revoked token is not listed: {listed}"
    );

    // The tombstone is durable: a replayed registration cannot resurrect the token.
    let again = register(&gp, &revoked, "resurrected").await;
    assert_eq!(
        again.status,
        409,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.json()["code"], "token_revoked");
    assert_refused(&gp, &fake, &revoked, REPO_A, 401, "token_revoked").await;
    drop(gp);

    // No file of the data directory holds any plaintext token, nor its body.
    let files = files_under(data.path());
    assert!(
        !files.is_empty(),
        "the store wrote nothing under {:?}",
        data.path()
    );
    let mut digests_seen = 0;
    for file in &files {
        let bytes = std::fs::read(file).expect("read store file");
        for token in [&minted, &registered, &revoked] {
            let body = token.strip_prefix("rlcr-").expect("rlcr- token");
            assert!(
                !contains(&bytes, token.as_bytes()),
                "{} holds a plaintext token",
                file.display()
            );
            assert!(
                !contains(&bytes, body.as_bytes()),
                "{} holds a token body",
                file.display()
            );
            if contains(&bytes, &sha256(token.as_bytes())) {
                digests_seen += 1;
            }
        }
    }
    // Control: the scan did look at the store (its keys are the digests).
    assert!(
        digests_seen >= 3,
        "expected the three token digests in the store files, found {digests_seen}"
    );
}

/// Runs the binary on `config` until it exits (at most 30 s) and returns its exit status
/// and stderr.
fn run_until_exit(config: &Path) -> (std::process::ExitStatus, String) {
    let stderr_path = config.with_extension("stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_scopegate"))
        .arg("--config")
        .arg(config)
        .env_remove("SCOPEGATE_CONFIG")
        .env("SCOPEGATE_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("spawn scopegate");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("scopegate kept running with a store path it cannot create");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    std::fs::File::open(&stderr_path)
        .expect("open stderr file")
        .read_to_string(&mut out)
        .expect("read stderr");
    (status, out)
}

#[test]
fn an_uncreatable_store_path_stops_the_binary_naming_scopes_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A regular file where the store's directory would have to be.
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"a file, not a directory").expect("write blocker");
    let db = blocker.join("sub").join("scopes.db");
    let builder = embedded_builder("http://127.0.0.1:9", &db);
    let config = dir.path().join("scopegate.toml");
    std::fs::write(&config, builder.toml("127.0.0.1:0", "127.0.0.1:0")).expect("write config");

    let (status, stderr) = run_until_exit(&config);
    assert!(
        !status.success(),
        "must exit non-zero, got {status:?}; stderr:\n{stderr}"
    );
    assert!(
        status.code().is_some(),
        "must exit, not die by a signal: {status:?}"
    );
    assert!(
        stderr.contains("scopes.path"),
        "the message must name scopes.path; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("scopegate listening"),
        "a gateway without its store must never listen; stderr:\n{stderr}"
    );
    assert!(!db.exists());
}
