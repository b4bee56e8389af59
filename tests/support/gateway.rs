//! Runs the real gateway for tests: in-process on `127.0.0.1:0` (`Gateway`), or as the
//! real binary in a child process (`GatewayProcess`) when a test must measure the
//! gateway's own memory or signals.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::fake_relace::{FakeRelace, ACCOUNT_KEY};
use super::raw::{body_text, call, call_with_auth, post_json, sha_hex, RawResponse};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";
/// The repo the tests' tokens are usually scoped to.
pub const REPO_A: &str = "3f2c9a1e-7b4d-4e8a-9c6f-1a2b3c4d5e6f";
/// A repo those tokens are not scoped to.
pub const REPO_B: &str = "8e1d2c3b-4a59-4f6e-8d7c-6b5a49382716";

/// A fresh, well-formed repo token (`rlcr-` + 40 hex).
pub fn new_token() -> String {
    format!(
        "rlcr-{}{}",
        uuid::Uuid::new_v4().simple(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The 12-hex public id of a token (SPEC §7).
pub fn token_id(token: &str) -> String {
    sha_hex(token.as_bytes())[..12].to_owned()
}

/// A file route of `repo` (`GET` it to read `src/main.rs`).
/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A secrets file holding `key` (with the trailing newline such files usually have).
pub fn key_file(key: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp key file");
    std::fs::write(file.path(), format!("{key}\n")).expect("write key file");
    file
}

pub fn file_url(repo: &str) -> String {
    format!("/v1/repo/{repo}/file/src/main.rs")
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// git's credential form: `Basic base64("token:<secret>")`.
pub fn basic(secret: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("token:{secret}"))
    )
}

/// Builds the gateway's TOML config: loopback listeners, the memory store, the given
/// upstream, plus any `section.key = value` overrides.
pub struct GatewayBuilder {
    upstream_url: String,
    settings: Vec<(String, String, String)>,
    admin_token: bool,
    /// Extra environment for the real binary ([`GatewayProcess`]).
    env: Vec<(String, String)>,
}

impl GatewayBuilder {
    /// Sets `section.key` to a TOML value, e.g. `.set("upstream.connect_timeout", "\"250ms\"")`.
    pub fn set(mut self, key: &str, toml_value: &str) -> Self {
        let (section, key) = key.split_once('.').expect("section.key");
        self.settings
            .push((section.to_owned(), key.to_owned(), toml_value.to_owned()));
        self
    }

    /// Sets an environment variable for the process started by [`GatewayProcess::spawn`].
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts without an admin token (the admin API is then refused).
    pub fn without_admin_token(mut self) -> Self {
        self.admin_token = false;
        self
    }

    pub fn toml(&self, proxy_listen: &str, admin_listen: &str) -> String {
        let mut sections: Vec<(String, Vec<(String, String)>)> = vec![
            (
                "proxy".into(),
                vec![("listen".into(), format!("\"{proxy_listen}\""))],
            ),
            (
                "admin".into(),
                vec![("listen".into(), format!("\"{admin_listen}\""))],
            ),
            (
                "upstream".into(),
                vec![("url".into(), format!("\"{}\"", self.upstream_url))],
            ),
            ("scopes".into(), vec![("store".into(), "\"memory\"".into())]),
        ];
        if self.admin_token {
            sections[1]
                .1
                .push(("token".into(), format!("\"{ADMIN_TOKEN}\"")));
        }
        for (section, key, value) in &self.settings {
            let entry = match sections.iter_mut().find(|(s, _)| s == section) {
                Some(entry) => entry,
                None => {
                    sections.push((section.clone(), Vec::new()));
                    sections.last_mut().expect("just pushed")
                }
            };
            entry.1.retain(|(k, _)| k != key);
            entry.1.push((key.clone(), value.clone()));
        }
        let mut out = String::new();
        for (section, keys) in sections {
            out.push_str(&format!("[{section}]\n"));
            for (k, v) in keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }

    /// Starts the real gateway in this process on two fresh loopback ports.
    pub async fn start(self) -> Gateway {
        let toml = self.toml("127.0.0.1:0", "127.0.0.1:0");
        let (config, _) = scopegate::config::from_toml_with_env(&toml, Vec::new())
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"));
        let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let proxy_addr = proxy.local_addr().expect("proxy addr");
        let admin_addr = admin.local_addr().expect("admin addr");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(scopegate::run(
            config,
            scopegate::Listeners { proxy, admin },
            async move {
                let _ = stop_rx.await;
            },
        ));
        Gateway {
            proxy: proxy_addr,
            admin: admin_addr,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }
}

/// The real gateway, running in this process.
pub struct Gateway {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Gateway {
    pub fn builder(upstream_url: &str) -> GatewayBuilder {
        GatewayBuilder {
            upstream_url: upstream_url.to_owned(),
            settings: Vec::new(),
            admin_token: true,
            env: Vec::new(),
        }
    }

    /// A gateway with default settings in front of `fake`.
    pub async fn start(fake: &FakeRelace) -> Gateway {
        Self::builder(&fake.url()).start().await
    }

    /// `POST /admin/tokens` with the admin token.
    pub async fn register(
        &self,
        token: &str,
        repo_ids: &[&str],
        expires_at: Option<&str>,
    ) -> RawResponse {
        let body = serde_json::json!({
            "token": token,
            "name": "test",
            "repo_ids": repo_ids,
            "expires_at": expires_at,
        });
        register_at(self.admin, &body).await
    }

    /// Registers a fresh token for `repo_ids` and returns it.
    pub async fn token_for(&self, repo_ids: &[&str]) -> String {
        let token = new_token();
        let r = self.register(&token, repo_ids, None).await;
        assert_eq!(r.status, 201, "register: {}", body_text(&r));
        token
    }

    /// Mints a token through the admin listener's `/v1/repo_token` passthrough (the
    /// orchestrator's path) and returns it.
    pub async fn mint(&self, name: &str, repo_ids: &[&str], ttl_seconds: Option<u64>) -> String {
        mint_at(self.admin, name, repo_ids, ttl_seconds).await["token"]
            .as_str()
            .expect("token in mint answer")
            .to_owned()
    }

    /// `GET /admin/tokens` with the admin token → the listed entries.
    pub async fn listed(&self) -> Vec<serde_json::Value> {
        listing_at(self.admin).await["tokens"]
            .as_array()
            .expect("tokens array")
            .to_owned()
    }

    /// The Prometheus text from `/metrics`.
    pub async fn metrics(&self) -> String {
        let r = call(self.admin, "GET", "/metrics", &[], b"").await;
        assert_eq!(r.status, 200);
        String::from_utf8(r.body).expect("utf-8 metrics")
    }

    /// Stops the gateway (as SIGTERM would) and waits for it to finish draining.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("gateway task panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `POST /admin/tokens` on the admin listener at `admin` with the admin token and `body`.
pub async fn register_at(admin: SocketAddr, body: &serde_json::Value) -> RawResponse {
    let auth = bearer(ADMIN_TOKEN);
    post_json(admin, "/admin/tokens", &auth, body.to_string().as_bytes()).await
}

/// Mints through the `/v1/repo_token` passthrough of the admin listener at `admin` with
/// the account key; checks the 200 and returns the mint answer.
pub async fn mint_at(
    admin: SocketAddr,
    name: &str,
    repo_ids: &[&str],
    ttl_seconds: Option<u64>,
) -> serde_json::Value {
    let body =
        serde_json::json!({ "name": name, "repo_ids": repo_ids, "ttl_seconds": ttl_seconds });
    let r = post_json(
        admin,
        "/v1/repo_token",
        &bearer(ACCOUNT_KEY),
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "mint: {}", body_text(&r));
    r.json()
}

/// `GET /admin/tokens` on the admin listener at `admin` with the admin token; checks the
/// 200 and returns the whole answer.
pub async fn listing_at(admin: SocketAddr) -> serde_json::Value {
    let r = call_with_auth(admin, "GET", "/admin/tokens", &bearer(ADMIN_TOKEN)).await;
    assert_eq!(r.status, 200, "GET /admin/tokens: {}", body_text(&r));
    r.json()
}

/// Resident set size of a process, in KiB, from `/proc/<pid>/status`.
pub fn rss_kib_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Value of one metric sample line (`name{labels} value`), 0 when absent.
pub fn metric_value(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// `scopegate_requests_total` of the proxy listener for `decision` (0 when absent).
pub fn proxy_decisions(metrics: &str, decision: &str) -> f64 {
    metric_value(
        metrics,
        &format!("scopegate_requests_total{{decision=\"{decision}\",listener=\"proxy\"}}"),
    )
}

/// Sends one request over a fresh HTTP/1.1 connection with hyper's client and returns
/// the streaming response (for tests that read bodies frame by frame).
pub async fn hyper_send<B>(addr: SocketAddr, req: Request<B>) -> http::Response<Incoming>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.expect("send request")
}

/// The real `scopegate` binary in a child process.
pub struct GatewayProcess {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub config_dir: tempfile::TempDir,
    /// Everything the process wrote to stderr (its JSON log lines), as it arrives.
    logs: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl GatewayProcess {
    /// Writes `builder`'s config (with port 0 listeners) and starts the binary with JSON
    /// logs; the bound addresses are read from its start-up log line.
    pub fn spawn(builder: &GatewayBuilder) -> GatewayProcess {
        Self::spawn_with_log_filter(builder, "warn,scopegate=info,scopegate::access=warn")
    }

    /// As [`spawn`](Self::spawn), with `RUST_LOG` set to `filter` (e.g. `"info"` to get
    /// one access-log line per request).
    pub fn spawn_with_log_filter(builder: &GatewayBuilder, filter: &str) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("scopegate.toml");
        std::fs::write(&path, builder.toml("127.0.0.1:0", "127.0.0.1:0")).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_scopegate"))
            .arg("--config")
            .arg(&path)
            .env("SCOPEGATE_LOG_FORMAT", "json")
            .env("RUST_LOG", filter)
            .env_remove("SCOPEGATE_CONFIG")
            .envs(builder.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn scopegate");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(stderr).lines();
        let (proxy, admin) = loop {
            let line = match lines.next() {
                Some(Ok(line)) => line,
                other => panic!(
                    "scopegate exited before listening: {other:?}; it said:\n{}",
                    logs.lock().map(|l| l.clone()).unwrap_or_default()
                ),
            };
            if let Ok(mut all) = logs.lock() {
                all.push_str(&line);
                all.push('\n');
            }
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["message"] == "scopegate listening" {
                let addr = |k: &str| -> SocketAddr {
                    v[k].as_str()
                        .and_then(|s| s.parse().ok())
                        .expect("listening address")
                };
                break (addr("proxy"), addr("admin"));
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(mut all) = sink.lock() {
                    all.push_str(&line);
                    all.push('\n');
                }
            }
        });
        GatewayProcess {
            child,
            proxy,
            admin,
            config_dir: dir,
            logs,
            reader: Some(reader),
        }
    }

    /// The log lines written so far.
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Resident set size of the gateway process, in KiB, from `/proc`.
    pub fn rss_kib(&self) -> u64 {
        rss_kib_of(self.child.id())
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl GatewayProcess {
    /// SIGTERM, then the exit status (bounded wait) and every log line the process wrote
    /// up to its exit.
    pub fn stop(mut self, within: Duration) -> (Option<std::process::ExitStatus>, String) {
        let status = self.terminate(within);
        if status.is_some() {
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
        }
        (status, self.logs())
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
