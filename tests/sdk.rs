//! Real-client tests: the official Relace SDKs (Python `relace`, TypeScript
//! `@relace-ai/relace`) pointed at the real gateway (in-process) in front of the fake
//! upstream. `/work/shared/RELACE_API.md` §a.6, §b, §d describe what they send.
//!
//! Each SDK runs as a child process (Python from `$SCOPEGATE_TEST_PYTHON` or the repo's
//! `.venv`; Node with `NODE_PATH` at `tests/sdk/node_modules`), both made by
//! `scripts/test`. Their scripts print one JSON line: what each call returned or raised,
//! and, captured inside the SDK's own HTTP layer (an httpx event hook, a `fetch`
//! wrapper), every request exactly as the SDK put it on the wire. The tests compare that
//! with what the fake upstream recorded: same method, same target byte for byte, same
//! body digest, and every SDK header unchanged.
//!
//! The Python tests never skip: without an interpreter that has `relace` they fail and
//! say how to get one. The TypeScript test skips (and says why) only when Node or the
//! SDK is not installed and `SCOPEGATE_TEST_NODE_MODULES` is unset.

mod support;

use support::*;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// what the SDKs send

/// The file both SDKs upload and download.
const FILE_PATH: &str = "src/app/main.py";
const FILE_CONTENT: &[u8] = b"print('hi')\n";
/// The `repo.update` body's `source`.
fn update_source() -> Value {
    json!({"type": "diff", "operations": [{"type": "write", "filename": "a.txt", "content": "x"}]})
}
/// Search goes out with `?sse=N` (added as an extra query parameter) so the fake answers
/// with N real SSE events that the SDK's stream parser must decode.
const SSE_EVENTS: u64 = 3;

/// Request headers the gateway may add or rewrite on the way up (SPEC §6): everything
/// else the SDK sent must reach the upstream unchanged, and nothing else may appear.
const GATEWAY_SET: &[&str] = &[
    "host",
    "x-request-id",
    "x-forwarded-for",
    "x-forwarded-proto",
    // Framing is the gateway's to choose, as long as the body arrives intact.
    "content-length",
    "transfer-encoding",
    // Hop-by-hop (RFC 9110 §7.6.1): removed by the gateway, possibly re-set by its
    // HTTP client for its own connection.
    "connection",
    "keep-alive",
    "te",
];

/// Headers Node's built-in `fetch` adds below the SDK (RELACE_API.md §b.3), so the
/// script's `fetch` wrapper cannot see them; they must still reach the upstream.
const NODE_FETCH_ADDS: &[&str] = &["accept-language", "sec-fetch-mode", "accept-encoding"];

// ---------------------------------------------------------------------------------------
// the Python SDK

/// Runs the given calls with `relace.Relace` and prints
/// `{"sdk_version", "calls": [{"call", "ok", ...result or error..., "exchanges": [...]}]}`.
/// `exchanges` are the requests the SDK sent during that call (one per attempt), taken
/// from an httpx request hook, with the status the SDK got back.
const PY_SCRIPT: &str = r#"
import hashlib, json, sys
import relace
from relace import Relace, DefaultHttpxClient

cfg = json.loads(sys.argv[1])
exchanges = []

def on_request(request):
    try:
        body = request.content
    except Exception:  # a streamed body: not used here
        body = None
    exchanges.append({
        "method": request.method,
        "target": request.url.raw_path.decode("ascii"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw],
        "body_len": None if body is None else len(body),
        "body_sha256": None if body is None else hashlib.sha256(body).hexdigest(),
        "body_json": json.loads(body)
            if body and request.headers.get("content-type", "").startswith("application/json")
            else None,
        "status": None,
    })

def on_response(response):
    exchanges[-1]["status"] = response.status_code

client = Relace(
    api_key=cfg["token"],
    base_url=cfg["base_url"],
    max_retries=cfg["max_retries"],
    timeout=10.0,
    http_client=DefaultHttpxClient(event_hooks={"request": [on_request], "response": [on_response]}),
)
repo = cfg["repo"]
FILE = cfg["file_path"]

