//! Real git clients through the gateway (SPEC §4 rows 2, 6 and 9 on git routes, §6
//! streaming; RELACE_API.md §c "Git access").
//!
//! The upstream here is not the fake: it serves git smart HTTP on
//! `/v1/repo/<uuid>.git/...` by running the machine's real `git http-backend` (CGI) over
//! bare repositories in a tempdir, and it demands `Authorization: Basic
//! base64("token:<rlcr>")` with a token it knows (else 401 with a Basic challenge), as
//! the real edge presumably does. It records every request it receives, so the tests can
//! prove what did (and did not) get through the gateway.
//!
//! git always sends its first request without credentials and only retries with them
//! after a `401` + `WWW-Authenticate: Basic`; a push above 1 MiB (`http.postBuffer`)
//! goes out with `Transfer-Encoding: chunked`. Both must survive the gateway.
//!
//! tokio's `process` feature is not enabled in this crate, so child processes (git, and
//! `git http-backend` behind the upstream) are run with `std::process` on plain threads
//! and bridged to the async side with channels.

mod support;

use support::*;

use std::collections::HashSet;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RespBody = UnsyncBoxBody<Bytes, BoxError>;

const MIB: usize = 1024 * 1024;
/// Size of the file pushed in the first test: random bytes, so the pack stays above
/// git's 1 MiB `http.postBuffer` and the push goes out chunked.
const BIG_FILE_LEN: usize = 5 * 1000 * 1000;
/// No single git command in these tests should come anywhere near this.
const GIT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// The git upstream: `git http-backend` behind a recording, Basic-authenticating server.
// ---------------------------------------------------------------------------------------

/// One request as the git upstream saw it.
#[derive(Clone, Debug)]
struct GitRecorded {
    method: String,
    /// Request target exactly as received (path and query).
    target: String,
    /// Lower-case names, values lossy UTF-8.
    headers: Vec<(String, String)>,
    /// Bytes of request body read so far (final once the body has ended).
    body_len: u64,
    /// Whether the request body was read to its end.
    body_complete: bool,
}

impl GitRecorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

#[derive(Default)]
struct GitShared {
    requests: Vec<GitRecorded>,
    /// `Authorization` values the upstream accepts (`Basic base64("token:<rlcr>")`).
    accepted: HashSet<String>,
    /// Whatever `git http-backend` wrote to stderr, for failure messages.
    cgi_stderr: String,
}

struct GitUpstream {
    addr: SocketAddr,
    root: tempfile::TempDir,
    shared: Arc<Mutex<GitShared>>,
    accept: JoinHandle<()>,
}

impl Drop for GitUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn lock(shared: &Mutex<GitShared>) -> MutexGuard<'_, GitShared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl GitUpstream {
    async fn start() -> GitUpstream {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind 127.0.0.1:0 for the git upstream");
        let addr = listener.local_addr().expect("git upstream addr");
        let root = tempfile::tempdir().expect("tempdir for bare repos");
        let shared = Arc::new(Mutex::new(GitShared::default()));
        let accept = tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            root.path().to_owned(),
        ));
        GitUpstream {
            addr,
            root,
            shared,
            accept,
        }
    }

    /// Base URL without `/v1`.
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bare repository that serves `/v1/repo/<repo>.git`.
    fn bare_path(&self, repo: &str) -> PathBuf {
        self.root.path().join(format!("{repo}.git"))
    }

    /// Makes the upstream accept `token` (for every repo it serves).
    fn accept_token(&self, token: &str) {
        lock(&self.shared).accepted.insert(basic(token));
    }

    fn requests(&self) -> Vec<GitRecorded> {
        lock(&self.shared).requests.clone()
    }

    fn cgi_stderr(&self) -> String {
        lock(&self.shared).cgi_stderr.clone()
    }

    /// A readable dump of the recorded requests for assertion messages.
    fn dump(&self) -> String {
        let mut out = String::new();
        for r in self.requests() {
            out.push_str(&format!(
                "  {} {} auth={:?} content-length={:?} transfer-encoding={:?} body_len={} complete={}\n",
                r.method,
                r.target,
                r.header("authorization"),
                r.header("content-length"),
                r.header("transfer-encoding"),
                r.body_len,
                r.body_complete,
            ));
        }
        if out.is_empty() {
            out.push_str("  (none)\n");
        }
        let stderr = self.cgi_stderr();
        if !stderr.is_empty() {
            out.push_str(&format!("git http-backend stderr:\n{stderr}"));
        }
        out
    }
}

