//! The command line (SPEC §2), start-up refusals, signals, and the rule that no token
//! ever reaches a log line, a metric or a listing (SPEC §7).

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn scopegate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scopegate"));
    cmd.env_remove("SCOPEGATE_CONFIG")
        .env_remove("SCOPEGATE_ADMIN_TOKEN")
        .env_remove("RELACE_API_KEY")
        .stdin(Stdio::null());
    cmd
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("scopegate.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn version_and_help() {
    let out = scopegate().arg("--version").output().expect("run");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("scopegate {}", env!("CARGO_PKG_VERSION"))
    );
    let out = scopegate().arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("check-config") && help.contains("--config"),
        "{help}"
    );
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        "[admin]\ntoken = \"a-very-secret-admin-token\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n",
    );
    let out = scopegate()
        .args(["check-config", "--config"])
        .arg(&path)
        .env("SCOPEGATE_UPSTREAM__CONNECT_TIMEOUT", "750ms")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("a-very-secret-admin-token"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
    assert!(
        text.contains("connect_timeout = \"750ms\""),
        "env override not applied: {text}"
    );
    assert!(text.contains("url = \"http://127.0.0.1:1\""), "{text}");
}

#[test]
fn check_config_lists_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        "[proxy]\nlisten = \"eighty\"\n[upstream]\nurl = \"ftp://x\"\nresponse_header_timeout = \"later\"\n[scopes]\nstore = \"floppy\"\n",
    );
    let out = scopegate()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "proxy.listen",
        "upstream.url",
        "upstream.response_header_timeout",
        "scopes.store",
    ] {
        assert!(err.contains(key), "{key} not named in: {err}");
    }
}

#[test]
fn a_bad_config_never_starts_a_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[proxy]\nlisten = \"127.0.0.1:0\"\nunknown_key = 1\n");
    let out = scopegate()
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown_key"), "{err}");

    // A bad environment override is refused the same way, naming the variable.
    let out = scopegate()
        .arg("--config")
        .arg(write_config(&dir, "[proxy]\nlisten = \"127.0.0.1:0\"\n"))
        .env("SCOPEGATE_PROXY__ALLOW_ACCOUNT_KEYS", "perhaps")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SCOPEGATE_PROXY__ALLOW_ACCOUNT_KEYS"));

    let out = scopegate()
        .args(["--config", "/nonexistent/scopegate.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn scopegate_config_env_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[upstream]\nurl = \"http://127.0.0.1:7\"\n");
    let out = scopegate()
        .arg("check-config")
        .env("SCOPEGATE_CONFIG", &path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("http://127.0.0.1:7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_gateway_cleanly() {
    let fake = FakeRelace::start().await;
    let gp = GatewayProcess::spawn(&Gateway::builder(&fake.url()));
    let ready = call(gp.admin, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200);
    let (status, logs) = tokio::task::spawn_blocking(move || gp.stop(Duration::from_secs(10)))
        .await
        .expect("join");
    let status = status.expect("scopegate did not exit within 10 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "{logs}");
    // JSON mode: every line, start-up and shutdown included, is JSON.
    for line in logs.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
}

/// A token exists only in the request that carries it: not in log lines, metrics,
/// listings, or admin answers (SPEC §7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_reach_logs_metrics_or_listings() {
    let fake = FakeRelace::start().await;
    let gp = GatewayProcess::spawn_with_log_filter(&Gateway::builder(&fake.url()), "debug");
    let admin_auth = bearer(ADMIN_TOKEN);
    let account = bearer(ACCOUNT_KEY);

    // Minted through the admin passthrough…
    let mint_body = format!(r#"{{"name":"sb","repo_ids":["{REPO_A}"],"ttl_seconds":600}}"#);
    let mint = post_json(gp.admin, "/v1/repo_token", &account, mint_body.as_bytes()).await;
    assert_eq!(mint.status, 200);
    let minted = mint.json()["token"].as_str().expect("token").to_owned();
    // …and registered through the admin API.
    let registered = new_token();
    let body = format!(r#"{{"token":"{registered}","name":"reg","repo_ids":["{REPO_A}"]}}"#);
    let reg = call(
        gp.admin,
        "POST",
        "/admin/tokens",
        &[("Authorization", &admin_auth)],
        body.as_bytes(),
    )
    .await;
    assert_eq!(reg.status, 201);
    assert!(!String::from_utf8_lossy(&reg.body).contains(&registered));

    for token in [&minted, &registered] {
        let auth = bearer(token);
        let ok = call_with_auth(gp.proxy, "GET", &format!("/v1/repo/{REPO_A}"), &auth).await;
        assert_eq!(ok.status, 200);
        let refused = call_with_auth(gp.proxy, "GET", &format!("/v1/repo/{REPO_B}"), &auth).await;
        assert_eq!(refused.status, 403);
        assert!(!String::from_utf8_lossy(&refused.body).contains(token.as_str()));
        let git = basic(token);
        let ok = call_with_auth(
            gp.proxy,
            "GET",
            &format!("/v1/repo/{REPO_A}.git/info/refs?service=git-upload-pack"),
            &git,
        )
        .await;
        assert_eq!(ok.status, 200);
    }
    // Paths that carry a token: the passthrough's token routes.
    let read = call_with_auth(
        gp.admin,
        "GET",
        &format!("/v1/repo_token/{minted}"),
        &account,
    )
    .await;
    assert_eq!(read.status, 200);
    let one = call_with_auth(
        gp.admin,
        "GET",
        &format!("/admin/tokens/{registered}"),
        &admin_auth,
    )
    .await;
    assert_eq!(one.status, 200);
    let listing = call_with_auth(gp.admin, "GET", "/admin/tokens", &admin_auth).await;
    let metrics = call(gp.admin, "GET", "/metrics", &[], b"").await;
    let deleted = call_with_auth(
        gp.admin,
        "DELETE",
        &format!("/v1/repo_token/{minted}"),
        &account,
    )
    .await;
    assert_eq!(deleted.status, 204);

    let (status, logs) = tokio::task::spawn_blocking(move || gp.stop(Duration::from_secs(10)))
        .await
        .expect("join");
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(
        logs.contains("\"decision\":\"repo_out_of_scope\""),
        "access log missing:\n{logs}"
    );

    for token in [&minted, &registered] {
        let digest = scopegate::scope::TokenDigest::of(token);
        let body = token.strip_prefix("rlcr-").expect("prefix");
        for (what, text) in [
            ("logs", logs.as_str()),
            ("listing", &String::from_utf8_lossy(&listing.body)),
            ("entry", &String::from_utf8_lossy(&one.body)),
            ("metrics", &String::from_utf8_lossy(&metrics.body)),
        ] {
            assert!(!text.contains(body), "token found in {what}");
            assert!(
                !text.contains(&digest.to_hex()),
                "full digest found in {what}"
            );
        }
        // The 12-hex id is how a token is named everywhere.
        assert!(String::from_utf8_lossy(&listing.body).contains(digest.id().as_str()));
        assert!(logs.contains(digest.id().as_str()));
    }
    assert!(
        !String::from_utf8_lossy(&metrics.body).contains(REPO_A),
        "repo id in metrics"
    );
}