def jsonable(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value

calls = {
    "get": lambda: client.repo.get(repo),
    "upload": lambda: client.repo.file.upload(FILE, cfg["file_content"].encode(), repo_id=repo),
    "download": lambda: client.repo.file.download(FILE, repo_id=repo),
    "update": lambda: client.repo.update(repo, source=cfg["update_source"]),
    "clone": lambda: client.repo.clone(repo),
    "search": lambda: list(client.repo.search(
        repo, query="where is auth handled?", extra_query={"sse": str(cfg["sse_events"])})),
}

results = []
for name in cfg["calls"]:
    first = len(exchanges)
    entry = {"call": name}
    try:
        value = calls[name]()
        entry.update(ok=True, result_type=type(value).__name__, result=jsonable(value))
    except relace.APIStatusError as e:
        entry.update(
            ok=False,
            exception=type(e).__name__,
            is_permission_denied=isinstance(e, relace.PermissionDeniedError),
            status=e.status_code,
            body=e.body,
            response_headers=dict(e.response.headers),
        )
    except Exception as e:
        entry.update(ok=False, exception=type(e).__name__, message=str(e))
    entry["exchanges"] = exchanges[first:]
    results.append(entry)

print(json.dumps({"sdk_version": relace.__version__, "calls": results}))
"#;

/// The interpreter that has the `relace` SDK: `$SCOPEGATE_TEST_PYTHON`, else the
/// repository's `.venv` (both made by `scripts/test`). Never skips.
fn python_with_relace() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("SCOPEGATE_TEST_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let mut tried = Vec::new();
    for candidate in candidates {
        let out = Command::new(&candidate)
            .args(["-c", "import relace; print(relace.__version__)"])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => return candidate,
            Ok(out) => tried.push(format!(
                "{} ({})",
                candidate.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => tried.push(format!("{} ({e})", candidate.display())),
        }
    }
    panic!(
        "no Python with the official `relace` SDK; tried: {tried:#?}\n\
         run scripts/test (it creates .venv with prometheus-client and relace and sets \
         SCOPEGATE_TEST_PYTHON), or `.venv/bin/pip install relace`"
    );
}

/// One run of [`PY_SCRIPT`] against the gateway's proxy listener.
async fn run_python(
    gw: &Gateway,
    token: &str,
    repo: &str,
    max_retries: u32,
    calls: &[&str],
) -> Value {
    let python = python_with_relace();
    let cfg = json!({
        "token": token,
        "base_url": format!("http://{}/v1", gw.proxy),
        "max_retries": max_retries,
        "repo": repo,
        "file_path": FILE_PATH,
        "file_content": std::str::from_utf8(FILE_CONTENT).expect("utf-8 content"),
        "update_source": update_source(),
        "sse_events": SSE_EVENTS,
        "calls": calls,
    });
    let mut cmd = Command::new(python);
    cmd.args(["-c", PY_SCRIPT, &cfg.to_string()])
        // The SDK reads these when no argument is given; make sure nothing leaks in.
        .env_remove("RELACE_API_KEY")
        .env_remove("RELACE_BASE_URL")
        .env_remove("RELACE_LOG");
    run_json(cmd, "python relace").await
}

// ---------------------------------------------------------------------------------------
// the TypeScript SDK

/// The Node counterpart of [`PY_SCRIPT`]: the same calls through `@relace-ai/relace`,
/// with a `fetch` wrapper recording each request the SDK makes.
const NODE_SCRIPT: &str = r#"
const crypto = require('crypto');
const { Relace, PermissionDeniedError, APIError } = require('@relace-ai/relace');
const { VERSION } = require('@relace-ai/relace/version');

const cfg = JSON.parse(process.argv[2]);
const exchanges = [];

async function recordingFetch(url, init) {
  const u = String(url);
  const origin = new URL(u).origin;
  const headers = [];
  new Headers(init.headers).forEach((v, k) => headers.push([k, v]));
  let body = init.body;
  let bytes = null;
  if (typeof body === 'string') bytes = Buffer.from(body, 'utf8');
  else if (body instanceof ArrayBuffer) bytes = Buffer.from(body);
  else if (ArrayBuffer.isView(body)) bytes = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  else if (body == null) bytes = Buffer.alloc(0);
  const ex = {
    method: (init.method || 'GET').toUpperCase(),
    // The text after the origin, untouched (no URL normalisation).
    target: u.startsWith(origin) ? u.slice(origin.length) : u,
    headers,
    body_len: bytes ? bytes.length : null,
    body_sha256: bytes ? crypto.createHash('sha256').update(bytes).digest('hex') : null,
    body_json: null,
    status: null,
  };
  const ctype = headers.find(([k]) => k === 'content-type');
  if (bytes && bytes.length && ctype && ctype[1].startsWith('application/json')) {
    ex.body_json = JSON.parse(bytes.toString('utf8'));
  }
  exchanges.push(ex);
  const resp = await fetch(url, init);
  ex.status = resp.status;
  return resp;
}

const client = new Relace({
  apiKey: cfg.token,
  baseURL: cfg.base_url,
  maxRetries: cfg.max_retries,
  timeout: 10000,
  fetch: recordingFetch,
});
const repo = cfg.repo;
const FILE = cfg.file_path;

const calls = {
  get: () => client.repo.get(repo),
  upload: () => client.repo.file.upload(FILE, Buffer.from(cfg.file_content, 'utf8'), { repo_id: repo }),
  download: () => client.repo.file.download(FILE, { repo_id: repo }),
  update: () => client.repo.update(repo, { source: cfg.update_source }),
  clone: () => client.repo.clone(repo),
  search: async () => {
    const stream = await client.repo.search(repo, { query: 'where is auth handled?' },
      { query: { sse: String(cfg.sse_events) } });
    const events = [];
    for await (const ev of stream) events.push(ev);
    return events;
  },
};

(async () => {
  const results = [];
  for (const name of cfg.calls) {
    const first = exchanges.length;
    const entry = { call: name };
    try {
      const value = await calls[name]();
      entry.ok = true;
      entry.result_type = Array.isArray(value) ? 'list' : typeof value;
      entry.result = value === undefined ? null : value;
    } catch (e) {
      entry.ok = false;
      entry.exception = e && e.constructor ? e.constructor.name : String(e);
      entry.message = String(e && e.message);
      if (e instanceof APIError) {
        entry.is_permission_denied = e instanceof PermissionDeniedError;
        entry.status = e.status;
        entry.body = e.error === undefined ? null : e.error;
        const h = {};
        if (e.headers) e.headers.forEach((v, k) => { h[k] = v; });
        entry.response_headers = h;
      }
    }
    entry.exchanges = exchanges.slice(first);
    results.push(entry);
  }
  console.log(JSON.stringify({ sdk_version: VERSION, node_version: process.version, calls: results }));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

/// Where the TypeScript SDK is installed: `$SCOPEGATE_TEST_NODE_MODULES` (set by
/// `scripts/test`; must then hold the SDK), else `tests/sdk/node_modules` when it has it.
/// `Err` says why the TypeScript test cannot run here.
fn node_setup() -> Result<(PathBuf, String), String> {
    let node = Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .output();
    let node_version = match node {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(out) => return Err(format!("`node --version` failed: {}", out.status)),
        Err(e) => return Err(format!("Node.js is not installed (`node --version`: {e})")),
    };
    let sdk = |dir: &Path| dir.join("@relace-ai/relace/package.json").is_file();
    if let Some(dir) = std::env::var_os("SCOPEGATE_TEST_NODE_MODULES") {
        let dir = PathBuf::from(dir);
        assert!(
            sdk(&dir),
            "SCOPEGATE_TEST_NODE_MODULES={} has no @relace-ai/relace (scripts/test installs it)",
            dir.display()
        );
        return Ok((dir, node_version));
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/node_modules");
    if sdk(&dir) {
        Ok((dir, node_version))
    } else {
        Err(format!(
            "Node.js {node_version} is here but @relace-ai/relace is not installed in {} and \
             SCOPEGATE_TEST_NODE_MODULES is unset (scripts/test installs it)",
            dir.display()
        ))
    }
}

async fn run_node(
    node_modules: &Path,
    gw: &Gateway,
    token: &str,
    repo: &str,
    max_retries: u32,
    calls: &[&str],
) -> Value {
    let cfg = json!({
        "token": token,
        "base_url": format!("http://{}/v1", gw.proxy),
        "max_retries": max_retries,
        "repo": repo,
        "file_path": FILE_PATH,
        "file_content": std::str::from_utf8(FILE_CONTENT).expect("utf-8 content"),
        "update_source": update_source(),
        "sse_events": SSE_EVENTS,
        "calls": calls,
    });
    let mut script = tempfile::Builder::new()
        .suffix(".cjs")
        .tempfile()
        .expect("temp script");
    std::io::Write::write_all(&mut script, NODE_SCRIPT.as_bytes()).expect("write script");
    let mut cmd = Command::new("node");
    cmd.arg(script.path())
        .arg(cfg.to_string())
        .env("NODE_PATH", node_modules)
        .env_remove("RELACE_API_KEY")
        .env_remove("RELACE_BASE_URL")
        .env_remove("RELACE_LOG");
    let out = run_json(cmd, "node @relace-ai/relace").await;
    drop(script);
    out
}

// ---------------------------------------------------------------------------------------
// running scripts

/// Runs `cmd` off the async runtime (the gateway lives on it), bounded to 60 s, and
/// parses the last line of its stdout as JSON. A non-zero exit or non-JSON output fails
/// the test with everything the script said.
async fn run_json(mut cmd: Command, what: &'static str) -> Value {
    let result = tokio::task::spawn_blocking(move || -> Result<Value, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{what}: cannot start: {e}"))?;
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| format!("{what}: wait: {e}"))? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: still running after 60 s (killed)"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        if !status.success() {
            return Err(format!(
                "{what} failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}"
            ));
        }
        let last = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        serde_json::from_str(last).map_err(|e| {
            format!("{what}: output is not JSON ({e})\nstdout:\n{stdout}\nstderr:\n{stderr}")
        })
    })
    .await
    .expect("script runner thread");
    result.unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------
// assertions

/// The result entry of `call` in a script's output.
fn call_result<'a>(out: &'a Value, call: &str) -> &'a Value {
    out["calls"]
        .as_array()
        .expect("calls array")
        .iter()
        .find(|c| c["call"] == call)
        .unwrap_or_else(|| panic!("no result for {call}: {out:#}"))
}

/// The requests the SDK sent for one call.
fn exchanges(entry: &Value) -> &Vec<Value> {
    entry["exchanges"].as_array().expect("exchanges array")
}

/// The fake's records of requests to `/v1/repo/<repo>` routes (not introspection).
fn repo_requests(fake: &FakeRelace, repo: &str) -> Vec<Recorded> {
    let prefix = format!("/v1/repo/{repo}");
    fake.requests()
        .into_iter()
        .filter(|r| r.target.starts_with(&prefix))
        .collect()
}

/// `sent` (as the SDK put it on the wire) reached the upstream as `rec`: same method,
/// same target byte for byte, same body, every SDK header with the same value(s), and no
/// header added but those of [`GATEWAY_SET`] and `below_sdk` (added by the runtime's
/// HTTP stack, under the point where the script records).
#[track_caller]
fn assert_forwarded_unchanged(call: &str, sent: &Value, rec: &Recorded, below_sdk: &[&str]) {
    assert_eq!(rec.method, sent["method"], "{call}: method at the upstream");
    assert_eq!(
        rec.target, sent["target"],
        "{call}: the upstream's target must be the SDK's, byte for byte"
    );
    if let Some(sha) = sent["body_sha256"].as_str() {
        assert_eq!(
            rec.body_sha256.as_deref(),
            Some(sha),
            "{call}: body digest at the upstream (SDK sent {} bytes, upstream got {:?})",
            sent["body_len"],
            rec.body_len
        );
    }
    let sent_headers: Vec<(String, String)> = sent["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|h| {
            (
                h[0].as_str().expect("name").to_ascii_lowercase(),
                h[1].as_str().expect("value").to_owned(),
            )
        })
        .collect();
    for (name, _) in &sent_headers {
        if GATEWAY_SET.contains(&name.as_str()) {
            continue;
        }
        let want: Vec<&str> = sent_headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(
            rec.header_all(name),
            want,
            "{call}: header {name} must reach the upstream unchanged\nupstream saw: {:?}",
            rec.headers
        );
    }
    for (name, value) in &rec.headers {
        assert!(
            GATEWAY_SET.contains(&name.as_str())
                || below_sdk.contains(&name.as_str())
                || sent_headers.iter().any(|(n, _)| n == name),
            "{call}: the upstream got a header the SDK did not send: {name}: {value}"
        );
    }
    assert_eq!(
        rec.header("x-forwarded-proto"),
        Some("http"),
        "{call}: X-Forwarded-Proto"
    );
    assert!(
        rec.header("x-request-id").is_some_and(|v| !v.is_empty()),
        "{call}: x-request-id"
    );
}