/// Creates a bare repo at `bare` (receive-pack enabled), seeded with one commit on
/// `main` holding `README` = `readme`. Local git only, but blocking.
fn create_bare_repo(git: &Git, bare: &Path, readme: &str) {
    git.ok(
        None,
        &["init", "-q", "--bare", "-b", "main", path_str(bare)],
    );
    git.ok(
        None,
        &[
            "--git-dir",
            path_str(bare),
            "config",
            "http.receivepack",
            "true",
        ],
    );
    let seed = tempfile::tempdir_in(git.home.path()).expect("seed tempdir");
    git.ok(None, &["init", "-q", "-b", "main", path_str(seed.path())]);
    std::fs::write(seed.path().join("README"), readme).expect("write README");
    git.ok(Some(seed.path()), &["add", "README"]);
    git.ok(Some(seed.path()), &["commit", "-q", "-m", "seed"]);
    git.ok(
        Some(seed.path()),
        &["push", "-q", path_str(bare), "HEAD:main"],
    );
}

async fn accept_loop(listener: TcpListener, shared: Arc<Mutex<GitShared>>, root: PathBuf) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let root = Arc::new(root);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let builder = builder.clone();
                let shared = shared.clone();
                let root = root.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        handle(shared.clone(), root.clone(), req)
                    });
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = conns.join_next() => {}
        }
    }
}

