//! The real Redis servers of `hack/redis` (standalone and a 3-master cluster), and a private
//! `redis-server` for tests that restart it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentry::messaging::client::{Credentials, Mailbox, Options};
use agentry::messaging::conn::{Conn, Target};
use kube::Client;

pub fn password() -> String {
    std::env::var("AGENTRY_REDIS_PASSWORD").unwrap_or_else(|_| "agentry-redis-admin".into())
}

pub fn standalone_url() -> String {
    std::env::var("AGENTRY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:16379".into())
}

pub fn cluster_urls() -> Vec<String> {
    std::env::var("AGENTRY_REDIS_CLUSTER_URLS")
        .unwrap_or_else(|_| {
            "redis://127.0.0.1:17101 redis://127.0.0.1:17102 redis://127.0.0.1:17103".into()
        })
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Which Redis a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Standalone,
    Cluster,
}

impl Mode {
    pub fn urls(self) -> Vec<String> {
        match self {
            Mode::Standalone => vec![standalone_url()],
            Mode::Cluster => cluster_urls(),
        }
    }

    /// The controller's messaging flags (the admin password goes in its environment).
    pub fn controller_args(self) -> Vec<String> {
        let mut args = vec!["--redis-url".to_string(), self.urls().join(",")];
        if self == Mode::Cluster {
            args.push("--redis-cluster".into());
        }
        args
    }

    /// An admin connection.
    pub async fn admin(self) -> Conn {
        Target {
            urls: self.urls(),
            cluster: self == Mode::Cluster,
            username: Some("default".into()),
            password: Some(password()),
        }
        .connect()
        .await
        .expect("connecting to Redis as admin (is `hack/redis up` running?)")
    }
}

/// The messaging flags plus the environment for `ControllerProcess::start_with_env`.
pub fn env() -> Vec<(&'static str, String)> {
    vec![("AGENTRY_REDIS_PASSWORD", password())]
}

/// An Agent manifest override with messaging on.
pub fn messaging(extra: serde_json::Value) -> serde_json::Value {
    let mut m = serde_json::json!({"enabled": true, "maxLen": 10000});
    super::merge(&mut m, extra);
    serde_json::json!({"spec": {"messaging": m}})
}

/// An Agent's messaging credentials, as its pod would mount them.
pub async fn credentials(client: &Client, ns: &str, name: &str) -> Credentials {
    let dir = tempfile::tempdir().unwrap();
    write_identity(client, ns, name, dir.path()).await;
    Credentials::from_dir(dir.path()).expect("redis.json and redis-password in the identity Secret")
}

/// Writes the identity Secret's files into `dir` (what the kubelet mounts).
pub async fn write_identity(client: &Client, ns: &str, name: &str, dir: &Path) {
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), ns);
    let s = secrets.get(&format!("{name}-identity")).await.unwrap();
    for (k, v) in s.data.unwrap_or_default() {
        std::fs::write(dir.join(k), v.0).unwrap();
    }
}

/// A mailbox for an Agent, with a short claim timeout for tests.
pub async fn mailbox(client: &Client, ns: &str, name: &str, consumer: &str) -> Mailbox {
    let creds = credentials(client, ns, name).await;
    Mailbox::connect(
        &creds,
        Options {
            consumer: consumer.into(),
            claim_idle: Duration::from_millis(500),
            max_block: Duration::from_secs(2),
            ..Options::default()
        },
    )
    .await
    .unwrap()
}

/// A raw connection as the Agent's own ACL user (to try what it must not do).
pub async fn as_agent(creds: &Credentials) -> Conn {
    Target {
        urls: creds.endpoint.urls.clone(),
        cluster: creds.endpoint.cluster,
        username: Some(creds.endpoint.user.clone()),
        password: Some(creds.password.clone()),
    }
    .connect()
    .await
    .unwrap()
}

/// Receives until `want` distinct message ids arrived (acknowledging each), or `timeout`.
pub async fn receive_ids(
    mailbox: &mut Mailbox,
    want: usize,
    timeout: Duration,
) -> (std::collections::HashSet<String>, usize) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut ids = std::collections::HashSet::new();
    let mut copies = 0;
    while ids.len() < want && tokio::time::Instant::now() < deadline {
        let got = match mailbox.recv(100, Duration::from_millis(500)).await {
            Ok(got) => got,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for m in &got {
            copies += 1;
            ids.insert(m.id.clone());
            let _ = mailbox.ack(&[&m.entry]).await;
        }
    }
    (ids, copies)
}

/// A private `redis-server` (AOF everysec) on a free port, for tests that restart it.
pub struct PrivateRedis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let mut r = PrivateRedis {
            port: super::free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.launch();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ])
            .args(["--requirepass", &password()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (hack/redis install)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server on {} did not start", self.port);
    }

    /// SIGTERM (Redis flushes its AOF and exits), then start again on the same data.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        self.launch();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