/// Every in-scope call: succeeded with one 2xx attempt, and the fake recorded exactly
/// those requests, in order, unchanged. Returns the SDK's requests, in order.
#[track_caller]
fn assert_all_forwarded(
    out: &Value,
    fake: &FakeRelace,
    calls: &[&str],
    below_sdk: &[&str],
) -> Vec<Value> {
    let mut sent = Vec::new();
    for call in calls {
        let entry = call_result(out, call);
        assert_eq!(entry["ok"], true, "{call} failed: {entry:#}");
        let ex = exchanges(entry);
        assert_eq!(ex.len(), 1, "{call}: one attempt expected: {entry:#}");
        let status = ex[0]["status"].as_u64().expect("status");
        assert!((200..300).contains(&status), "{call}: status {status}");
        sent.push(ex[0].clone());
    }
    let recorded = repo_requests(fake, REPO_A);
    assert_eq!(
        recorded.len(),
        sent.len(),
        "the upstream must see exactly the SDK's requests: {:#?}",
        recorded
            .iter()
            .map(|r| (&r.method, &r.target))
            .collect::<Vec<_>>()
    );
    for ((call, sent), rec) in calls.iter().zip(&sent).zip(&recorded) {
        assert_forwarded_unchanged(call, sent, rec, below_sdk);
    }
    sent
}

