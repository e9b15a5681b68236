//! `redis.url`: one server (`redis://`, `rediss://`) or a cluster
//! (`redis+cluster://h1:p1,h2:p2,...`), parsed once, by `check-config` and
//! `serve` alike, so the one accepts exactly what the other connects to.

use redis::{ErrorKind, IntoConnectionInfo, RedisError, RedisResult};

const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Where `redis.url` points, parsed once by `check-config` and `serve` alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Single(String),
    /// One `redis://` URL per seed node.
    Cluster(Vec<String>),
}

impl Target {
    pub fn parse(url: &str) -> RedisResult<Self> {
        let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) else {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(
                    "must start with redis://, rediss:// or redis+cluster://",
                ));
            }
            url.into_connection_info()?;
            return Ok(Self::Single(url.to_owned()));
        };
        // Credentials, given once before the first node, apply to every node.
        let (auth, nodes) = match rest.rsplit_once('@') {
            Some((auth, nodes)) => (format!("{auth}@"), nodes),
            None => (String::new(), rest),
        };
        let nodes = nodes.split('/').next().unwrap_or_default();
        let urls: Vec<String> = nodes
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|node| format!("redis://{auth}{node}"))
            .collect();
        if urls.is_empty() {
            return Err(invalid("redis+cluster:// needs at least one host:port"));
        }
        for u in &urls {
            u.as_str().into_connection_info()?;
        }
        Ok(Self::Cluster(urls))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

fn invalid(detail: &'static str) -> RedisError {
    RedisError::from((
        ErrorKind::InvalidClientConfig,
        "invalid redis.url",
        detail.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_every_seed_node_with_shared_credentials() {
        assert_eq!(
            Target::parse("redis+cluster://10.0.0.1:7000, 10.0.0.2:7001").unwrap(),
            Target::Cluster(vec![
                "redis://10.0.0.1:7000".into(),
                "redis://10.0.0.2:7001".into()
            ])
        );
        assert_eq!(
            Target::parse("redis+cluster://:s3cret@h1:7000,h2:7000").unwrap(),
            Target::Cluster(vec![
                "redis://:s3cret@h1:7000".into(),
                "redis://:s3cret@h2:7000".into()
            ])
        );
        assert!(Target::parse("redis://127.0.0.1:6379").is_ok());
    }

    #[test]
    fn malformed_urls_are_refused() {
        for url in [
            "redis+cluster://",
            "redis+cluster://,",
            "http://x",
            "redis://:x:y:z",
        ] {
            assert!(Target::parse(url).is_err(), "{url}");
        }
    }
}
