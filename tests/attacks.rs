//! The attack corpus (`tests/attacks/corpus.txt`, format documented at its top) replayed
//! byte for byte against the real gateway in front of FakeRelace, then THE ORACLE over
//! everything the upstream received.
//!
//! Every entry goes over a fresh TCP connection, bound to its own loopback source address
//! (`127.1.x.y`), so the `X-Forwarded-For` the gateway sets tells which entry an upstream
//! request came from. Whatever comes back within [`READ_WINDOW`] is kept (an HTTP error, a
//! closed connection, a 200); nothing can hang.
//!
//! The oracle, for every request the upstream saw:
//! (a) exactly one `Authorization`, the valid token's Bearer or Basic form (scheme case and
//!     spacing aside; a Basic username that is itself a credential counts as another
//!     credential);
//! (b) under every strict reading of the path (percent-decode once + RFC 3986
//!     remove_dot_segments, raw remove_dot_segments, decode twice, Tomcat/Spring `;param`
//!     stripping before and after decoding, and a legacy folding of `\`, overlong UTF-8,
//!     `%uXXXX`, full-width dots and case) the route is `/v1/repo/{A}[.git]…` with the repo id
//!     equal to A as a UUID — never {B}, never a non-repo route — and never the
//!     policy-denied `POST /v1/repo/{A}/git`;
//! (c) the raw target names {B} nowhere (any case, hyphenated or not, raw or decoded once or
//!     twice), except in the query of entries marked `allow: b-in-query`.
//!
//! Entries marked `finding:` are known oracle violations (each finding id has an
//! `#[ignore = "bypass: …"]` test below that says what it is): the green replay leaves them
//! out; the ignored full replay and the focused per-finding tests replay them and fail
//! until `src/` refuses them. `SCOPEGATE_ATTACKS_VERBOSE=1` lists every entry's outcome.

mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::time::{timeout_at, Instant};
use uuid::Uuid;

const CORPUS: &str = include_str!("attacks/corpus.txt");
/// How long one entry may take, connect to last byte read.
const READ_WINDOW: Duration = Duration::from_secs(2);
/// The `{PAUSE}` between two parts of an entry.
const PAUSE: Duration = Duration::from_millis(200);
const MIN_ENTRIES: usize = 150;
/// The smuggled request's path (it must never reach the upstream).
const SMUGGLED_PATH: &str = "/file/smuggled";

// ---------------------------------------------------------------------------------------
// The corpus format
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Refuse,
    Forward,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Http1,
    H2,
}

#[derive(Debug, Clone)]
struct Entry {
    /// 1-based position in the corpus.
    number: usize,
    /// Line of the corpus file where the entry starts.
    line: usize,
    class: String,
    expect: Expect,
    mode: Mode,
    allow_b_in_query: bool,
    /// A known oracle violation (`# finding: <id>`).
    finding: Option<String>,
    /// A former finding, fixed (`# fixed: <id>`): part of the green replay.
    fixed: Option<String>,
    note: Option<String>,
    payload: Vec<String>,
}

fn parse_corpus(text: &str) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut current: Option<(usize, Vec<&str>)> = None;
    for (i, line) in text.lines().enumerate() {
        if line == "----" {
            if let Some((start, lines)) = current.take() {
                if let Some(entry) = parse_entry(entries.len() + 1, start, &lines)? {
                    entries.push(entry);
                }
            }
            current = Some((i + 2, Vec::new()));
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line);
        }
    }
    if let Some((start, lines)) = current {
        if let Some(entry) = parse_entry(entries.len() + 1, start, &lines)? {
            entries.push(entry);
        }
    }
    Ok(entries)
}

fn parse_entry(number: usize, line: usize, lines: &[&str]) -> Result<Option<Entry>, String> {
    let at = |msg: String| format!("corpus line {line} (entry {number}): {msg}");
    let mut class = None;
    let mut expect = Expect::Refuse;
    let mut mode = Mode::Http1;
    let mut allow_b_in_query = false;
    let mut finding = None;
    let mut fixed = None;
    let mut note = None;
    let mut payload = Vec::new();
    let mut in_meta = true;
    for l in lines {
        if in_meta {
            if l.trim().is_empty() {
                continue;
            }
            if let Some(comment) = l.strip_prefix('#') {
                let comment = comment.trim();
                if let Some((key, value)) = comment.split_once(':') {
                    let value = value.trim();
                    if !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
                        match key {
                            "class" => class = Some(value.to_owned()),
                            "expect" => {
                                expect = match value {
                                    "refuse" => Expect::Refuse,
                                    "forward" => Expect::Forward,
                                    "any" => Expect::Any,
                                    other => return Err(at(format!("expect: {other:?}"))),
                                }
                            }
                            "mode" => {
                                mode = match value {
                                    "http1" => Mode::Http1,
                                    "h2" => Mode::H2,
                                    other => return Err(at(format!("mode: {other:?}"))),
                                }
                            }
                            "allow" if value == "b-in-query" => allow_b_in_query = true,
                            "finding" => finding = Some(value.to_owned()),
                            "fixed" => fixed = Some(value.to_owned()),
                            "note" => note = Some(value.to_owned()),
                            other => return Err(at(format!("unknown metadata {other:?}"))),
                        }
                    }
                }
                continue;
            }
            in_meta = false;
        }
        payload.push(l.trim_end_matches([' ', '\t']).to_owned());
    }
    let Some(class) = class else {
        if payload.iter().all(|l| l.is_empty()) {
            return Ok(None);
        }
        return Err(at("no `# class:`".into()));
    };
    if payload.iter().all(|l| l.is_empty()) {
        return Err(at("empty payload".into()));
    }
    Ok(Some(Entry {
        number,
        line,
        class,
        expect,
        mode,
        allow_b_in_query,
        finding,
        fixed,
        note,
        payload,
    }))
}

/// The values behind the placeholders.
struct Vars {
    a: String,
    b: String,
    token: String,
    unknown: String,
    key: String,
    admin: String,
    upstream: String,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn percent_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02x}")).collect()
}

impl Vars {
    fn smuggled(&self) -> String {
        format!(
            "GET /v1/repo/{}{SMUGGLED_PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\r\n",
            self.b, self.token
        )
    }

    fn named(&self, name: &str) -> Option<String> {
        Some(match name {
            "A" => self.a.clone(),
            "B" => self.b.clone(),
            "A_UPPER" => self.a.to_ascii_uppercase(),
            "B_UPPER" => self.b.to_ascii_uppercase(),
            "A_SIMPLE" => self.a.replace('-', ""),
            "B_SIMPLE" => self.b.replace('-', ""),
            "A_ENC" => percent_all(&self.a),
            "B_ENC" => percent_all(&self.b),
            "TOKEN" => self.token.clone(),
            "TOKEN_B64" => b64(format!("token:{}", self.token).as_bytes()),
            "UNKNOWN" => self.unknown.clone(),
            "KEY" => self.key.clone(),
            "ADMIN" => self.admin.clone(),
            "UPSTREAM" => self.upstream.clone(),
            "BIG" => "a".repeat(102_400),
            "SMUGGLED" => self.smuggled(),
            "SMUGGLED_LEN" => self.smuggled().len().to_string(),
            "SMUGGLED_HEX" => format!("{:x}", self.smuggled().len()),
            // Kept as a marker; `parts` splits on it.
            "PAUSE" => "{PAUSE}".to_owned(),
            _ => return None,
        })
    }
}