/// Every call was refused by the gateway as SPEC §4 row 9 says, surfaced by the SDK as
/// `PermissionDeniedError`, after exactly one attempt.
#[track_caller]
fn assert_all_denied(out: &Value, calls: &[&str]) {
    for call in calls {
        let entry = call_result(out, call);
        assert_eq!(entry["ok"], false, "{call} must fail: {entry:#}");
        assert_eq!(
            entry["exception"], "PermissionDeniedError",
            "{call}: the SDK's exception class: {entry:#}"
        );
        assert_eq!(entry["is_permission_denied"], true, "{call}: {entry:#}");
        assert_eq!(entry["status"], 403, "{call}: {entry:#}");
        assert_eq!(
            entry["body"]["code"], "repo_out_of_scope",
            "{call}: error body code: {entry:#}"
        );
        assert!(
            entry["body"]["error"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{call}: error message: {entry:#}"
        );
        assert_eq!(
            entry["response_headers"]["x-should-retry"], "false",
            "{call}: x-should-retry: {entry:#}"
        );
        assert_eq!(
            exchanges(entry).len(),
            1,
            "{call}: the SDK must not retry the refusal: {entry:#}"
        );
    }
}

/// Waits until `metric(decision)` on the proxy listener reaches `want`, then checks it
/// stays there (no late retry lands after it).
async fn assert_decisions_reach(gw: &Gateway, decision: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = proxy_decisions(&gw.metrics().await, decision);
        if got >= want || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = proxy_decisions(&gw.metrics().await, decision);
    assert_eq!(
        got, want,
        "scopegate_requests_total{{decision=\"{decision}\",listener=\"proxy\"}}"
    );
}

/// The SSE events of the fake's `sse=N` body, as both SDKs yield them.
#[track_caller]
fn assert_search_events(entry: &Value) {
    let events = entry["result"].as_array().expect("search events");
    assert_eq!(events.len() as u64, SSE_EVENTS, "search events: {entry:#}");
    for (i, ev) in events.iter().enumerate() {
        assert_eq!(ev["event"], "agent", "event {i}: {ev}");
        assert_eq!(ev["data"]["i"], i, "event {i}: {ev}");
    }
}

/// The echo JSON of the fake, as the SDK returned it (parsed), names the request target.
#[track_caller]
fn assert_echo_target(entry: &Value, target: &str) {
    assert_eq!(
        entry["result"]["target"], target,
        "{}: the SDK's parsed answer (the fake's echo): {entry:#}",
        entry["call"]
    );
}

const ALL_CALLS: &[&str] = &["get", "upload", "download", "update", "clone", "search"];

// ---------------------------------------------------------------------------------------
// Python

/// Python SDK, in-scope repo: get, file upload and download (raw slashes on the wire),
/// update (diff), clone and search (SSE) all succeed through the gateway, and the upstream
/// sees exactly what the SDK sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_python_in_scope_calls_reach_upstream_unchanged() {
    let fake = FakeRelace::start().await;
    let gw = Gateway::start(&fake).await;
    let token = gw.token_for(&[REPO_A]).await;

    let out = run_python(&gw, &token, REPO_A, 0, ALL_CALLS).await;
    let version = out["sdk_version"].as_str().expect("sdk_version").to_owned();
    eprintln!("python relace {version}");

    let sent = assert_all_forwarded(&out, &fake, ALL_CALLS, &[]);
    let file_target = format!("/v1/repo/{REPO_A}/file/{FILE_PATH}");
    let expected = [
        ("GET", format!("/v1/repo/{REPO_A}")),
        ("PUT", file_target.clone()),
        ("GET", file_target.clone()),
        ("POST", format!("/v1/repo/{REPO_A}/update")),
        ("GET", format!("/v1/repo/{REPO_A}/clone")),
        ("POST", format!("/v1/repo/{REPO_A}/search?sse={SSE_EVENTS}")),
    ];
    let recorded = repo_requests(&fake, REPO_A);
    for ((method, target), rec) in expected.iter().zip(&recorded) {
        assert_eq!((rec.method.as_str(), &rec.target), (*method, target));
    }

    // The upload: raw slashes, octet-stream, the exact bytes.
    let put = &recorded[1];
    assert_eq!(put.header("content-type"), Some("application/octet-stream"));
    assert_eq!(put.body_len, Some(FILE_CONTENT.len() as u64));
    assert_eq!(
        put.body_sha256.as_deref(),
        Some(sha_hex(FILE_CONTENT).as_str())
    );
    // The update: the diff the SDK was given, as JSON (and the upstream got those very
    // bytes: `assert_all_forwarded` compared the digests).
    assert_eq!(recorded[3].header("content-type"), Some("application/json"));
    assert_eq!(sent[3]["body_json"], json!({"source": update_source()}));
    // The search: the SSE accept header and the query.
    assert_eq!(recorded[5].header("accept"), Some("text/event-stream"));
    assert_eq!(
        sent[5]["body_json"],
        json!({"query": "where is auth handled?"})
    );

    // The credential and the SDK's identification arrived as the SDK sent them.
    for (call, rec) in ALL_CALLS.iter().zip(&recorded) {
        assert_eq!(
            rec.header_all("authorization"),
            vec![bearer(&token)],
            "{call}: Authorization"
        );
        assert_eq!(
            rec.header("user-agent"),
            Some(format!("Relace/Python {version}").as_str()),
            "{call}: User-Agent"
        );
        assert_eq!(rec.header("x-stainless-lang"), Some("python"), "{call}");
        assert_eq!(
            rec.header("x-stainless-package-version"),
            Some(version.as_str()),
            "{call}"
        );
        assert_eq!(rec.header("x-stainless-retry-count"), Some("0"), "{call}");
        for name in ["x-stainless-os", "x-stainless-arch", "x-stainless-runtime"] {
            assert!(rec.header(name).is_some(), "{call}: {name} missing");
        }
    }

    // What the SDK made of the answers.
    let get = call_result(&out, "get");
    assert_eq!(get["result_type"], "RepoMetadata");
    assert_echo_target(get, &format!("/v1/repo/{REPO_A}"));
    let upload = call_result(&out, "upload");
    assert_eq!(upload["result_type"], "RepoInfo");
    assert_eq!(upload["result"]["body_sha256"], sha_hex(FILE_CONTENT));
    let download = call_result(&out, "download");
    assert_echo_target(download, &file_target);
    assert_eq!(call_result(&out, "update")["result_type"], "RepoInfo");
    assert_eq!(
        call_result(&out, "clone")["result_type"],
        "RepoCloneResponse"
    );
    assert_search_events(call_result(&out, "search"));

    assert_decisions_reach(&gw, "allowed", ALL_CALLS.len() as f64).await;
}

/// Python SDK, a repo outside the token's scope: every call raises
/// `relace.PermissionDeniedError` (403, `repo_out_of_scope`), after one attempt, and the
/// upstream sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_python_out_of_scope_is_permission_denied_and_never_forwarded() {
    let fake = FakeRelace::start().await;
    let gw = Gateway::start(&fake).await;
    let token = gw.token_for(&[REPO_A]).await;
    let before = proxy_decisions(&gw.metrics().await, "repo_out_of_scope");

    let out = run_python(&gw, &token, REPO_B, 0, ALL_CALLS).await;

    assert_all_denied(&out, ALL_CALLS);
    // The SDK did send them (to the gateway) ...
    let upload = &exchanges(call_result(&out, "upload"))[0];
    assert_eq!(
        upload["target"],
        format!("/v1/repo/{REPO_B}/file/{FILE_PATH}")
    );
    // ... and the upstream saw none of them.
    assert_eq!(
        fake.request_count(),
        0,
        "nothing may reach the upstream: {:#?}",
        fake.requests()
    );
    assert_decisions_reach(&gw, "repo_out_of_scope", before + ALL_CALLS.len() as f64).await;
}

