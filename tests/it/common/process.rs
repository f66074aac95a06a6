//! The real `tollgate` binary as a child process: `serve --config FILE` on random loopback ports
//! (`127.0.0.1:0`, read back from the "tollgate listening http=.. grpc=.." log line), its log
//! kept for failure messages, signals sent with `kill`, and the process killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A running `tollgate serve`.
pub struct Process {
    child: Child,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

/// Finds `key=ADDR` in a log line, text or JSON (where the address is followed by `","store"..`).
fn addr_after(line: &str, key: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|a| {
            let end = a
                .find(|c: char| !(c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']')))
                .unwrap_or(a.len());
            a[..end].parse().ok()
        })
}

/// The HTTP and gRPC addresses of a "tollgate listening http=.. grpc=.." line.
pub fn listening_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("tollgate listening") {
        return None;
    }
    Some((addr_after(line, "http=")?, addr_after(line, "grpc=")?))
}

impl Process {
    /// Starts `tollgate serve --config PATH --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0`
    /// (without the caller's TOLLGATE_* variables) and waits, at most `deadline`, for it to
    /// log where it listens. Blocking: call it through `common::blocking`.
    pub fn serve(config: &Path, deadline: Duration) -> Process {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"]).arg(config).args([
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ]);
        for (k, _) in std::env::vars() {
            if k.starts_with("TOLLGATE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("TOLLGATE_LOG", "warn,tollgate=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        // Drain both pipes for the whole life of the child (a full pipe would block it).
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for pipe in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let log = log.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addrs) = listening_addrs(&line) {
                        let _ = tx.send(addrs);
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        drop(tx);
        let mut process = Process {
            child,
            http: "0.0.0.0:0".parse().unwrap(),
            grpc: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        match rx.recv_timeout(deadline) {
            Ok((http, grpc)) => {
                process.http = http;
                process.grpc = grpc;
                process
            }
            Err(e) => {
                let status = process.child.try_wait().ok().flatten();
                panic!(
                    "tollgate did not report its addresses within {deadline:?} ({e}; exit status \
                     {status:?})\n--- log ---\n{}",
                    process.log_text()
                );
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends a signal by name (`HUP`, `TERM`, ...) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap_or_else(|e| panic!("run kill -{name}: {e}"));
        assert!(status.success(), "kill -{name} {} failed", self.pid());
    }

    /// `None` while the child runs, its exit status once it ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