/// Index (in `s`, which starts just after an opening `{`) of the matching `}`.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 1usize;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Expands the placeholders of `text` (not the escapes, except inside `{B64:…}`).
fn expand(text: &str, vars: &Vars) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if after.starts_with("REP:") || after.starts_with("B64:") {
            let close =
                matching_brace(after).ok_or_else(|| format!("unclosed {{{}", &after[..4]))?;
            let inner = &after[4..close];
            if after.starts_with("REP:") {
                let (count, body) = inner
                    .split_once(':')
                    .ok_or_else(|| format!("{{REP:{inner}}} needs a count"))?;
                let count: usize = count
                    .parse()
                    .map_err(|_| format!("{{REP:{count}:…}}: bad count"))?;
                out.push_str(&expand(body, vars)?.repeat(count));
            } else {
                out.push_str(&b64(&unescape(&expand(inner, vars)?)?));
            }
            rest = &after[close + 1..];
            continue;
        }
        let name_len = after
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(after.len());
        if name_len > 0 && after[name_len..].starts_with('}') {
            let name = &after[..name_len];
            let value = vars
                .named(name)
                .ok_or_else(|| format!("unknown placeholder {{{name}}}"))?;
            out.push_str(&value);
            rest = &after[name_len + 1..];
        } else {
            out.push('{');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Resolves `\r \n \t \0 \\ \xNN`; anything else after a backslash is an error.
fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = s
                    .get(i + 2..i + 4)
                    .ok_or_else(|| format!("truncated \\x escape in {s:?}"))?;
                let value = u8::from_str_radix(hex, 16)
                    .map_err(|_| format!("bad \\x{hex} escape in {s:?}"))?;
                out.push(value);
                i += 4;
                continue;
            }
            other => {
                return Err(format!(
                    "unknown escape \\{} in {s:?}",
                    other.map_or(String::new(), |b| char::from(*b).to_string())
                ))
            }
        }
        i += 2;
    }
    Ok(out)
}

/// What to write for an entry.
enum Wire {
    /// HTTP/1 bytes, in parts separated by a pause.
    Http1(Vec<Vec<u8>>),
    /// HTTP/2 requests (header lists), one per stream.
    H2(Vec<Vec<(Vec<u8>, Vec<u8>)>>),
}

impl Wire {
    fn bytes(&self) -> Vec<Vec<u8>> {
        match self {
            Wire::Http1(parts) => parts.clone(),
            Wire::H2(streams) => vec![h2_bytes(streams)],
        }
    }

    fn len(&self) -> usize {
        self.bytes().iter().map(Vec::len).sum()
    }
}