fn text(status: StatusCode, msg: &str) -> Response<RespBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(msg.to_owned()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn handle(
    shared: Arc<Mutex<GitShared>>,
    root: Arc<PathBuf>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_default();
    let idx = {
        let mut s = lock(&shared);
        s.requests.push(GitRecorded {
            method: parts.method.as_str().to_owned(),
            target: target.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body_len: 0,
            body_complete: false,
        });
        s.requests.len() - 1
    };

    // The upstream checks the credential itself, as the real edge does.
    let auth: Vec<_> = parts
        .headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .collect();
    let authorized = auth.len() == 1
        && auth[0]
            .to_str()
            .is_ok_and(|a| lock(&shared).accepted.contains(a));
    if !authorized {
        let mut resp = text(
            StatusCode::UNAUTHORIZED,
            "git upstream: authentication required\n",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"relace\""),
        );
        return Ok(resp);
    }

    // `/v1/repo/<uuid>.git/<rest>` → PATH_INFO `/<uuid>.git/<rest>`.
    let path = parts.uri.path();
    let Some(path_info) = path
        .strip_prefix("/v1/repo")
        .filter(|p| p.starts_with('/') && p.contains(".git/"))
    else {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "git upstream: not a git route\n",
        ));
    };

    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", root.as_os_str())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", root.as_os_str())
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("PATH_INFO", path_info)
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("REMOTE_USER", "token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let hdr = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if let Some(v) = hdr(header::CONTENT_TYPE) {
        cmd.env("CONTENT_TYPE", v);
    }
    // A chunked push has no Content-Length: http-backend then reads stdin to EOF.
    if let Some(v) = hdr(header::CONTENT_LENGTH) {
        cmd.env("CONTENT_LENGTH", v);
    }
    if let Some(v) = hdr(header::CONTENT_ENCODING) {
        cmd.env("HTTP_CONTENT_ENCODING", v);
    }
    if let Some(v) = hdr(header::HeaderName::from_static("git-protocol")) {
        cmd.env("GIT_PROTOCOL", v);
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Ok(text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("git upstream: cannot run git http-backend: {e}\n"),
            ))
        }
    };
    let mut stdin = child.stdin.take().expect("cgi stdin");
    let mut stdout = child.stdout.take().expect("cgi stdout");
    let mut stderr = child.stderr.take().expect("cgi stderr");

    // Request body → CGI stdin, streamed; dropping stdin at the end of the body is the
    // EOF that ends a chunked push.
    let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(8);
    std::thread::spawn(move || {
        while let Some(chunk) = in_rx.blocking_recv() {
            if stdin.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let pump_shared = shared.clone();
    tokio::spawn(async move {
        let mut body = body;
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        lock(&pump_shared).requests[idx].body_len += data.len() as u64;
                        if in_tx.send(data).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Err(_)) => break,
                None => {
                    lock(&pump_shared).requests[idx].body_complete = true;
                    break;
                }
            }
        }
    });

    // CGI stderr → the shared log.
    let err_shared = shared.clone();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        if !buf.is_empty() {
            lock(&err_shared)
                .cgi_stderr
                .push_str(&String::from_utf8_lossy(&buf));
        }
    });

    // CGI stdout → the response, streamed; the child is reaped once stdout ends.
    let (out_tx, mut out_rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if out_tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(e) => {
                    let _ = out_tx.blocking_send(Err(e));
                    break;
                }
            }
        }
        drop(stdout);
        let _ = child.wait();
    });

    // Parse the CGI header block (up to the blank line); the rest is the body.
    let mut head = Vec::new();
    let (head_len, body_start) = loop {
        if let Some(found) = find_blank_line(&head) {
            break found;
        }
        match out_rx.recv().await {
            Some(Ok(chunk)) => head.extend_from_slice(&chunk),
            Some(Err(e)) => {
                return Ok(text(
                    StatusCode::BAD_GATEWAY,
                    &format!("git upstream: reading http-backend output: {e}\n"),
                ))
            }
            None => {
                return Ok(text(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "git upstream: http-backend ended without a header block: {:?}\n",
                        String::from_utf8_lossy(&head)
                    ),
                ))
            }
        }
    };
    let leftover = Bytes::copy_from_slice(&head[body_start..]);
    let mut resp = Response::new(
        CgiBody {
            first: (!leftover.is_empty()).then_some(leftover),
            rx: out_rx,
        }
        .boxed_unsync(),
    );
    for line in String::from_utf8_lossy(&head[..head_len]).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or("200");
            *resp.status_mut() = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_GATEWAY);
        } else if let (Ok(n), Ok(v)) = (
            header::HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    Ok(resp)
}

/// `(end of headers, start of body)` once `buf` holds a CGI header block.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(c), Some(l)) if l < c => Some((l, l + 2)),
        (Some(c), _) => Some((c, c + 4)),
        (None, Some(l)) => Some((l, l + 2)),
        (None, None) => None,
    }
}

/// The CGI's stdout after its header block, as a streaming response body.
struct CgiBody {
    first: Option<Bytes>,
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
}

impl Body for CgiBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data).map_err(Into::into)))
    }
}

// ---------------------------------------------------------------------------------------
// Running the real git client.
// ---------------------------------------------------------------------------------------

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

