//! Connections to Redis, standalone or Cluster, behind one type: redis-rs's reconnecting
//! `ConnectionManager` for one server, its async cluster client (MOVED/ASK, topology refresh)
//! for a cluster. A [`Pool`] is a bounded set of them (multiplexed, so each carries many
//! requests at once); blocking reads get a connection of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};

/// Where Redis is and who we are to it.
#[derive(Clone)]
pub struct Target {
    /// `redis://host:port` or `rediss://host:port`; several seed nodes for a cluster.
    pub urls: Vec<String>,
    pub cluster: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Target")
            .field("urls", &self.urls)
            .field("cluster", &self.cluster)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a non-blocking command may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Target {
    /// Checks the URLs: a clear error naming the flag, before anything connects.
    pub fn validate(&self) -> Result<(), String> {
        if self.urls.is_empty() {
            return Err("--redis-url: give at least one redis:// or rediss:// URL".into());
        }
        if !self.cluster && self.urls.len() > 1 {
            return Err("--redis-url: several URLs are cluster seed nodes; add --redis-cluster, or give one URL".into());
        }
        for url in &self.urls {
            let info = url.as_str().into_connection_info().map_err(|e| {
                format!("--redis-url: {url:?} is not a Redis URL ({e}); use redis://host:port or rediss://host:port")
            })?;
            if info.redis_settings().password().is_some() {
                return Err("--redis-url: put no password in the URL; use --redis-password-file or AGENTRY_REDIS_PASSWORD".into());
            }
        }
        Ok(())
    }

    fn infos(&self) -> redis::RedisResult<Vec<redis::ConnectionInfo>> {
        self.urls
            .iter()
            .map(|url| {
                let info = url.as_str().into_connection_info()?;
                let mut settings = info.redis_settings().clone().set_skip_set_lib_name();
                if let Some(user) = &self.username {
                    settings = settings.set_username(user);
                }
                if let Some(password) = &self.password {
                    settings = settings.set_password(password);
                }
                Ok(info.set_redis_settings(settings))
            })
            .collect()
    }

    /// A connection for ordinary commands. Standalone connections are made lazily and
    /// reconnect by themselves; a cluster connection reads the topology now.
    pub async fn connect(&self) -> redis::RedisResult<Conn> {
        self.open(RESPONSE_TIMEOUT).await
    }

    /// A connection for blocking reads of up to `block`.
    pub async fn connect_blocking(&self, block: Duration) -> redis::RedisResult<Conn> {
        self.open(block + RESPONSE_TIMEOUT).await
    }

    async fn open(&self, response_timeout: Duration) -> redis::RedisResult<Conn> {
        let infos = self.infos()?;
        if self.cluster {
            let client = ClusterClientBuilder::new(infos)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(response_timeout)
                .retries(8)
                .build()?;
            return Ok(Conn::Cluster(client.get_async_connection().await?));
        }
        let info = infos.into_iter().next().ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
        })?;
        let client = redis::Client::open(info)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Conn::Single(Single {
            recipe: Arc::new((client, config)),
            current: Arc::new(std::sync::Mutex::new(manager)),
        }))
    }
}

/// A standalone connection that is rebuilt after a dropped connection. redis-rs's
/// `ConnectionManager` reconnects by itself, but after its retries are spent while the server
/// is down (a restart) it can keep answering with the old error; a fresh one does not.
#[derive(Clone)]
pub struct Single {
    /// What a fresh manager is made from.
    recipe: Arc<(redis::Client, ConnectionManagerConfig)>,
    current: Arc<std::sync::Mutex<ConnectionManager>>,
}

impl Single {
    fn manager(&self) -> ConnectionManager {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn check<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &result
            && (e.is_connection_dropped() || e.is_io_error() || e.is_unrecoverable_error())
            && let Ok(fresh) = ConnectionManager::new_lazy_with_config(
                self.recipe.0.clone(),
                self.recipe.1.clone(),
            )
        {
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        }
        result
    }
}

/// One connection to standalone Redis or to a cluster.
#[derive(Clone)]
pub enum Conn {
    Single(Single),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(s) => Box::pin(async move {
                let mut m = s.manager();
                let result = m.req_packed_command(cmd).await;
                s.check(result)
            }),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(s) => Box::pin(async move {
                let mut m = s.manager();
                let result = m.req_packed_commands(pipeline, offset, count).await;
                s.check(result)
            }),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(s) => s.manager().get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A bounded set of multiplexed connections, handed out in turn.
#[derive(Clone)]
pub struct Pool {
    conns: Arc<Vec<Conn>>,
    next: Arc<AtomicUsize>,
}

/// The default pool size (`--redis-pool-size`).
pub const DEFAULT_POOL_SIZE: usize = 10;

impl Pool {
    /// Opens `size` connections (at least one).
    pub async fn open(target: &Target, size: usize) -> redis::RedisResult<Self> {
        let mut conns = Vec::with_capacity(size.max(1));
        for _ in 0..size.max(1) {
            conns.push(target.connect().await?);
        }
        Ok(Pool {
            conns: Arc::new(conns),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// A connection to use now (clones share the underlying socket).
    pub fn get(&self) -> Conn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
    }

    pub fn size(&self) -> usize {
        self.conns.len()
    }
}

/// Whether an error is Redis's "the group already exists".
pub fn is_busy_group(e: &redis::RedisError) -> bool {
    e.code() == Some("BUSYGROUP")
}

/// Whether an error is Redis's "no such group (or key)".
pub fn is_no_group(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(urls: &[&str], cluster: bool) -> Target {
        Target {
            urls: urls.iter().map(|s| s.to_string()).collect(),
            cluster,
            username: None,
            password: Some("secret".into()),
        }
    }

    #[test]
    fn urls_are_checked_with_the_flag_named() {
        assert!(
            target(&["redis://127.0.0.1:6379"], false)
                .validate()
                .is_ok()
        );
        assert!(
            target(&["rediss://redis.example:6380"], false)
                .validate()
                .is_ok()
        );
        assert!(
            target(&["redis://a:1", "redis://b:2"], true)
                .validate()
                .is_ok()
        );
        for (t, want) in [
            (target(&[], false), "at least one"),
            (
                target(&["redis://a:1", "redis://b:2"], false),
                "--redis-cluster",
            ),
            (target(&["http://a:1"], false), "not a Redis URL"),
            (
                target(&["redis://:pw@a:1"], false),
                "no password in the URL",
            ),
        ] {
            let e = t.validate().unwrap_err();
            assert!(e.starts_with("--redis-url: ") && e.contains(want), "{e}");
        }
        // Debug output never carries the password.
        assert!(!format!("{:?}", target(&["redis://a:1"], false)).contains("secret"));
    }
}