fn wire(entry: &Entry, vars: &Vars) -> Result<Wire, String> {
    let at = |e: String| format!("corpus line {} (entry {}): {e}", entry.line, entry.number);
    match entry.mode {
        Mode::Http1 => {
            let expanded = expand(&entry.payload.concat(), vars).map_err(at)?;
            let parts = expanded
                .split("{PAUSE}")
                .map(unescape)
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            Ok(Wire::Http1(parts))
        }
        Mode::H2 => {
            let mut streams = vec![Vec::new()];
            for line in entry.payload.iter().filter(|l| !l.is_empty()) {
                if line == "NEXT-STREAM" {
                    streams.push(Vec::new());
                    continue;
                }
                let expanded = expand(line, vars).map_err(at)?;
                let split = expanded
                    .get(1..)
                    .and_then(|s| s.find(": "))
                    .map(|i| i + 1)
                    .ok_or_else(|| at(format!("h2 header line without `: `: {line:?}")))?;
                let name = unescape(&expanded[..split]).map_err(at)?;
                let value = unescape(&expanded[split + 2..]).map_err(at)?;
                streams.last_mut().expect("one stream").push((name, value));
            }
            Ok(Wire::H2(streams))
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP/2 by hand (prior knowledge, HPACK literals without Huffman)
// ---------------------------------------------------------------------------------------

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_MAX_FRAME: usize = 16_384;

fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("frame size");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

fn hpack_int(out: &mut Vec<u8>, value: usize, prefix_bits: u32, first: u8) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut v = value - max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

fn h2_bytes(streams: &[Vec<(Vec<u8>, Vec<u8>)>]) -> Vec<u8> {
    let mut out = H2_PREFACE.to_vec();
    h2_frame(&mut out, 0x4, 0, 0, &[]);
    for (i, headers) in streams.iter().enumerate() {
        let id = 1 + 2 * u32::try_from(i).expect("stream count");
        let mut block = Vec::new();
        for (name, value) in headers {
            // Literal header field without indexing, new name, no Huffman.
            block.push(0x00);
            hpack_int(&mut block, name.len(), 7, 0);
            block.extend_from_slice(name);
            hpack_int(&mut block, value.len(), 7, 0);
            block.extend_from_slice(value);
        }
        let chunks: Vec<&[u8]> = if block.is_empty() {
            vec![&[]]
        } else {
            block.chunks(H2_MAX_FRAME).collect()
        };
        for (j, chunk) in chunks.iter().enumerate() {
            // HEADERS with END_STREAM, then CONTINUATION; END_HEADERS on the last one.
            let (kind, mut flags) = if j == 0 { (0x1, 0x1) } else { (0x9, 0x0) };
            if j + 1 == chunks.len() {
                flags |= 0x4;
            }
            h2_frame(&mut out, kind, flags, id, chunk);
        }
    }
    out
}

fn hpack_read_int(block: &[u8], i: &mut usize, prefix_bits: u32) -> Option<usize> {
    let max = (1usize << prefix_bits) - 1;
    let mut value = usize::from(*block.get(*i)?) & max;
    *i += 1;
    if value < max {
        return Some(value);
    }
    let mut shift = 0;
    loop {
        let b = *block.get(*i)?;
        *i += 1;
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 || shift > 28 {
            return Some(value);
        }
    }
}

/// Huffman-decodes a string of ASCII digits (the only thing a `:status` holds).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let mut out = String::new();
    let mut i = 0;
    while bits.len() - i >= 5 {
        let five = bits[i..i + 5].iter().fold(0u8, |acc, b| (acc << 1) | b);
        match five {
            0..=2 => {
                out.push(char::from(b'0' + five));
                i += 5;
            }
            12..=15 if bits.len() - i >= 6 => {
                let six = (five << 1) | bits[i + 5];
                if six < 0x19 {
                    return None;
                }
                out.push(char::from(b'3' + (six - 0x19)));
                i += 6;
            }
            0x1f => break, // EOS padding
            _ => return None,
        }
    }
    Some(out)
}

/// The `:status` at the start of a response header block, if it is simple to read.
fn hpack_status(block: &[u8]) -> Option<u16> {
    let mut i = 0;
    while block.get(i)? & 0xe0 == 0x20 {
        hpack_read_int(block, &mut i, 5)?; // dynamic table size update
    }
    let first = *block.get(i)?;
    if first & 0x80 != 0 {
        return match hpack_read_int(block, &mut i, 7)? {
            8 => Some(200),
            9 => Some(204),
            10 => Some(206),
            11 => Some(304),
            12 => Some(400),
            13 => Some(404),
            14 => Some(500),
            _ => None,
        };
    }
    let index = if first & 0x40 != 0 {
        hpack_read_int(block, &mut i, 6)?
    } else {
        hpack_read_int(block, &mut i, 4)?
    };
    if !(8..=14).contains(&index) {
        return None;
    }
    let huffman = block.get(i)? & 0x80 != 0;
    let len = hpack_read_int(block, &mut i, 7)?;
    let value = block.get(i..i + len)?;
    let text = if huffman {
        huffman_digits(value)?
    } else {
        String::from_utf8(value.to_vec()).ok()?
    };
    text.parse().ok()
}

/// A short account of an HTTP/2 answer: `:status` per stream, resets, GOAWAY.
fn h2_summary(raw: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = raw;
    while rest.len() >= 9 {
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        let Some(payload) = rest.get(9..9 + len) else {
            break;
        };
        match kind {
            0x1 => {
                let mut block = payload;
                if flags & 0x8 != 0 {
                    let pad = usize::from(*block.first().unwrap_or(&0));
                    block = block.get(1..block.len().saturating_sub(pad)).unwrap_or(&[]);
                }
                if flags & 0x20 != 0 {
                    block = block.get(5..).unwrap_or(&[]);
                }
                let status = hpack_status(block).map_or("?".to_owned(), |s| s.to_string());
                out.push(format!("s{stream}:{status}"));
            }
            0x3 => out.push(format!("s{stream}:RST_STREAM")),
            0x7 => out.push("GOAWAY".to_owned()),
            _ => {}
        }
        rest = &rest[9 + len..];
    }
    out
}

// ---------------------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
struct Outcome {
    received: Vec<u8>,
    /// The gateway closed (or reset) the connection.
    closed: bool,
    /// The window passed with the connection still open.
    timed_out: bool,
    error: Option<String>,
}

/// The loopback address entry `number` connects from.
fn source_ip(number: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, (number / 250) as u8, (number % 250 + 1) as u8)
}

fn entry_number_of(ip: &str) -> Option<usize> {
    let ip: Ipv4Addr = ip.trim().parse().ok()?;
    let [a, b, c, d] = ip.octets();
    (a == 127 && b == 1 && d >= 1).then(|| usize::from(c) * 250 + usize::from(d) - 1)
}

/// Sends `parts` (with [`PAUSE`] between them) from `source` to `gateway` and reads until
/// the gateway closes or the window ends. The write half is kept open throughout: a FIN
/// would let the server drop the request.
async fn replay(gateway: SocketAddr, source: Ipv4Addr, parts: Vec<Vec<u8>>) -> Outcome {
    let deadline = Instant::now() + READ_WINDOW;
    let mut outcome = Outcome::default();
    let socket = match TcpSocket::new_v4().and_then(|s| {
        s.bind(SocketAddr::from((source, 0)))?;
        Ok(s)
    }) {
        Ok(socket) => socket,
        Err(e) => {
            outcome.error = Some(format!("bind {source}: {e}"));
            return outcome;
        }
    };
    let stream = match timeout_at(deadline, socket.connect(gateway)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            outcome.error = Some(format!("connect: {e}"));
            return outcome;
        }
        Err(_) => {
            outcome.timed_out = true;
            return outcome;
        }
    };
    let (mut reader, mut writer) = stream.into_split();
    let write = async move {
        let mut error = None;
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(PAUSE).await;
            }
            if part.is_empty() {
                continue;
            }
            match timeout_at(deadline, writer.write_all(part)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    error = Some(format!("write: {e}"));
                    break;
                }
                Err(_) => {
                    error = Some("write: window ended".to_owned());
                    break;
                }
            }
        }
        (writer, error)
    };
    let received = &mut outcome.received;
    let read = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match timeout_at(deadline, reader.read(&mut buf)).await {
                Err(_) => return (false, true),
                Ok(Ok(0)) | Ok(Err(_)) => return (true, false),
                Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    let ((_writer, write_error), (closed, timed_out)) = tokio::join!(write, read);
    outcome.closed = closed;
    outcome.timed_out = timed_out;
    outcome.error = write_error;
    outcome
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn skip_chunked(mut raw: &[u8]) -> Option<&[u8]> {
    loop {
        let line_end = find(raw, b"\r\n")?;
        let size = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return match raw.strip_prefix(b"\r\n") {
                Some(rest) => Some(rest),
                None => Some(&raw[find(raw, b"\r\n\r\n")? + 4..]),
            };
        }
        raw = raw.get(size + 2..)?;
    }
}

/// The HTTP/1 responses in `raw`, in order (as far as they parse): the status, then
/// `:<code>` for scopegate's own JSON refusals, or `:hyper` for an answer without the
/// gateway's `x-request-id` (hyper refused the request before the gateway saw it).
fn http1_answers(mut raw: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(end) = find(raw, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let Some(status) = lines
            .next()
            .and_then(|l| l.strip_prefix("HTTP/1."))
            .and_then(|l| l.get(2..5))
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        raw = &raw[end + 4..];
        if (100..200).contains(&status) || status == 204 || status == 304 {
            out.push(status.to_string());
            continue;
        }
        let mut len = None;
        let mut chunked = false;
        let mut request_id = false;
        for l in lines {
            if let Some((n, v)) = l.split_once(':') {
                if n.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                } else if n.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.to_ascii_lowercase().contains("chunked");
                } else if n.eq_ignore_ascii_case("x-request-id") {
                    request_id = true;
                }
            }
        }
        let body = if chunked {
            None
        } else {
            len.and_then(|len| raw.get(..len))
        };
        let code = body
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
            .and_then(|v| v["code"].as_str().map(str::to_owned));
        out.push(match (code, request_id) {
            (Some(code), _) => format!("{status}:{code}"),
            (None, false) => format!("{status}:hyper"),
            (None, true) => status.to_string(),
        });
        if chunked {
            match skip_chunked(raw) {
                Some(rest) => raw = rest,
                None => break,
            }
        } else if let Some(len) = len {
            match raw.get(len..) {
                Some(rest) => raw = rest,
                None => break,
            }
        } else {
            break;
        }
    }
    out
}

/// One line describing what the gateway answered.
fn describe(mode: Mode, outcome: &Outcome) -> String {
    let answers: Vec<String> = match mode {
        Mode::Http1 => http1_answers(&outcome.received),
        Mode::H2 => h2_summary(&outcome.received),
    };
    let mut s = if answers.is_empty() {
        if outcome.received.is_empty() {
            "no answer".to_owned()
        } else {
            format!("{} unparsed bytes", outcome.received.len())
        }
    } else {
        answers.join(",")
    };
    if outcome.closed {
        s.push_str(" +closed");
    } else if outcome.timed_out {
        s.push_str(" +open@2s");
    }
    if let Some(e) = &outcome.error {
        s.push_str(&format!(" ({e})"));
    }
    s
}

// ---------------------------------------------------------------------------------------
// The strict readings (RFC 3986 and decoding from tests/support/readings.rs, plus three more)
// ---------------------------------------------------------------------------------------