/// With the SDK's default retries (2), a refusal still costs exactly one request: the
/// gateway's `x-should-retry: false` (and 403 being final) stop the SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_python_does_not_retry_a_refusal() {
    let fake = FakeRelace::start().await;
    let gw = Gateway::start(&fake).await;
    let token = gw.token_for(&[REPO_A]).await;

    for (round, call) in ["get", "update"].iter().enumerate() {
        let before = proxy_decisions(&gw.metrics().await, "repo_out_of_scope");
        let out = run_python(&gw, &token, REPO_B, 2, &[call]).await;
        assert_all_denied(&out, &[call]);
        assert_decisions_reach(&gw, "repo_out_of_scope", before + 1.0).await;
        assert_eq!(fake.request_count(), 0, "round {round}: nothing upstream");
    }
}

/// The counterpart that shows the counting above can see retries: the gateway's own
/// 503 `scope_unavailable` stays retryable (SPEC §4), so the same SDK settings make
/// three attempts, each a decision of the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_python_retries_scope_unavailable() {
    let fake = FakeRelace::start().await;
    // Introspection with a key the upstream refuses: every unknown token is undecidable.
    let key = tempfile::NamedTempFile::new().expect("key file");
    std::fs::write(key.path(), "rlc-wrongaccountkey000000000000000000\n").expect("write key");
    let gw = Gateway::builder(&fake.url())
        .set(
            "upstream.api_key_file",
            &format!("{:?}", key.path().to_str().expect("utf-8 path")),
        )
        .start()
        .await;
    let token = new_token(); // never registered: the gateway must ask the upstream

    let out = run_python(&gw, &token, REPO_A, 2, &["get"]).await;

    let entry = call_result(&out, "get");
    assert_eq!(entry["ok"], false, "{entry:#}");
    assert_eq!(entry["exception"], "InternalServerError", "{entry:#}");
    assert_eq!(entry["status"], 503, "{entry:#}");
    assert_eq!(entry["body"]["code"], "scope_unavailable", "{entry:#}");
    let attempts = exchanges(entry);
    assert_eq!(attempts.len(), 3, "initial attempt + 2 retries: {entry:#}");
    for (i, ex) in attempts.iter().enumerate() {
        let retry_count = ex["headers"]
            .as_array()
            .expect("headers")
            .iter()
            .find(|h| {
                h[0].as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case("x-stainless-retry-count"))
            })
            .map(|h| h[1].clone());
        assert_eq!(retry_count, Some(json!(i.to_string())), "attempt {i}");
    }
    assert_decisions_reach(&gw, "scope_unavailable", 3.0).await;
    assert!(
        repo_requests(&fake, REPO_A).is_empty(),
        "an undecided request must not be forwarded"
    );
}

