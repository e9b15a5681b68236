//! A private Redis Cluster for a test: six `redis-server` processes on
//! loopback (three masters, three replicas, cluster-node-timeout 2000 ms),
//! joined by `redis-cli --cluster create`, killed on drop. The same layout
//! as `scripts/cluster.sh`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

pub const NODE_TIMEOUT_MS: u64 = 2000;

pub struct TestCluster {
    pub ports: Vec<u16>,
    /// Behind a lock so a test can kill a node while load borrows the app.
    children: Mutex<Vec<Option<Child>>>,
    dir: PathBuf,
}

/// A free port whose cluster bus port (port + 10000) is free too.
fn cluster_port(taken: &[u16]) -> u16 {
    loop {
        let port = super::free_port();
        if port < 55000
            && !taken.contains(&port)
            && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        {
            return port;
        }
    }
}

impl TestCluster {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("cg-cluster-{}", uuid::Uuid::now_v7()));
        let mut ports = Vec::new();
        let mut children = Vec::new();
        for _ in 0..6 {
            // A port found free can be taken before the node binds it (by
            // another test's node, or as a connection's source port): a
            // node that exits or stays silent is started on another one.
            let mut tries = 0;
            let (port, child) = loop {
                let port = cluster_port(&ports);
                if let Some(child) = launch(&dir, port).await {
                    break (port, child);
                }
                tries += 1;
                assert!(tries < 5, "no cluster node would start");
            };
            ports.push(port);
            children.push(Some(child));
        }
        let cluster = Self {
            children: Mutex::new(children),
            ports,
            dir,
        };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in &cluster.ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli is installed");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_healthy().await;
        cluster
    }

    /// Starts node `i` again on its port (after a test killed it).
    async fn spawn(&self, i: usize) {
        let child = launch(&self.dir, self.ports[i])
            .await
            .expect("a restarted cluster node answers");
        self.children.lock().expect("lock")[i] = Some(child);
    }

    /// Every live node says the cluster is ok, and half of them are replicas.
    pub async fn wait_healthy(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let live = self.live_ports();
            let ok = live.iter().all(|p| {
                cli(*p, &["CLUSTER", "INFO"]).is_some_and(|o| o.contains("cluster_state:ok"))
            });
            let nodes = cli(live[0], &["CLUSTER", "NODES"]).unwrap_or_default();
            let replicas = nodes
                .lines()
                .filter_map(|l| l.split_whitespace().nth(2))
                .filter(|flags| flags.contains("slave") && !flags.contains("fail"))
                .count();
            let synced = live.iter().all(|p| {
                cli(*p, &["INFO", "replication"]).is_some_and(|o| {
                    o.contains("role:master") || o.contains("master_link_status:up")
                })
            });
            if ok && synced && replicas == live.len() / 2 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the cluster is not healthy (ok: {ok}):\n{nodes}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn live_ports(&self) -> Vec<u16> {
        let children = self.children.lock().expect("lock");
        self.ports
            .iter()
            .zip(children.iter())
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    pub fn url(&self) -> String {
        format!(
            "redis+cluster://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}",
            self.ports[0], self.ports[1], self.ports[2]
        )
    }

    /// The port of the master that owns `key`'s slot.
    pub fn master_of(&self, key: &str) -> u16 {
        self.owner_of(key)
            .unwrap_or_else(|| panic!("no master owns {key}"))
    }

    /// The live, unfailed master that owns `key`'s slot, if any.
    pub fn owner_of(&self, key: &str) -> Option<u16> {
        for port in self.live_ports() {
            let Some(nodes) = cli(port, &["CLUSTER", "NODES"]) else {
                continue;
            };
            let slot: u16 = cli(port, &["CLUSTER", "KEYSLOT", key])
                .and_then(|s| s.trim().parse().ok())
                .expect("keyslot");
            for line in nodes.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                    continue;
                }
                let owns = f[8..].iter().any(|range| match range.split_once('-') {
                    Some((a, b)) => {
                        a.parse::<u16>().is_ok_and(|a| a <= slot)
                            && b.parse::<u16>().is_ok_and(|b| slot <= b)
                    }
                    None => range.parse::<u16>() == Ok(slot),
                });
                if owns {
                    let addr = f[1].split('@').next().unwrap_or_default();
                    return addr.rsplit(':').next().and_then(|p| p.parse().ok());
                }
            }
        }
        None
    }

    /// SIGKILL the node on `port`.
    pub fn kill(&self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        let child = self.children.lock().expect("lock")[i].take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed node again with its nodes.conf: it rejoins, as a
    /// replica of whoever took over its slots.
    pub async fn restart(&self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        self.spawn(i).await;
    }

    /// Moves the first `slots` slots of the master on `from` to the master
    /// on `to` with `redis-cli --cluster reshard` (keys included), off the
    /// async runtime. Returns when every slot has moved.
    pub async fn reshard(&self, from: u16, to: u16, slots: u32) {
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let out = tokio::task::spawn_blocking(move || {
            Command::new("redis-cli")
                .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
                .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
                .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
                .output()
                .expect("redis-cli")
        })
        .await
        .expect("reshard");
        assert!(
            out.status.success(),
            "reshard: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The id of the master on `port`.
    pub fn node_id(&self, port: u16) -> String {
        cli(port, &["CLUSTER", "MYID"])
            .map(|s| s.trim().to_owned())
            .expect("node id")
    }
}

/// `redis-cli -p port args...`, or None when the node does not answer.
pub fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        .filter(|s| !s.starts_with("Could not connect"))
}

/// Starts a cluster node on `port`: `None` if it exits (its port was taken)
/// or does not answer within 10 s.
async fn launch(dir: &std::path::Path, port: u16) -> Option<Child> {
    let dir = dir.join(port.to_string());
    std::fs::create_dir_all(&dir).expect("node dir");
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(&dir)
        .args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
        .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
        .args(["--appendonly", "no", "--save", ""])
        // A replica that has not finished its first sync cannot take
        // over: start the sync at once rather than after 5 s.
        .args(["--repl-diskless-sync-delay", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if !matches!(child.try_wait(), Ok(None)) {
            return None;
        }
        // This node, not one of another test's that holds the port.
        let pid = format!("process_id:{}", child.id());
        if cli(port, &["INFO", "server"]).is_some_and(|o| o.lines().any(|l| l.trim_end() == pid)) {
            return Some(child);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let children = self.children.get_mut().expect("lock");
        for child in children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
