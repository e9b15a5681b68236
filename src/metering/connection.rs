//! One Redis or a Redis Cluster, behind one connection type.
//!
//! `redis.url` names either a single server (`redis://`, `rediss://`) or a
//! cluster (`redis+cluster://h1:p1,h2:p2,...`: any reachable nodes, the rest
//! is discovered). Callers hold a [`RedisConn`] and send commands and
//! scripts through it without knowing which: every script touches one
//! account's hash tag, so the cluster connection routes it by its keys,
//! follows MOVED and ASK, and refreshes its slot map after a failover or a
//! reshard. What a cluster needs beyond routing by key lives here too:
//! commands for every master (SCAN), and WAIT on the master that ran a
//! script.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::io::tcp::TcpSettings;
use redis::{
    Cmd, ConnectionInfo, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    RedisResult, Value,
};

pub use crate::config::redis::Target;

/// How long to wait, and how often to retry, before a caller gets an error.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

/// A multiplexed connection to one Redis, or to every node of a cluster.
/// Cheap to clone: clones share the sockets.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A master of the cluster (or the single server), for commands that must
/// reach every node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub host: String,
    pub port: u16,
}

impl RedisConn {
    /// Connects in the background: the gateway starts (and answers 503)
    /// while Redis is down, and the first command after Redis is back
    /// succeeds. One quick retry, then an error: a caller waiting out an
    /// exponential reconnect schedule is the "hangs 10 s" failure we avoid.
    pub fn lazy(target: &Target, timeouts: Timeouts) -> RedisResult<Self> {
        match target {
            Target::Single(url) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeouts.connect))
                    .set_response_timeout(Some(timeouts.response))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(50));
                let client = redis::Client::open(no_delay(url)?)?;
                Ok(Self::Single(ConnectionManager::new_lazy_with_config(
                    client, config,
                )?))
            }
            Target::Cluster(nodes) => {
                let client = cluster_client(nodes, timeouts)?;
                Ok(Self::Cluster(
                    client.get_pending_async_connection_with_config(cluster_config(timeouts)),
                ))
            }
        }
    }

    /// Connects now (command-line tools, the flusher's own connection).
    pub async fn connect(target: &Target, timeouts: Timeouts) -> RedisResult<Self> {
        match target {
            Target::Single(url) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeouts.connect))
                    .set_response_timeout(Some(timeouts.response))
                    .set_number_of_retries(1);
                let client = redis::Client::open(no_delay(url)?)?;
                Ok(Self::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            Target::Cluster(nodes) => {
                let client = cluster_client(nodes, timeouts)?;
                Ok(Self::Cluster(
                    client
                        .get_async_connection_with_config(cluster_config(timeouts))
                        .await?,
                ))
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The masters that hold data: the server itself, or every cluster
    /// master that owns slots (from CLUSTER SLOTS, asked of any node).
    pub async fn masters(&mut self) -> RedisResult<Vec<Node>> {
        let Self::Cluster(con) = self else {
            return Ok(vec![Node {
                host: String::new(),
                port: 0,
            }]);
        };
        let slots = con
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let mut masters: Vec<Node> = Vec::new();
        let Value::Array(ranges) = slots else {
            return Err(protocol("CLUSTER SLOTS"));
        };
        for range in ranges {
            // [start, end, [host, port, id, ...] master, replicas...]
            let Value::Array(fields) = range else {
                return Err(protocol("CLUSTER SLOTS"));
            };
            let Some(Value::Array(master)) = fields.get(2) else {
                return Err(protocol("CLUSTER SLOTS"));
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => return Err(protocol("CLUSTER SLOTS")),
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return Err(protocol("CLUSTER SLOTS"));
            };
            let node = Node {
                host,
                port: u16::try_from(*port).map_err(|_| protocol("CLUSTER SLOTS"))?,
            };
            if !masters.contains(&node) {
                masters.push(node);
            }
        }
        Ok(masters)
    }

    /// Runs `cmd` on one master (see [`Self::masters`]).
    pub async fn on_node(&mut self, node: &Node, cmd: &Cmd) -> RedisResult<Value> {
        match self {
            Self::Single(con) => cmd.query_async(con).await,
            Self::Cluster(con) => {
                con.route_command(
                    cmd.clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: node.host.clone(),
                        port: node.port,
                    }),
                )
                .await
            }
        }
    }

    /// WAIT on the master that owns `key`'s slot: returns once `replicas`
    /// replicas have every write this connection made there so far (or
    /// after `timeout`), with the number that did.
    pub async fn wait_replicas(
        &mut self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> RedisResult<i64> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout.as_millis() as u64);
        self.on_master_of(key, cmd).await
    }

    /// Redis's clock, unix ms, as the master that owns `key`'s slot reads
    /// it: the clock a script on that key compares its deadline with (a
    /// cluster's nodes may run on hosts whose clocks differ).
    pub async fn time_at(&mut self, key: &str) -> RedisResult<i64> {
        let (secs, micros): (i64, i64) = self.on_master_of(key, redis::cmd("TIME")).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Runs `cmd`, which names no key, on the master that owns `key`'s slot.
    async fn on_master_of<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: Cmd,
    ) -> RedisResult<T> {
        match self {
            Self::Single(con) => cmd.query_async(con).await,
            Self::Cluster(con) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let value = con
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                Ok(redis::from_redis_value(value)?)
            }
        }
    }
}

/// `TCP_NODELAY` on, as hiredis and Redis's own side of the socket have it.
/// The multiplexed connection has several script calls in flight at once
/// (one per shard); with Nagle's algorithm on (the redis crate's default),
/// a call written while another is unacknowledged waits for that call's
/// answer to carry the acknowledgement back: one more round trip for the
/// second call. On loopback a round trip is microseconds and the benches
/// show no difference (docs/BENCHMARKS.md); across a network it is the
/// network's round trip.
fn tcp() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

fn no_delay(url: &str) -> RedisResult<ConnectionInfo> {
    Ok(url.into_connection_info()?.set_tcp_settings(tcp()))
}

fn cluster_client(nodes: &[String], timeouts: Timeouts) -> RedisResult<ClusterClient> {
    // A failover or a reshard shows up as MOVED, ASK or a closed socket;
    // the client refreshes its slot map and retries, quickly, and the
    // caller's own deadline (redis.command_timeout_ms) bounds the whole.
    ClusterClient::builder(nodes.iter().map(String::as_str))
        .connection_timeout(timeouts.connect)
        .response_timeout(timeouts.response)
        .retries(3)
        .min_retry_wait(10)
        .max_retry_wait(100)
        .tcp_settings(tcp())
        .build()
}

fn cluster_config(timeouts: Timeouts) -> ClusterConfig {
    ClusterConfig::new()
        .set_connection_timeout(timeouts.connect)
        .set_response_timeout(timeouts.response)
}

fn protocol(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::Parse, "unexpected reply", what.to_owned()))
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(con) => con.req_packed_command(cmd),
            Self::Cluster(con) => con.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(con) => con.req_packed_commands(cmd, offset, count),
            Self::Cluster(con) => con.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(con) => con.get_db(),
            Self::Cluster(con) => con.get_db(),
        }
    }
}
