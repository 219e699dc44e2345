//! `statefold serve` as a child process: the one helper that starts the binary and reads
//! the address it prints first.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Serve {
    pub child: Child,
    pub url: String,
    pub stderr: std::path::PathBuf,
}

/// A port free now, for a server that must know its address before it starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Serve {
    /// `statefold serve` on the counter kind, with `extra` flags.
    pub fn start(dir: &Path) -> Serve {
        Serve::start_with(dir, &[])
    }

    /// [`Serve::start`] with more flags.
    pub fn start_with(dir: &Path, extra: &[String]) -> Serve {
        let mut args: Vec<String> =
            ["--kind", "counter=counter.wasm", "--checkpoint-interval-diffs", "50", "--retain-checkpoints", "100"]
                .map(String::from)
                .to_vec();
        args.extend_from_slice(extra);
        Serve::spawn(dir, &args)
    }

    /// `statefold serve --listen 127.0.0.1:0 --data-dir DIR/data --reducers-dir
    /// (the built reducers) ARGS`, its stderr in a file under `dir`.
    pub fn spawn(dir: &Path, args: &[String]) -> Serve {
        let counter = crate::wasm("counter");
        let reducers = counter.parent().expect("the reducers' directory");
        let mut all: Vec<String> = vec!["--listen".into(), "127.0.0.1:0".into(), "--data-dir".into()];
        all.push(dir.join("data").display().to_string());
        all.push("--reducers-dir".into());
        all.push(reducers.display().to_string());
        all.extend_from_slice(args);
        Serve::spawn_args(dir, &all)
    }

    /// `statefold serve` in sharded mode on the counter kind (`--kind counter=counter.wasm`),
    /// folding from `brokers` with `standbys`, advertising its own URL (on a port free when
    /// it starts: it must know it before it listens), heartbeats every 200 ms, a member gone
    /// after 1.5 s, the group's session 6 s; then `extra`.
    pub fn sharded(dir: &Path, brokers: &str, standbys: usize, extra: &[&str]) -> Serve {
        let port = free_port();
        let (url, standbys) = (format!("http://127.0.0.1:{port}"), standbys.to_string());
        let mut args =
            vec!["--kafka-brokers", brokers, "--kafka-fetch-wait-ms", "10", "--kafka-check-interval-ms", "200"];
        args.extend_from_slice(&["--cluster-url", &url, "--cluster-standbys", &standbys]);
        args.extend_from_slice(&["--cluster-heartbeat-interval-ms", "200", "--cluster-member-timeout-ms", "1500"]);
        args.extend_from_slice(&["--cluster-session-timeout-ms", "6000"]);
        args.extend_from_slice(extra);
        Serve::on_port(dir, port, &args)
    }

    /// `statefold serve` on the counter kind, listening on `port` (a restart keeps it), its
    /// data under `dir`, then `extra`.
    pub fn on_port(dir: &Path, port: u16, extra: &[&str]) -> Serve {
        let reducers = crate::wasm("counter").parent().expect("the reducers' directory").display().to_string();
        let (listen, data) = (format!("127.0.0.1:{port}"), dir.join("data").display().to_string());
        let mut args = vec!["--listen", &listen, "--data-dir", &data, "--reducers-dir", &reducers];
        args.extend_from_slice(&["--kind", "counter=counter.wasm"]);
        args.extend_from_slice(extra);
        Serve::spawn_args(dir, &args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// `statefold serve ARGS` (which must make it listen on a port of its choosing), its
    /// stderr in a file under `dir`; returns once it has printed its address.
    pub fn spawn_args(dir: &Path, args: &[String]) -> Serve {
        let mut command = Command::new(crate::statefold_binary());
        command.arg("serve").args(args);
        Serve::spawn_command(dir, command)
    }

    /// [`Serve::spawn`], where no file the process writes may grow past `bytes`
    /// (RLIMIT_FSIZE, with SIGXFSZ ignored): its writes past that fail with EFBIG, as they
    /// would with ENOSPC on a full disk.
    pub fn spawn_with_file_limit(dir: &Path, args: &[String], bytes: u64) -> Serve {
        let counter = crate::wasm("counter");
        let reducers = counter.parent().expect("the reducers' directory");
        let mut command = Command::new("bash");
        command.args(["-c", r#"trap '' XFSZ; ulimit -f "$1"; shift; exec "$@""#, "bash"]);
        command.arg((bytes / 1024).to_string()).arg(crate::statefold_binary()).arg("serve");
        command.args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.join("data"));
        command.arg("--reducers-dir").arg(reducers).args(args);
        Serve::spawn_command(dir, command)
    }

    fn spawn_command(dir: &Path, mut command: Command) -> Serve {
        let stderr = dir.join(format!(
            "stderr-{}.log",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("statefold starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("statefold listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; stderr: {}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                )
            })
            .to_owned();
        Serve { child, url, stderr }
    }

    pub async fn wait_ready(&self, client: &reqwest::Client) {
        self.wait_ready_within(client, Duration::from_secs(10)).await;
    }

    /// [`Serve::wait_ready`], for a server that first compiles large modules.
    pub async fn wait_ready_within(&self, client: &reqwest::Client, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if client.get(format!("{}/readyz", self.url)).send().await.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("not ready in {limit:?}");
    }

    /// The process's resident memory (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let kb = text.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next());
        kb.and_then(|kb| kb.parse::<u64>().ok()).unwrap_or(0) * 1024
    }

    pub fn signal(&mut self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    pub fn wait(&mut self) -> std::process::ExitStatus {
        for _ in 0..500 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the process did not stop in 10 s");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