// ---------------------------------------------------------------------------------------
// TypeScript

/// TypeScript SDK 0.6.0: the same calls. It percent-encodes path parameters, so the
/// file path travels as `src%2Fapp%2Fmain.py` and must reach the upstream byte for byte;
/// its search posts to `/agent`. Out of scope: `PermissionDeniedError`, one attempt each
/// even with retries on, nothing upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_typescript_in_scope_and_out_of_scope() {
    let (node_modules, node_version) = match node_setup() {
        Ok(found) => found,
        Err(why) => {
            eprintln!("skipping the TypeScript SDK test: {why}");
            return;
        }
    };
    let fake = FakeRelace::start().await;
    let gw = Gateway::start(&fake).await;
    let token = gw.token_for(&[REPO_A]).await;

    // In scope.
    let out = run_node(&node_modules, &gw, &token, REPO_A, 0, ALL_CALLS).await;
    let version = out["sdk_version"].as_str().expect("sdk_version").to_owned();
    eprintln!("@relace-ai/relace {version} on node {node_version}");
    let sent = assert_all_forwarded(&out, &fake, ALL_CALLS, NODE_FETCH_ADDS);
    let file_target = format!("/v1/repo/{REPO_A}/file/src%2Fapp%2Fmain.py");
    let expected = [
        ("GET", format!("/v1/repo/{REPO_A}")),
        ("PUT", file_target.clone()),
        ("GET", file_target.clone()),
        ("POST", format!("/v1/repo/{REPO_A}/update")),
        ("GET", format!("/v1/repo/{REPO_A}/clone")),
        ("POST", format!("/v1/repo/{REPO_A}/agent?sse={SSE_EVENTS}")),
    ];
    let recorded = repo_requests(&fake, REPO_A);
    for ((method, target), rec) in expected.iter().zip(&recorded) {
        assert_eq!((rec.method.as_str(), &rec.target), (*method, target));
    }
    let put = &recorded[1];
    assert_eq!(put.header("content-type"), Some("application/octet-stream"));
    assert_eq!(
        put.body_sha256.as_deref(),
        Some(sha_hex(FILE_CONTENT).as_str())
    );
    assert_eq!(sent[3]["body_json"], json!({"source": update_source()}));
    assert_eq!(
        sent[5]["body_json"],
        json!({"agent_inputs": {"query": "where is auth handled?"}, "agent_name": "relace-search", "continue": false}),
        "TS repo.search is an agent run"
    );
    assert_eq!(recorded[5].header("accept"), Some("text/event-stream"));
    for (call, rec) in ALL_CALLS.iter().zip(&recorded) {
        assert_eq!(
            rec.header_all("authorization"),
            vec![bearer(&token)],
            "{call}: Authorization"
        );
        assert_eq!(
            rec.header("user-agent"),
            Some(format!("Relace/JS {version}").as_str()),
            "{call}: User-Agent"
        );
        assert_eq!(rec.header("x-stainless-lang"), Some("js"), "{call}");
        for name in NODE_FETCH_ADDS {
            assert_eq!(rec.header_all(name).len(), 1, "{call}: {name} from fetch");
        }
        assert_eq!(
            rec.header("x-stainless-package-version"),
            Some(version.as_str()),
            "{call}"
        );
    }
    assert_echo_target(call_result(&out, "download"), &file_target);
    assert_search_events(call_result(&out, "search"));

    // Out of scope, with the SDK's default retries.
    let forwarded = fake.request_count();
    let before = proxy_decisions(&gw.metrics().await, "repo_out_of_scope");
    let out = run_node(&node_modules, &gw, &token, REPO_B, 2, ALL_CALLS).await;
    assert_all_denied(&out, ALL_CALLS);
    assert_eq!(
        exchanges(call_result(&out, "upload"))[0]["target"],
        format!("/v1/repo/{REPO_B}/file/src%2Fapp%2Fmain.py")
    );
    assert_eq!(
        fake.request_count(),
        forwarded,
        "nothing for REPO_B may reach the upstream"
    );
    assert!(repo_requests(&fake, REPO_B).is_empty());
    assert_decisions_reach(&gw, "repo_out_of_scope", before + ALL_CALLS.len() as f64).await;
}
