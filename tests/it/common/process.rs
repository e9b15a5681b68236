//! The real `creditgate serve` binary as a child process, for tests that
//! kill it, signal it or read its logs.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::{TestApp, wait_until};

pub struct Gateway {
    pub port: u16,
    child: Child,
    pub log: PathBuf,
}

impl Gateway {
    /// Starts `creditgate serve` with the app's configuration on `port`,
    /// plus `env`, and waits until it answers `/healthz`. Its stderr (the
    /// logs) goes to `self.log`.
    pub async fn start(app: &TestApp, port: u16, env: &[(&str, &str)]) -> Self {
        Self::start_with(app, &app.config_file(), port, env).await
    }

    /// [`Gateway::start`] with another configuration file.
    pub async fn start_with(
        app: &TestApp,
        config: &std::path::Path,
        port: u16,
        env: &[(&str, &str)],
    ) -> Self {
        let log = std::env::temp_dir().join(format!("cg-{}-{port}.log", app.db.name));
        let stderr = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_creditgate"))
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env("CREDITGATE_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start gateway");
        let client = app.client.clone();
        wait_until("the gateway process", Duration::from_secs(15), || {
            let client = client.clone();
            async move {
                client
                    .get(format!("http://127.0.0.1:{port}/healthz"))
                    .send()
                    .await
                    .is_ok()
            }
        })
        .await;
        Self { port, child, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit by itself.
    pub async fn exit_status(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "gateway did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Load on a gateway process at `port`, as a SIGKILL test needs it: 16
/// tasks calling `/rag/q` with `keys` in turn, each call with its own
/// request id, until `stop`.
pub struct Load {
    /// Request ids answered 200.
    pub ok: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Calls that got no answer (cut off by a kill, refused while down).
    pub failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(
        client: &reqwest::Client,
        port: u16,
        keys: &[String],
        stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        use std::sync::atomic::Ordering;
        use std::sync::{Arc, Mutex, atomic::AtomicUsize};
        let ok = Arc::new(Mutex::new(Vec::<String>::new()));
        let failed = Arc::new(AtomicUsize::new(0));
        let next = Arc::new(AtomicUsize::new(0));
        let tasks = (0..16)
            .map(|w| {
                let (client, key) = (client.clone(), keys[w % keys.len()].clone());
                let (ok, failed, next, stop) =
                    (ok.clone(), failed.clone(), next.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let rid = format!("k-{}", next.fetch_add(1, Ordering::SeqCst));
                        let sent = client
                            .get(format!("http://127.0.0.1:{port}/rag/q"))
                            .bearer_auth(&key)
                            .header("x-request-id", &rid)
                            .timeout(Duration::from_secs(5))
                            .send()
                            .await;
                        match sent {
                            Ok(r) if r.status() == 200 => ok.lock().expect("lock").push(rid),
                            Ok(r) => panic!("unexpected status {}", r.status()),
                            Err(_) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Self { ok, failed, tasks }
    }

    /// Calls answered 200 so far.
    pub fn served(&self) -> usize {
        self.ok.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Waits for the tasks (after `stop`).
    pub async fn join(&mut self) {
        for t in self.tasks.drain(..) {
            t.await.expect("load task");
        }
    }
}