/// Tomcat/Spring/Jetty: each segment loses everything from its first `;`.
fn strip_params(path: &str) -> String {
    path.split('/')
        .map(|segment| segment.split(';').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("/")
}

/// A legacy (IIS / Windows / NFKC-normalising) decoder: `%uXXXX`, overlong UTF-8 for `.`,
/// `/` and `\`, full-width and leader dots, `\` as `/`, and case-insensitive.
fn fold_legacy(path: &str) -> String {
    let raw = path.as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |s: &[u8]| {
            std::str::from_utf8(s)
                .ok()
                .and_then(|s| u32::from_str_radix(s, 16).ok())
        };
        if raw[i] == b'%' && matches!(raw.get(i + 1), Some(b'u' | b'U')) {
            if let Some(c) = raw.get(i + 2..i + 6).and_then(hex).and_then(char::from_u32) {
                let mut buf = [0u8; 4];
                bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i += 6;
                continue;
            }
        }
        if raw[i] == b'%' {
            if let Some(b) = raw.get(i + 1..i + 3).and_then(hex) {
                bytes.push(b as u8);
                i += 3;
                continue;
            }
        }
        bytes.push(raw[i]);
        i += 1;
    }
    const OVERLONG: &[(&[u8], u8)] = &[
        (&[0xf0, 0x80, 0x80, 0xae], b'.'),
        (&[0xf0, 0x80, 0x80, 0xaf], b'/'),
        (&[0xe0, 0x80, 0xae], b'.'),
        (&[0xe0, 0x80, 0xaf], b'/'),
        (&[0xc0, 0xae], b'.'),
        (&[0xc0, 0xaf], b'/'),
        (&[0xc1, 0x9c], b'\\'),
    ];
    let mut folded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    'outer: while i < bytes.len() {
        for (seq, b) in OVERLONG {
            if bytes[i..].starts_with(seq) {
                folded.push(*b);
                i += seq.len();
                continue 'outer;
            }
        }
        folded.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&folded)
        .chars()
        .flat_map(|c| {
            let s: &str = match c {
                '\u{FF0E}' | '\u{2024}' | '\u{FE52}' => ".",
                '\u{2025}' => "..",
                '\u{FF0F}' | '\u{2215}' | '\\' | '\u{FF3C}' | '\u{FE68}' => "/",
                _ => "",
            };
            if s.is_empty() {
                vec![c.to_ascii_lowercase()]
            } else {
                s.chars().collect()
            }
        })
        .collect()
}

fn reading_decoded(p: &str) -> String {
    remove_dot_segments(&decode(p))
}
fn reading_raw(p: &str) -> String {
    remove_dot_segments(p)
}
fn reading_decoded_twice(p: &str) -> String {
    remove_dot_segments(&decode(&decode(p)))
}
fn reading_params_stripped(p: &str) -> String {
    remove_dot_segments(&decode(&strip_params(p)))
}
fn reading_decoded_then_params_stripped(p: &str) -> String {
    remove_dot_segments(&strip_params(&decode(p)))
}
fn reading_legacy(p: &str) -> String {
    remove_dot_segments(&fold_legacy(p))
}

const LEGACY: &str = "legacy-folded";

/// Every reading the oracle applies: name, function.
/// A strict reading: a raw path in, the path a router would route on out.
type Reading = fn(&str) -> String;

const READINGS: &[(&str, Reading)] = &[
    ("decoded", reading_decoded),
    ("raw", reading_raw),
    ("decoded-twice", reading_decoded_twice),
    ("params-stripped", reading_params_stripped),
    (
        "decoded-then-params-stripped",
        reading_decoded_then_params_stripped,
    ),
    (LEGACY, reading_legacy),
];

/// Where a normalised path routes.
#[derive(Debug, PartialEq, Eq)]
struct Route {
    /// `Some` for `/v1/repo/<any UUID spelling>[.git]…`.
    repo: Option<Uuid>,
    git: bool,
    /// What follows the id segment (`/file/x`), or empty.
    rest: String,
}

fn route_of(path: &str) -> Route {
    let mut parts = path.splitn(5, '/');
    let prefix_ok =
        parts.next() == Some("") && parts.next() == Some("v1") && parts.next() == Some("repo");
    let id = parts.next().unwrap_or("");
    let rest = parts.next().map(|r| format!("/{r}")).unwrap_or_default();
    let (id, git) = match id.strip_suffix(".git") {
        Some(id) => (id, true),
        None => (id, false),
    };
    // As lenient as pydantic: hyphenated, simple, braced and URN spellings all count.
    let repo = if prefix_ok {
        Uuid::try_parse(id).ok()
    } else {
        None
    };
    Route { repo, git, rest }
}

// ---------------------------------------------------------------------------------------
// THE ORACLE
// ---------------------------------------------------------------------------------------

struct Oracle {
    a: Uuid,
    b: Uuid,
    token: String,
}

/// Whether `text` names `b` in any case, hyphenated or simple, raw or decoded once or twice.
fn mentions(text: &str, b: Uuid) -> bool {
    let forms = [b.hyphenated().to_string(), b.simple().to_string()];
    [text.to_owned(), decode(text), decode(&decode(text))]
        .iter()
        .any(|t| {
            let t = t.to_ascii_lowercase();
            forms.iter().any(|f| t.contains(f.as_str()))
        })
}

impl Oracle {
    /// Everything wrong with one request the upstream received.
    fn violations(&self, rec: &Recorded, allow_b_in_query: bool) -> Vec<String> {
        let mut out = Vec::new();
        // (a) the credential
        if let Err(e) = self.credential(rec) {
            out.push(format!("(a) credential: {e}"));
        }
        // (b) every reading routes to A, and not to the policy-denied operation
        let end = rec.target.find(['?', '#']).unwrap_or(rec.target.len());
        let (path, after_path) = rec.target.split_at(end);
        for (name, reading) in READINGS {
            let normalised = reading(path);
            let route = route_of(&normalised);
            match route.repo {
                Some(id) if id == self.a => {}
                Some(id) if id == self.b => {
                    out.push(format!("(b) {name} reading reaches {{B}}: {normalised:?}"))
                }
                Some(id) => out.push(format!(
                    "(b) {name} reading reaches another repo {id}: {normalised:?}"
                )),
                None => out.push(format!(
                    "(b) {name} reading is not a repo route: {normalised:?}"
                )),
            }
            let post = if *name == LEGACY {
                rec.method.eq_ignore_ascii_case("POST")
            } else {
                rec.method == "POST"
            };
            if route.repo.is_some() && !route.git && post && route.rest == "/git" {
                out.push(format!(
                    "(b) {name} reading is the policy-denied POST /v1/repo/<id>/git: {normalised:?}"
                ));
            }
        }
        // (c) {B} in the raw target
        if mentions(path, self.b) {
            out.push("(c) the target's path names {B}".to_owned());
        }
        if mentions(after_path, self.b) && !allow_b_in_query {
            out.push("(c) the target's query names {B}".to_owned());
        }
        out
    }