struct GitOutput {
    success: bool,
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

/// The machine's git, isolated from any user or system configuration.
struct Git {
    home: tempfile::TempDir,
}

impl Git {
    /// Fails the test (with a clear message) when git is not installed.
    fn new() -> Git {
        let home = tempfile::tempdir().expect("tempdir for HOME");
        let git = Git { home };
        let out = match git.command(None, &["--version"]).output() {
            Ok(out) => out,
            Err(e) => panic!(
                "these tests need the real `git` client (and `git http-backend`) on PATH, \
                 but running `git --version` failed: {e}. Install git (scripts/test does)."
            ),
        };
        assert!(
            out.status.success(),
            "`git --version` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        git
    }

    fn command(&self, cwd: Option<&Path>, args: &[&str]) -> Command {
        let mut cmd = Command::new("git");
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join(".config"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.com",
                "-c",
                "init.defaultBranch=main",
                "-c",
                "credential.helper=",
                "-c",
                "protocol.version=2",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        cmd
    }

    /// Runs git to completion (killed after [`GIT_TIMEOUT`]). Blocking: call it from
    /// `spawn_blocking` when the gateway or upstream in this process must serve it.
    fn run(&self, cwd: Option<&Path>, args: &[&str]) -> GitOutput {
        let mut child = self
            .command(cwd, args)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn git {args:?}: {e}"));
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let out_t = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let err_t = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        let deadline = Instant::now() + GIT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for git") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("git {args:?} did not finish within {GIT_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        GitOutput {
            success: status.success(),
            code: status.code(),
            stdout: out_t.join().unwrap_or_default(),
            stderr: String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned(),
        }
    }

    /// Runs git and asserts it succeeded; returns its trimmed stdout.
    fn ok(&self, cwd: Option<&Path>, args: &[&str]) -> String {
        let out = self.run(cwd, args);
        assert!(
            out.success,
            "git {args:?} failed ({:?}):\n{}",
            out.code, out.stderr
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Runs git off the async workers (the gateway and upstream serve it in this process).
async fn git_async(git: &Arc<Git>, cwd: Option<PathBuf>, args: Vec<String>) -> GitOutput {
    let git = git.clone();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        git.run(cwd.as_deref(), &args)
    })
    .await
    .expect("git task panicked")
}

fn clone_url(gw: &Gateway, token: &str, repo: &str) -> String {
    format!("http://token:{token}@{}/v1/repo/{repo}.git", gw.proxy)
}

/// `n` incompressible bytes (SHA-256 in counter mode over a random seed).
fn random_bytes(n: usize) -> Vec<u8> {
    let seed = uuid::Uuid::new_v4();
    let mut out = Vec::with_capacity(n + 32);
    let mut counter = 0u64;
    while out.len() < n {
        let mut h = Sha256::new();
        h.update(seed.as_bytes());
        h.update(counter.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(n);
    out
}

/// Upstream with bare repos for REPO_A and REPO_B, and a gateway in front of it.
async fn setup() -> (Arc<Git>, GitUpstream, Gateway) {
    let git = Arc::new(Git::new());
    let upstream = GitUpstream::start().await;
    let (a, b) = (upstream.bare_path(REPO_A), upstream.bare_path(REPO_B));
    let seeder = git.clone();
    tokio::task::spawn_blocking(move || {
        create_bare_repo(&seeder, &a, "repo A\n");
        create_bare_repo(&seeder, &b, "repo B\n");
    })
    .await
    .expect("seeding the bare repos panicked");
    let gw = Gateway::builder(&upstream.url()).start().await;
    (git, upstream, gw)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_commit_and_push_through_the_gateway() {
    let started = Instant::now();
    let (git, upstream, gw) = setup().await;
    let token = gw.token_for(&[REPO_A]).await;
    upstream.accept_token(&token);

    // Clone through the gateway. git's first request carries no credentials; the
    // gateway must answer the Basic challenge itself.
    let scratch = tempfile::tempdir().expect("scratch tempdir");
    let work = scratch.path().join("work");
    let url = clone_url(&gw, &token, REPO_A);
    let out = git_async(
        &git,
        Some(scratch.path().to_owned()),
        args(&["clone", "-q", &url, "work"]),
    )
    .await;
    assert!(
        out.success,
        "clone through the gateway failed ({:?}):\n{}\nupstream saw:\n{}",
        out.code,
        out.stderr,
        upstream.dump()
    );
    assert_eq!(
        std::fs::read_to_string(work.join("README")).expect("README in the clone"),
        "repo A\n",
        "the clone must hold REPO_A's seed commit"
    );
    let cloned_at = started.elapsed();

    // Commit 5 MB of incompressible bytes and push: the pack exceeds http.postBuffer
    // (1 MiB), so git sends it with `Transfer-Encoding: chunked`.
    let data = random_bytes(BIG_FILE_LEN);
    std::fs::write(work.join("big.bin"), &data).expect("write big.bin");
    let pushed_head = {
        let git = git.clone();
        let work = work.clone();
        tokio::task::spawn_blocking(move || {
            git.ok(Some(&work), &["add", "big.bin"]);
            git.ok(Some(&work), &["commit", "-q", "-m", "add big.bin"]);
            git.ok(Some(&work), &["rev-parse", "HEAD"])
        })
        .await
        .expect("commit task panicked")
    };
    let push_started = Instant::now();
    let out = git_async(&git, Some(work.clone()), args(&["push", "origin", "HEAD"])).await;
    let push_took = push_started.elapsed();
    assert!(
        out.success,
        "push through the gateway failed ({:?}):\n{}\nupstream saw:\n{}",
        out.code,
        out.stderr,
        upstream.dump()
    );

    // The bare repo upstream now holds the commit and the very same blob.
    let bare = upstream.bare_path(REPO_A);
    let (bare_head, bare_blob_id, local_blob_id, bare_blob) = {
        let git = git.clone();
        let work = work.clone();
        tokio::task::spawn_blocking(move || {
            let gd = path_str(&bare);
            let bare_head = git.ok(None, &["--git-dir", gd, "rev-parse", "refs/heads/main"]);
            let bare_blob_id = git.ok(None, &["--git-dir", gd, "rev-parse", "main:big.bin"]);
            let local_blob_id = git.ok(Some(&work), &["hash-object", "big.bin"]);
            let blob = git.run(None, &["--git-dir", gd, "cat-file", "blob", "main:big.bin"]);
            assert!(blob.success, "cat-file in the bare repo: {}", blob.stderr);
            (bare_head, bare_blob_id, local_blob_id, blob.stdout)
        })
        .await
        .expect("verify task panicked")
    };
    assert_eq!(
        bare_head, pushed_head,
        "upstream's main must be the pushed commit"
    );
    assert_eq!(
        bare_blob_id, local_blob_id,
        "upstream's big.bin must be the pushed blob"
    );
    assert!(
        bare_blob == data,
        "upstream's big.bin content differs from what was pushed ({} vs {} bytes)",
        bare_blob.len(),
        data.len()
    );

    // What reached the upstream.
    let reqs = upstream.requests();
    let dump = upstream.dump();
    let expected_auth = basic(&token);
    assert!(!reqs.is_empty(), "upstream saw nothing");
    for r in &reqs {
        assert_eq!(
            r.header_all("authorization"),
            vec![expected_auth.as_str()],
            "every request reaching the upstream must carry the client's Basic credential, \
             unchanged (the gateway answers git's unauthenticated probe itself); offender: \
             {} {}\nupstream saw:\n{dump}",
            r.method,
            r.target
        );
        assert!(
            r.path().starts_with(&format!("/v1/repo/{REPO_A}.git/")),
            "unexpected path upstream: {}\n{dump}",
            r.target
        );
    }
    let saw = |method: &str, target_end: &str| {
        reqs.iter()
            .any(|r| r.method == method && r.target.ends_with(target_end))
    };
    assert!(
        saw("GET", "/info/refs?service=git-upload-pack"),
        "clone's ref advertisement missing upstream:\n{dump}"
    );
    assert!(
        saw("POST", "/git-upload-pack"),
        "clone's upload-pack POST missing upstream:\n{dump}"
    );
    assert!(
        saw("GET", "/info/refs?service=git-receive-pack"),
        "push's ref advertisement missing upstream:\n{dump}"
    );
    let pack_post = reqs
        .iter()
        .find(|r| {
            r.method == "POST" && r.path().ends_with("/git-receive-pack") && r.body_len > MIB as u64
        })
        .unwrap_or_else(|| panic!("no receive-pack POST above 1 MiB reached upstream:\n{dump}"));
    let chunked = pack_post
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    assert!(
        chunked || pack_post.header("content-length").is_none(),
        "the big push must reach upstream streamed (chunked / no Content-Length), got \
         content-length={:?}\n{dump}",
        pack_post.header("content-length")
    );
    assert!(
        pack_post.body_complete && pack_post.body_len as usize >= BIG_FILE_LEN,
        "the pack must reach upstream whole (≥ {BIG_FILE_LEN} bytes), got {} (complete: {})",
        pack_post.body_len,
        pack_post.body_complete
    );
    assert_eq!(
        pack_post.header("content-type"),
        Some("application/x-git-receive-pack-request")
    );

    // And git really was challenged: the gateway refused its credential-less probes.
    let metrics = gw.metrics().await;
    assert!(
        proxy_decisions(&metrics, "missing_credentials") >= 2.0,
        "expected the gateway to answer git's credential-less probes (clone and push) with \
         401 itself; metrics:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("scopegate_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "clone {:?}, push of {} bytes {:?}, total {:?}; {} requests upstream",
        cloned_at,
        BIG_FILE_LEN,
        push_took,
        started.elapsed(),
        reqs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_of_an_out_of_scope_repo_fails_and_reaches_nothing() {
    let started = Instant::now();
    let (git, upstream, gw) = setup().await;
    let token = gw.token_for(&[REPO_A]).await;
    // The upstream would serve REPO_B to this token: only the gateway stands in the way.
    upstream.accept_token(&token);

    let scratch = tempfile::tempdir().expect("scratch tempdir");
    let url = clone_url(&gw, &token, REPO_B);
    let out = git_async(
        &git,
        Some(scratch.path().to_owned()),
        args(&["clone", "-q", &url, "work"]),
    )
    .await;
    assert!(
        !out.success,
        "cloning REPO_B with a REPO_A token must fail; it succeeded.\nupstream saw:\n{}",
        upstream.dump()
    );
    assert!(
        out.stderr.contains("403"),
        "git should report the gateway's 403, said:\n{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains(&token),
        "nothing should echo the token: {}",
        out.stderr
    );
    let leaked: Vec<_> = upstream
        .requests()
        .into_iter()
        .filter(|r| r.target.to_ascii_lowercase().contains(REPO_B))
        .collect();
    assert!(
        leaked.is_empty(),
        "requests for REPO_B reached the upstream:\n{}",
        upstream.dump()
    );
    assert_eq!(
        upstream.requests().len(),
        0,
        "nothing at all should reach the upstream:\n{}",
        upstream.dump()
    );
    assert!(
        proxy_decisions(&gw.metrics().await, "repo_out_of_scope") >= 1.0,
        "the refusal should be the gateway's repo_out_of_scope"
    );
    eprintln!("out-of-scope clone refused in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_token_clone_fails_locally() {
    let started = Instant::now();
    let (git, upstream, gw) = setup().await;
    // Well-formed, never registered at the gateway; the upstream would accept it.
    let token = new_token();
    upstream.accept_token(&token);

    let scratch = tempfile::tempdir().expect("scratch tempdir");
    let url = clone_url(&gw, &token, REPO_A);
    let out = git_async(
        &git,
        Some(scratch.path().to_owned()),
        args(&["clone", "-q", &url, "work"]),
    )
    .await;
    assert!(
        !out.success,
        "cloning with an unknown token must fail; it succeeded.\nupstream saw:\n{}",
        upstream.dump()
    );
    assert!(
        out.stderr.contains("401") || out.stderr.contains("Authentication failed"),
        "git should report an authentication failure, said:\n{}",
        out.stderr
    );
    assert!(
        upstream.requests().is_empty(),
        "an unknown token must not reach the upstream:\n{}",
        upstream.dump()
    );
    assert!(
        proxy_decisions(&gw.metrics().await, "unknown_token") >= 1.0,
        "the refusal should be the gateway's unknown_token"
    );
    eprintln!("unknown-token clone refused in {:?}", started.elapsed());
}
