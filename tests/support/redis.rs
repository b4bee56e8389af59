//! Real `redis-server` processes for the shared-store tests: each on a free loopback
//! port with its own data directory, stoppable (SIGTERM or `kill -9`) and restartable
//! on the same port and directory, so AOF recovery and "Redis came back" are real.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How the server persists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// No RDB, no AOF: nothing survives a restart.
    None,
    /// AOF with `appendfsync always`: every acknowledged write is on disk.
    AofAlways,
}

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    persistence: Persistence,
    /// With TLS: the TLS port (the plain `port` stays open for the test's own checks).
    pub tls_port: Option<u16>,
}

/// The `redis-server` to run: `SCOPEGATE_TEST_REDIS_SERVER`, else the one on `PATH`.
fn binary() -> PathBuf {
    std::env::var_os("SCOPEGATE_TEST_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl RedisServer {
    /// Starts a server on a free port (a few tries, in case another test took the port
    /// between probing and binding).
    pub fn start(persistence: Persistence) -> RedisServer {
        Self::start_with(persistence, None)
    }

    /// Also listens with TLS, using the certificate `(cert, key)` PEM pair.
    pub fn start_tls(persistence: Persistence, leaf: &(String, String)) -> RedisServer {
        Self::start_with(persistence, Some(leaf))
    }

    fn start_with(persistence: Persistence, leaf: Option<&(String, String)>) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some((cert, key)) = leaf {
            std::fs::write(dir.path().join("tls.crt"), cert).expect("write cert");
            std::fs::write(dir.path().join("tls.key"), key).expect("write key");
        }
        for _ in 0..5 {
            let port = free_port();
            let tls_port = leaf.map(|_| free_port());
            if let Some(child) = launch(port, tls_port, dir.path(), persistence) {
                return RedisServer {
                    child: Some(child),
                    port,
                    dir,
                    persistence,
                    tls_port,
                };
            }
        }
        panic!("redis-server did not start on a free port after 5 tries");
    }

    /// `rediss://` URL of the TLS port (for `127.0.0.1`).
    pub fn tls_url(&self) -> String {
        format!(
            "rediss://127.0.0.1:{}/0",
            self.tls_port.expect("started with TLS")
        )
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// True when the server answers `PING` with `+PONG`.
    pub fn ping(&self) -> bool {
        self.command(&["PING"])
            .is_some_and(|r| r.starts_with("+PONG"))
    }

    /// Sends one command (RESP) and returns the raw reply, or `None` if unreachable.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        command_at(self.addr(), args)
    }

    /// `kill -9`: no shutdown save, no goodbye to clients.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (AOF is replayed).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.child = launch(self.port, self.tls_port, self.dir.path(), self.persistence);
        assert!(
            self.child.is_some(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// Every byte of every file in the data directory (AOF, RDB), for secret checks.
    pub fn files_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut dirs = vec![self.dir.path().to_path_buf()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if let Ok(bytes) = std::fs::read(&path) {
                    out.extend_from_slice(&bytes);
                }
            }
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Starts `redis-server` on `port` with its files in `dir`; the child once it answers.
fn launch(port: u16, tls_port: Option<u16>, dir: &Path, persistence: Persistence) -> Option<Child> {
    let mut cmd = Command::new(binary());
    cmd.arg("--port").arg(port.to_string());
    if let Some(tls_port) = tls_port {
        cmd.arg("--tls-port")
            .arg(tls_port.to_string())
            .arg("--tls-cert-file")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key-file")
            .arg(dir.join("tls.key"))
            .args(["--tls-auth-clients", "no"]);
    }
    cmd.args(["--bind", "127.0.0.1", "--protected-mode", "no"])
        .args(["--save", "", "--daemonize", "no", "--loglevel", "warning"])
        .arg("--dir")
        .arg(dir);
    match persistence {
        Persistence::None => cmd.args(["--appendonly", "no"]),
        Persistence::AofAlways => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {:?} ({e}); scripts/test installs redis-server",
                binary()
            )
        });
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if command_at(addr, &["PING"]).is_some_and(|r| r.starts_with("+PONG")) {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// One command over a fresh connection (RESP); the raw reply, or `None` if unreachable.
pub fn command_at(addr: SocketAddr, args: &[&str]) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(out.as_bytes()).ok()?;
    let mut buf = vec![0u8; 1 << 16];
    let mut got = Vec::new();
    // Replies here are small: once a line ends, wait briefly for more, then stop.
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.ends_with(b"\r\n") {
                    stream
                        .set_read_timeout(Some(Duration::from_millis(50)))
                        .ok()?;
                }
            }
            Err(_) => break,
        }
    }
    Some(String::from_utf8_lossy(&got).into_owned())
}

/// `MONITOR` on a server: every command any client sends, as Redis echoes them.
pub struct Monitor {
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    pub fn start(addr: SocketAddr) -> Monitor {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let mut stream = TcpStream::connect(addr).expect("connect for MONITOR");
        stream.write_all(b"MONITOR\r\n").expect("MONITOR");
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        // Wait for "+OK" so nothing sent after start() is missed.
        let mut first = [0u8; 5];
        stream.read_exact(&mut first).expect("MONITOR answer");
        assert_eq!(&first, b"+OK\r\n");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sink, stopping) = (seen.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while !stopping.load(Ordering::Acquire) {
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => sink.lock().expect("lock").extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
            }
        });
        Monitor {
            seen,
            stop,
            reader: Some(reader),
        }
    }

    /// Stops watching (after a short drain) and returns everything seen.
    pub fn stop(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        std::mem::take(&mut *self.seen.lock().expect("lock"))
    }
}