    fn credential(&self, rec: &Recorded) -> Result<(), String> {
        let values = rec.header_all("authorization");
        let value = match values.as_slice() {
            [] => return Err("no Authorization header".into()),
            [one] => one.trim_matches([' ', '\t']),
            many => return Err(format!("{} Authorization headers", many.len())),
        };
        let (scheme, rest) = value
            .split_once([' ', '\t'])
            .ok_or_else(|| format!("not `scheme credential`: {value:?}"))?;
        let secret = rest.trim_start_matches([' ', '\t']);
        if scheme.eq_ignore_ascii_case("bearer") {
            return if secret == self.token {
                Ok(())
            } else {
                Err(format!("Bearer {secret:?} is not the valid token"))
            };
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(format!("scheme {scheme:?}"));
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(secret)
            .map_err(|e| format!("Basic is not base64: {e}"))?;
        let decoded = String::from_utf8_lossy(&decoded);
        let (user, password) = decoded
            .split_once(':')
            .ok_or("Basic without `user:password`")?;
        if password != self.token {
            return Err(format!(
                "Basic password {password:?} is not the valid token"
            ));
        }
        if user != self.token && user.trim().to_ascii_lowercase().starts_with("rlc") {
            return Err(format!(
                "the Basic username {user:?} is another credential riding along"
            ));
        }
        Ok(())
    }

    /// Things worth reporting that the oracle does not fail on: {B} or a credential in a
    /// forwarded header other than `Authorization`.
    fn remarks(&self, rec: &Recorded) -> Vec<String> {
        let mut out = Vec::new();
        for (name, value) in &rec.headers {
            if name == "authorization" {
                continue;
            }
            if mentions(value, self.b) {
                out.push(format!("header {name} names {{B}}"));
            }
            let lower = value.to_ascii_lowercase();
            if lower.contains("rlc-") || lower.contains("rlcr-") {
                out.push(format!("header {name} carries a credential"));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------
// The whole run
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct ClassStats {
    entries: usize,
    forwarded_entries: usize,
    upstream_requests: usize,
    answers: BTreeMap<String, usize>,
}

struct RunResult {
    selected: usize,
    violations: Vec<String>,
    expectation_failures: Vec<String>,
}

fn corpus() -> Vec<Entry> {
    parse_corpus(CORPUS).unwrap_or_else(|e| panic!("{e}"))
}

/// The gateway's first answer to an entry, for the per-class table.
fn first_answer(mode: Mode, outcome: &Outcome) -> String {
    let first = match mode {
        Mode::Http1 => http1_answers(&outcome.received).into_iter().next(),
        Mode::H2 => h2_summary(&outcome.received).into_iter().next(),
    };
    first.unwrap_or_else(|| {
        if !outcome.received.is_empty() {
            "unparsed".to_owned()
        } else if outcome.closed {
            "closed".to_owned()
        } else {
            "silent".to_owned()
        }
    })
}

fn truncated(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// Replays the selected corpus entries (all at once, each on its own connection), then
/// applies the oracle to everything the upstream received and checks that the gateway
/// still serves normal traffic.
async fn run(select: impl Fn(&Entry) -> bool) -> RunResult {
    let fake = FakeRelace::start().await;
    let gw = Gateway::builder(&fake.url()).start().await;
    let token = gw.token_for(&[REPO_A]).await;
    let vars = Vars {
        a: REPO_A.to_owned(),
        b: REPO_B.to_owned(),
        token: token.clone(),
        unknown: new_token(),
        key: ACCOUNT_KEY.to_owned(),
        admin: ADMIN_TOKEN.to_owned(),
        upstream: fake.addr().to_string(),
    };
    let all = corpus();
    let entries: Vec<Entry> = all.into_iter().filter(|e| select(e)).collect();
    assert!(!entries.is_empty(), "no corpus entry selected");

    // Replay.
    let mut tasks = tokio::task::JoinSet::new();
    for entry in &entries {
        let bytes = wire(entry, &vars).unwrap_or_else(|e| panic!("{e}")).bytes();
        let source = source_ip(entry.number);
        let number = entry.number;
        let addr = gw.proxy;
        tasks.spawn(async move { (number, replay(addr, source, bytes).await) });
    }
    let mut outcomes: BTreeMap<usize, Outcome> = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (number, outcome) = joined.expect("replay task");
        outcomes.insert(number, outcome);
    }
    // Let upstream requests still in flight land (bounded).
    let settle_deadline = Instant::now() + Duration::from_secs(3);
    let mut seen = fake.request_count();
    while Instant::now() < settle_deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = fake.request_count();
        if now == seen {
            break;
        }
        seen = now;
    }
    let upstream = fake.requests();

    // THE ORACLE.
    let oracle = Oracle {
        a: Uuid::parse_str(REPO_A).expect("A"),
        b: Uuid::parse_str(REPO_B).expect("B"),
        token: token.clone(),
    };
    let by_number: BTreeMap<usize, &Entry> = entries.iter().map(|e| (e.number, e)).collect();
    let mut per_entry: BTreeMap<usize, Vec<&Recorded>> = BTreeMap::new();
    let mut violations = Vec::new();
    let mut remarks = Vec::new();
    for rec in &upstream {
        let number = rec.header("x-forwarded-for").and_then(entry_number_of);
        let entry = number.and_then(|n| by_number.get(&n).copied());
        if let Some(entry) = entry {
            per_entry.entry(entry.number).or_default().push(rec);
        }
        let allow = entry.is_some_and(|e| e.allow_b_in_query);
        let origin = entry.map_or("an unattributed request".to_owned(), |e| {
            format!("entry {} (line {}, {})", e.number, e.line, e.class)
        });
        let target = truncated(&rec.target, 160);
        for v in oracle.violations(rec, allow) {
            violations.push(format!("{origin}: {} {target}: {v}", rec.method));
        }
        for r in oracle.remarks(rec) {
            remarks.push(format!("{origin}: {} {target}: {r}", rec.method));
        }
        if rec.target.contains(SMUGGLED_PATH) {
            violations.push(format!(
                "{origin}: the smuggled request reached the upstream"
            ));
        }
    }

    // Expectations and the per-class report.
    let mut expectation_failures = Vec::new();
    let mut classes: BTreeMap<&str, ClassStats> = BTreeMap::new();
    // SCOPEGATE_ATTACKS_VERBOSE=1 lists every entry, not only those that reached the
    // upstream or got no answer.
    let verbose = std::env::var_os("SCOPEGATE_ATTACKS_VERBOSE").is_some();
    println!("\n== attack corpus replay: {} entries ==", entries.len());
    for entry in &entries {
        let outcome = outcomes.get(&entry.number).cloned().unwrap_or_default();
        let forwarded = per_entry.get(&entry.number).map_or(0, Vec::len);
        let stats = classes.entry(entry.class.as_str()).or_default();
        stats.entries += 1;
        stats.upstream_requests += forwarded;
        if forwarded > 0 {
            stats.forwarded_entries += 1;
        }
        *stats
            .answers
            .entry(first_answer(entry.mode, &outcome))
            .or_default() += 1;
        let label = format!(
            "entry {:>3} line {:>4} [{}]{}",
            entry.number,
            entry.line,
            entry.class,
            entry
                .finding
                .as_deref()
                .map_or(String::new(), |f| format!(" finding={f}"))
        );
        // An answer the gateway passed on from the upstream (no scopegate code, not 1xx)
        // with no recorded upstream request means the fake's own parser refused what the
        // gateway forwarded, before recording it: a blind spot of the oracle, reported.
        if entry.mode == Mode::Http1 {
            let passed_on = http1_answers(&outcome.received)
                .iter()
                .filter(|a| !a.contains(':') && !a.starts_with('1'))
                .count();
            if passed_on > forwarded {
                remarks.push(format!(
                    "{label}: {passed_on} upstream answer(s) ({}) but {forwarded} recorded upstream request(s): the fake refused a forwarded request before recording it",
                    describe(entry.mode, &outcome)
                ));
            }
        }
        match entry.expect {
            Expect::Refuse if forwarded > 0 => expectation_failures.push(format!(
                "{label}: expected no upstream request, the upstream got {forwarded}"
            )),
            Expect::Forward if forwarded == 0 => expectation_failures.push(format!(
                "{label}: expected to reach the upstream; gateway answered {}",
                describe(entry.mode, &outcome)
            )),
            _ => {}
        }
        if forwarded > 0 || outcome.received.is_empty() || verbose {
            let upstream_targets: Vec<String> = per_entry
                .get(&entry.number)
                .into_iter()
                .flatten()
                .map(|r| {
                    let body = r.body_len.map_or("?".to_owned(), |n| n.to_string());
                    format!("{} {} (body {body})", r.method, truncated(&r.target, 100))
                })
                .collect();
            println!(
                "  {label}: {} | upstream: [{}]{}",
                describe(entry.mode, &outcome),
                upstream_targets.join("; "),
                entry
                    .note
                    .as_deref()
                    .map_or(String::new(), |n| format!(" | {n}"))
            );
        }
    }
    println!("\n== per class ==");
    println!(
        "  {:<26} {:>7} {:>9} {:>8}  first answer (count)",
        "class", "entries", "forwarded", "upstream"
    );
    for (class, stats) in &classes {
        let answers: Vec<String> = stats
            .answers
            .iter()
            .map(|(a, n)| format!("{a}×{n}"))
            .collect();
        println!(
            "  {:<26} {:>7} {:>9} {:>8}  {}",
            class,
            stats.entries,
            stats.forwarded_entries,
            stats.upstream_requests,
            answers.join(" ")
        );
    }
    println!(
        "  {:<26} {:>7} {:>9} {:>8}",
        "TOTAL",
        entries.len(),
        classes.values().map(|s| s.forwarded_entries).sum::<usize>(),
        upstream.len()
    );
    if !remarks.is_empty() {
        println!("\n== remarks (forwarded, not failed on) ==");
        for r in &remarks {
            println!("  {r}");
        }
    }
    if !violations.is_empty() {
        println!("\n== ORACLE VIOLATIONS ==");
        for v in &violations {
            println!("  {v}");
        }
    }

    // The gateway still serves normal traffic.
    let ok = call_with_auth(gw.proxy, "GET", &file_url(REPO_A), &bearer(&token)).await;
    assert_eq!(
        ok.status,
        200,
        "a plain allowed request after the replay: {}",
        body_text(&ok)
    );
    let out = call_with_auth(gw.proxy, "GET", &file_url(REPO_B), &bearer(&token)).await;
    assert_refused(&out, 403, "repo_out_of_scope");

    RunResult {
        selected: entries.len(),
        violations,
        expectation_failures,
    }
}

fn assert_clean(result: &RunResult) {
    assert!(
        result.violations.is_empty() && result.expectation_failures.is_empty(),
        "{} oracle violation(s):\n{}\n\n{} expectation failure(s):\n{}",
        result.violations.len(),
        result.violations.join("\n"),
        result.expectation_failures.len(),
        result.expectation_failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn corpus_is_well_formed_and_big_enough() {
    let entries = corpus();
    let vars = Vars {
        a: REPO_A.to_owned(),
        b: REPO_B.to_owned(),
        token: new_token(),
        unknown: new_token(),
        key: ACCOUNT_KEY.to_owned(),
        admin: ADMIN_TOKEN.to_owned(),
        upstream: "127.0.0.1:1".to_owned(),
    };
    let mut classes: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for entry in &entries {
        let w = wire(entry, &vars).unwrap_or_else(|e| panic!("{e}"));
        assert!(w.len() > 0 || entry.payload.concat().contains("{PAUSE}"));
        let c = classes.entry(entry.class.as_str()).or_default();
        c.0 += 1;
        c.1 += usize::from(entry.finding.is_some());
    }
    println!(
        "corpus: {} entries in {} classes",
        entries.len(),
        classes.len()
    );
    for (class, (n, findings)) in &classes {
        println!("  {class:<26} {n:>3}  ({findings} known finding(s))");
    }
    assert!(
        entries.len() >= MIN_ENTRIES,
        "the corpus has {} entries, fewer than {MIN_ENTRIES}",
        entries.len()
    );
    assert!(
        classes.values().all(|(n, _)| *n >= 3),
        "every class has several entries"
    );
}

/// The corpus minus its known findings: green, and it stays that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attack_corpus_never_reaches_another_repo_or_route() {
    let total = corpus().len();
    assert!(total >= MIN_ENTRIES, "corpus has {total} entries");
    let result = run(|e| e.finding.is_none()).await;
    println!(
        "replayed {} of {total} entries ({} known findings left to the ignored tests)",
        result.selected,
        total - result.selected
    );
    assert_clean(&result);
}

/// The whole corpus, known findings included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the remaining `finding:` entries (double encoding) are forwarded by SPEC §5's decode-once rule and violate only the decode-twice reading"]
async fn attack_corpus_full_replay_including_known_findings() {
    assert_clean(&run(|_| true).await);
}

async fn replay_finding(id: &str) {
    let entries = corpus();
    assert!(
        entries
            .iter()
            .any(|e| e.finding.as_deref() == Some(id) || e.fixed.as_deref() == Some(id)),
        "no corpus entry has `finding: {id}` or `fixed: {id}`"
    );
    assert_clean(
        &run(|e| e.finding.as_deref() == Some(id) || e.fixed.as_deref() == Some(id)).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fixed_dotdot_semicolon_is_refused() {
    replay_finding("dotdot-semicolon").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fixed_semicolon_cannot_hide_policy_denied_git() {
    replay_finding("semicolon-policy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "by SPEC §5 (decode once): /v1/repo/{A}/file/%252e%252e/%252e%252e/{B} is forwarded as the literal text %2e%2e; only a reader that decodes twice reaches {B}, and the upstream decodes once"]
async fn decode_twice_reading_of_double_encoded_dots_reaches_b() {
    replay_finding("double-decode-traversal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "by SPEC §5 (decode once): POST /v1/repo/{A}/%2567it is the literal operation %67it; only a reader that decodes twice runs git"]
async fn decode_twice_reading_of_double_encoded_git_escapes_policy() {
    replay_finding("double-decode-policy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fixed_unicode_lookalike_dots_and_slashes_are_refused() {
    replay_finding("unicode-fold-traversal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fixed_case_variants_cannot_escape_git_policy() {
    replay_finding("case-insensitive-policy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fixed_encoded_route_prefix_is_refused() {
    replay_finding("encoded-route-prefix").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fixed_connection_header_cannot_drop_the_credential() {
    replay_finding("connection-drops-credential").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fixed_foreign_credential_in_basic_username_is_refused() {
    replay_finding("foreign-credential-in-basic-username").await;
}

// --- the oracle itself ----------------------------------------------------------------

fn oracle_for_tests() -> Oracle {
    Oracle {
        a: Uuid::parse_str(REPO_A).expect("A"),
        b: Uuid::parse_str(REPO_B).expect("B"),
        token: "rlcr-0123456789abcdef0123456789abcdef".to_owned(),
    }
}

fn record(method: &str, target: &str, authorization: &[&str]) -> Recorded {
    Recorded {
        method: method.to_owned(),
        target: target.to_owned(),
        version: "HTTP/1.1".to_owned(),
        headers: authorization
            .iter()
            .map(|v| ("authorization".to_owned(), (*v).to_owned()))
            .collect(),
        body_len: None,
        body_sha256: None,
    }
}

fn bearer_of(o: &Oracle) -> String {
    format!("Bearer {}", o.token)
}

#[test]
fn oracle_accepts_in_scope_requests() {
    let o = oracle_for_tests();
    let auth = bearer_of(&o);
    let basic = format!("Basic {}", b64(format!("token:{}", o.token).as_bytes()));
    for (method, target, auth) in [
        ("GET", format!("/v1/repo/{REPO_A}/file/src/main.rs"), &auth),
        (
            "PUT",
            format!("/v1/repo/{REPO_A}/file/src%2Fmain.rs"),
            &auth,
        ),
        ("GET", format!("/v1/repo/{}", REPO_A.to_uppercase()), &auth),
        ("POST", format!("/v1/repo/{REPO_A}/search"), &auth),
        (
            "GET",
            format!("/v1/repo/{REPO_A}.git/info/refs?service=git-upload-pack"),
            &basic,
        ),
    ] {
        let v = o.violations(&record(method, &target, &[auth]), false);
        assert!(v.is_empty(), "{target}: {v:?}");
    }
    for auth in [
        format!("bearer  {}", o.token),
        format!("Basic {}", b64(format!("evil:{}", o.token).as_bytes())),
    ] {
        let rec = record("GET", &format!("/v1/repo/{REPO_A}"), &[&auth]);
        assert!(o.violations(&rec, false).is_empty(), "{auth}");
    }
}

#[test]
fn oracle_rejects_a_b_request() {
    let o = oracle_for_tests();
    let auth = bearer_of(&o);
    let rec = record("GET", &format!("/v1/repo/{REPO_B}/file/x"), &[&auth]);
    let v = o.violations(&rec, false);
    assert!(
        v.iter().any(|v| v.contains("decoded reading reaches {B}")),
        "{v:?}"
    );
    assert!(v.iter().any(|v| v.contains("(c)")), "{v:?}");
    // Upper case, no hyphens, encoded: still {B}.
    for target in [
        format!("/v1/repo/{}/file/x", REPO_B.to_uppercase()),
        format!("/v1/repo/{}/file/x", REPO_B.replace('-', "")),
        format!("/v1/repo/{}/file/x", percent_all(REPO_B)),
    ] {
        let v = o.violations(&record("GET", &target, &[&auth]), false);
        assert!(
            v.iter().any(|v| v.contains("reaches {B}")),
            "{target}: {v:?}"
        );
    }
}

#[test]
fn oracle_rejects_non_repo_routes() {
    let o = oracle_for_tests();
    let auth = bearer_of(&o);
    for target in [
        "/v1/repo_token/rlcr-abc".to_owned(),
        "/v1/repo".to_owned(),
        "/admin/tokens".to_owned(),
        "/metrics".to_owned(),
        format!("/V1/Repo/{REPO_A}"),
        format!("http://evil/v1/repo/{REPO_A}"),
    ] {
        let v = o.violations(&record("GET", &target, &[&auth]), false);
        assert!(
            v.iter().any(|v| v.contains("not a repo route")),
            "{target}: {v:?}"
        );
    }
}

#[test]
fn oracle_sees_through_every_reading() {
    let o = oracle_for_tests();
    let auth = bearer_of(&o);
    for (target, reading) in [
        (
            format!("/v1/repo/{REPO_A}/../{REPO_B}"),
            "raw reading reaches",
        ),
        (
            format!("/v1/repo/{REPO_A}/%2e%2e/{REPO_B}"),
            "decoded reading reaches",
        ),
        (
            format!("/v1/repo/{REPO_A}/file/%252e%252e/%252e%252e/{REPO_B}"),
            "decoded-twice reading reaches",
        ),
        (
            format!("/v1/repo/{REPO_A}/..;/{REPO_B}"),
            "params-stripped reading reaches",
        ),
        (
            format!("/v1/repo/{REPO_A}/..%3b/{REPO_B}"),
            "decoded-then-params-stripped reading reaches",
        ),
        (
            format!("/v1/repo/{REPO_A}/%ef%bc%8e%ef%bc%8e/{REPO_B}"),
            "legacy-folded reading reaches",
        ),
        (
            format!("/v1/repo/{REPO_A}/%c0%ae%c0%ae/{REPO_B}"),
            "legacy-folded reading reaches",
        ),
        (
            format!("/v1/repo/{REPO_A}\\..\\{REPO_B}"),
            "legacy-folded reading reaches",
        ),
        (
            format!("/v1/%72epo/{REPO_A}"),
            "raw reading is not a repo route",
        ),
    ] {
        let v = o.violations(&record("GET", &target, &[&auth]), false);
        assert!(v.iter().any(|v| v.contains(reading)), "{target}: {v:?}");
    }
}

#[test]
fn oracle_rejects_missing_and_foreign_credentials() {
    let o = oracle_for_tests();
    let target = format!("/v1/repo/{REPO_A}/file/x");
    let other = "rlcr-ffffffffffffffffffffffffffffffff".to_owned();
    let cases: Vec<Vec<String>> = vec![
        vec![],
        vec![bearer_of(&o), bearer_of(&o)],
        vec![format!("Bearer {ACCOUNT_KEY}")],
        vec![format!("Bearer {other}")],
        vec![format!("Token {}", o.token)],
        vec![format!("Bearer\t{}x", o.token)],
        vec![format!("Basic {}", b64(o.token.as_bytes()))],
        vec![format!(
            "Basic {}",
            b64(format!("{ACCOUNT_KEY}:{}", o.token).as_bytes())
        )],
        vec![format!(
            "Basic {}",
            b64(format!("token:{other}").as_bytes())
        )],
    ];
    for auth in cases {
        let auth: Vec<&str> = auth.iter().map(String::as_str).collect();
        let v = o.violations(&record("GET", &target, &auth), false);
        assert!(v.iter().any(|v| v.starts_with("(a)")), "{auth:?}: {v:?}");
    }
}

#[test]
fn oracle_rejects_b_in_query_unless_allowed() {
    let o = oracle_for_tests();
    let auth = bearer_of(&o);
    let rec = record(
        "GET",
        &format!("/v1/repo/{REPO_A}/file/x?repo_id={}", REPO_B.to_uppercase()),
        &[&auth],
    );
    assert!(o
        .violations(&rec, false)
        .iter()
        .any(|v| v.contains("query names {B}")));
    assert!(o.violations(&rec, true).is_empty());
}

#[test]
fn oracle_rejects_the_policy_denied_git_operation() {
    let o = oracle_for_tests();
    let auth = bearer_of(&o);
    let v = o.violations(
        &record("POST", &format!("/v1/repo/{REPO_A}/git;x=1"), &[&auth]),
        false,
    );
    assert!(
        v.iter()
            .any(|v| v.contains("params-stripped reading is the policy-denied")),
        "{v:?}"
    );
    let v = o.violations(
        &record("PoSt", &format!("/v1/repo/{REPO_A}/GIT"), &[&auth]),
        false,
    );
    assert!(
        v.iter()
            .any(|v| v.contains("legacy-folded reading is the policy-denied")),
        "{v:?}"
    );
    assert!(o
        .violations(
            &record("GET", &format!("/v1/repo/{REPO_A}/git"), &[&auth]),
            false
        )
        .is_empty());
    assert!(o
        .violations(
            &record(
                "POST",
                &format!("/v1/repo/{REPO_A}.git/git-upload-pack"),
                &[&auth]
            ),
            false
        )
        .is_empty());
}

#[test]
fn readings_follow_rfc3986() {
    assert_eq!(remove_dot_segments("/a/b/c/./../../g"), "/a/g");
    assert_eq!(remove_dot_segments("mid/content=5/../6"), "mid/6");
    assert_eq!(strip_params("/a;x/..;y/b"), "/a/../b");
    assert_eq!(fold_legacy("/A/%u002e%C0%AE\\B"), "/a/../b");
    assert_eq!(
        route_of(&format!("/v1/repo/{REPO_A}.git/info/refs")),
        Route {
            repo: Uuid::parse_str(REPO_A).ok(),
            git: true,
            rest: "/info/refs".to_owned()
        }
    );
    assert_eq!(
        route_of(&format!("/v1/repo/{{{REPO_B}}}")).repo,
        Uuid::parse_str(REPO_B).ok()
    );
}

#[test]
fn corpus_format_escapes_and_placeholders() {
    let vars = Vars {
        a: REPO_A.to_owned(),
        b: REPO_B.to_owned(),
        token: "rlcr-T".to_owned(),
        unknown: "rlcr-U".to_owned(),
        key: "rlc-K".to_owned(),
        admin: "adm".to_owned(),
        upstream: "h:1".to_owned(),
    };
    let x = |s: &str| unescape(&expand(s, &vars).unwrap()).unwrap();
    assert_eq!(x("a\\r\\n\\t\\0\\\\\\x7f\\xFF"), b"a\r\n\t\0\\\x7f\xff");
    assert_eq!(x("{A}"), REPO_A.as_bytes());
    assert_eq!(x("\\x7b{B}\\x7d"), format!("{{{REPO_B}}}").as_bytes());
    assert_eq!(x("{\"args\":[]}"), b"{\"args\":[]}");
    assert_eq!(x("{REP:3:a\\r\\n}"), b"a\r\na\r\na\r\n");
    assert_eq!(x("{REP:2:{KEY}}"), b"rlc-Krlc-K");
    assert_eq!(x("{B64:token:{TOKEN}}"), b64(b"token:rlcr-T").as_bytes());
    assert_eq!(x("{TOKEN_B64}"), b64(b"token:rlcr-T").as_bytes());
    assert_eq!(x("{B64:a\\0b}"), b64(b"a\0b").as_bytes());
    assert_eq!(x("{A_ENC}")[..6], *b"%33%66");
    assert_eq!(x("{BIG}").len(), 102_400);
    assert!(expand("{NOPE}", &vars).is_err());
    assert!(expand("{REP:x:a}", &vars).is_err());
    assert!(unescape("\\q").is_err());
    assert!(unescape("\\x4").is_err());
    let smuggled = String::from_utf8(x("{SMUGGLED}")).unwrap();
    assert_eq!(x("{SMUGGLED_LEN}"), smuggled.len().to_string().as_bytes());
    assert!(smuggled.contains(REPO_B) && smuggled.ends_with("\r\n\r\n"));
    assert!(parse_corpus("----\n# class: x\n# expct: any\nGET\n").is_err());
    assert!(parse_corpus("----\n# class: x\n").is_err());
    assert!(parse_corpus("----\nGET /\n").is_err());
    let parsed = parse_corpus("doc\n----\n# class: c\n# expect: any\n# allow: b-in-query\n# comment\nGET /\\r\\n  \n\\r\\n\n----\n").unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].payload, vec!["GET /\\r\\n", "\\r\\n"]);
    assert!(parsed[0].allow_b_in_query && parsed[0].expect == Expect::Any);
}

#[test]
fn h2_framing_and_status_decoding() {
    let bytes = h2_bytes(&[vec![(b":path".to_vec(), b"/x".to_vec())]]);
    assert!(bytes.starts_with(H2_PREFACE));
    // SETTINGS (9 bytes), then HEADERS: length 1+1+5+1+2 = 10, type 1, END_STREAM|END_HEADERS.
    let headers = &bytes[H2_PREFACE.len() + 9..];
    assert_eq!(&headers[..9], &[0, 0, 10, 1, 5, 0, 0, 0, 1]);
    let mut long = Vec::new();
    hpack_int(&mut long, 300, 7, 0);
    assert_eq!(long, vec![127, 173, 1]);
    let mut i = 0;
    assert_eq!(hpack_read_int(&long, &mut i, 7), Some(300));
    assert_eq!(hpack_status(&[0x88]), Some(200));
    assert_eq!(hpack_status(&[0x48, 0x03, b'4', b'0', b'3']), Some(403));
    // "403" Huffman-coded: 011010 00000 011001 + EOS padding.
    assert_eq!(hpack_status(&[0x48, 0x83, 0x68, 0x0c, 0xff]), Some(403));
    let mut frames = Vec::new();
    h2_frame(&mut frames, 0x1, 0x4, 1, &[0x8d]);
    h2_frame(&mut frames, 0x3, 0x0, 3, &[0, 0, 0, 1]);
    assert_eq!(h2_summary(&frames), vec!["s1:404", "s3:RST_STREAM"]);
}

#[test]
fn http1_answers_are_split_and_attributed() {
    let raw = b"HTTP/1.1 200 OK\r\nx-request-id: r\r\ncontent-length: 2\r\n\r\nok\
HTTP/1.1 403 Forbidden\r\nx-request-id: r\r\ntransfer-encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n\
HTTP/1.1 401 Unauthorized\r\nx-request-id: r\r\ncontent-length: 18\r\n\r\n{\"code\":\"unknown\"}\
HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
    assert_eq!(
        http1_answers(raw),
        vec!["200", "403", "401:unknown", "400:hyper"]
    );
    for n in [1, 249, 250, 251, 4000] {
        assert_eq!(entry_number_of(&source_ip(n).to_string()), Some(n));
    }
    assert_eq!(entry_number_of("127.0.0.1"), None);
}
