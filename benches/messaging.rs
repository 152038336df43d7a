//! Messaging benchmarks (BENCHMARKS.md, area `messaging`), each against raw redis-rs on the same
//! server in the same run, on the two local Redis deployments `make redis-up` starts (settings
//! from the environment `eval "$(hack/redis env)"` sets, else from `hack/redis env` itself): the
//! standalone server and the 3-master cluster, with the same code.
//!
//! - `roundtrip_p50_*`, `roundtrip_p99_*`: one message at a time, send -> receive. Ours: the
//!   sender's `Mailbox::send` (XADD to its outbox), the relay (in this process, as the
//!   controller runs it: 8 shards, batch 256), the receiver's `Mailbox::recv` blocked on its
//!   inbox, then `ack`. Baseline: XADD to a stream on one connection, a reader blocked in
//!   XREADGROUP on another, then XACK. A sample ends when the receiver has the message; the
//!   next one starts after its ack. The sides alternate in rounds, so machine noise hits both.
//! - `throughput_*`: N agents (default 100), agent i sending to agent i+1, every sender with at
//!   most W messages (default 8) not yet received, for S seconds (default 5) after a warm-up;
//!   msg/s counted at the receivers, latency from the send time carried in the body. Baseline:
//!   the same senders, receivers and window on N raw streams. Every message sent in a round is
//!   received before the next round starts (none lost, none left over).
//!
//! Bench agents live in namespace `bench-<pid>`, provisioned with the admin connection
//! (`acl::provision`: user, inbox, outbox, groups) and removed at the end (`acl::deprovision`),
//! with the baseline's streams. The relay shares the wake streams `agentry:{out:<n>}:wake` (and
//! their group) with any controller using the same Redis: they stay, without its consumer.
//!
//! Targets (reported, never asserted): round trip p99 < 1 ms and <= 2x raw; >= 10,000 msg/s over
//! 100 agents.
//!
//! Environment: `AGENTRY_BENCH_MESSAGING_SAMPLES` (5000), `_WARMUP` (300), `_AGENTS` (100),
//! `_WINDOW` (8), `_SECS` (5), `_ROUNDS` (throughput rounds per side, 2). Arguments
//! `standalone`, `cluster`, `latency`, `throughput` run only those (the report holds only them).
//! Exits 2 when Redis cannot be reached.

mod report;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentry::crd::MessagingSpec;
use agentry::messaging::client::{Credentials, Mailbox, Options};
use agentry::messaging::conn::{Conn, Pool, Target, is_no_group};
use agentry::messaging::policy::Peer;
use agentry::messaging::relay::{Relay, Settings, StaticDirectory};
use agentry::messaging::{DEFAULT_BODY_LIMIT, Endpoint, GROUP, Keys, RELAY_GROUP, acl, wake_key};
use anyhow::{Context as _, bail, ensure};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::streams::StreamReadReply;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};
use report::Row;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const SHARDS: u16 = 8;
const BATCH: usize = 256;
const CONSUMER: &str = "bench";
const KIND: &str = "bench";
/// How long a blocked read waits before its loop looks at the stop flag again.
const POLL: Duration = Duration::from_millis(200);
/// The longest a message may take before the bench calls it lost.
const LOST_AFTER: Duration = Duration::from_secs(15);
/// Latency rounds per side (alternating).
const LATENCY_ROUNDS: usize = 5;
/// Receive at most this many per read.
const RECV_COUNT: usize = 64;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

struct Config {
    samples: usize,
    warmup: usize,
    agents: usize,
    window: usize,
    secs: f64,
    rounds: usize,
    latency: bool,
    throughput: bool,
}

fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------- Redis settings

/// One Redis deployment and the admin's settings for it.
struct Server {
    label: &'static str,
    admin: Target,
}

/// `AGENTRY_REDIS_URL`, `AGENTRY_REDIS_CLUSTER_URLS`, `AGENTRY_REDIS_PASSWORD` from the
/// environment, else as `hack/redis env` prints them.
fn servers() -> anyhow::Result<(Server, Server)> {
    let mut env: HashMap<String, String> = [
        "AGENTRY_REDIS_URL",
        "AGENTRY_REDIS_CLUSTER_URLS",
        "AGENTRY_REDIS_PASSWORD",
    ]
    .into_iter()
    .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
    .collect();
    if env.len() < 3 {
        let out = std::process::Command::new("hack/redis")
            .arg("env")
            .output()
            .context("running hack/redis env (or set AGENTRY_REDIS_URL, AGENTRY_REDIS_CLUSTER_URLS and AGENTRY_REDIS_PASSWORD: eval \"$(hack/redis env)\")")?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
                let v = v.replace("\\ ", " ");
                env.entry(k.to_string())
                    .or_insert_with(|| v.trim_matches('\'').trim_matches('"').to_string());
            }
        }
    }
    let get = |k: &str| {
        env.get(k).cloned().with_context(|| {
            format!(
                "{k} is not set and hack/redis env did not print it: eval \"$(hack/redis env)\""
            )
        })
    };
    let password = Some(get("AGENTRY_REDIS_PASSWORD")?);
    let standalone = Target {
        urls: vec![get("AGENTRY_REDIS_URL")?],
        cluster: false,
        username: None,
        password: password.clone(),
    };
    let cluster = Target {
        urls: get("AGENTRY_REDIS_CLUSTER_URLS")?
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        cluster: true,
        username: None,
        password,
    };
    for t in [&standalone, &cluster] {
        t.validate().map_err(anyhow::Error::msg)?;
    }
    Ok((
        Server {
            label: "standalone",
            admin: standalone,
        },
        Server {
            label: "cluster",
            admin: cluster,
        },
    ))
}

/// The admin connection, checked with a PING; exits 2 with what to do when Redis is not there.
async fn reach(server: &Server) -> Conn {
    let tried = tokio::time::timeout(Duration::from_secs(15), async {
        let mut c = server.admin.connect().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await?;
        Ok::<_, redis::RedisError>(c)
    })
    .await;
    let why = match tried {
        Ok(Ok(c)) => return c,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 15 s".to_string(),
    };
    eprintln!(
        "messaging bench: cannot reach the {} Redis at {} as the admin user: {why}\n\
         Start it with `make redis-up` (or `hack/redis up`; `hack/redis status` tells), and run \
         with its settings: eval \"$(hack/redis env)\"",
        server.label,
        server.admin.urls.join(" ")
    );
    std::process::exit(2);
}

// ---------------------------------------------------------------- raw redis-rs (the baseline)

/// A plain redis-rs connection: multiplexed to one server, or the async cluster client.
#[derive(Clone)]
enum Raw {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Raw {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Raw::Single(c) => c.req_packed_command(cmd),
            Raw::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Raw::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Raw::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Raw::Single(c) => c.get_db(),
            Raw::Cluster(c) => c.get_db(),
        }
    }
}

/// A raw connection as the admin; `response` long enough for the blocking reads.
async fn raw_connect(target: &Target, response: Duration) -> anyhow::Result<Raw> {
    let infos = target
        .urls
        .iter()
        .map(|url| {
            let info = url.as_str().into_connection_info()?;
            let mut settings = info.redis_settings().clone();
            if let Some(password) = &target.password {
                settings = settings.set_password(password);
            }
            Ok(info.set_redis_settings(settings))
        })
        .collect::<redis::RedisResult<Vec<_>>>()?;
    if target.cluster {
        let client = redis::cluster::ClusterClientBuilder::new(infos)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(response)
            .build()?;
        return Ok(Raw::Cluster(client.get_async_connection().await?));
    }
    let client = redis::Client::open(infos.into_iter().next().context("no URL")?)?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(response));
    Ok(Raw::Single(
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await?,
    ))
}

// ---------------------------------------------------------------- both sides behind one face

/// The sending end: an agent's mailbox (to its outbox, addressed to `to`), or a raw XADD.
enum Tx {
    Ours { mailbox: Box<Mailbox>, to: String },
    Raw { conn: Raw, key: String },
}

impl Tx {
    async fn send(&mut self, body: &str) -> anyhow::Result<()> {
        match self {
            Tx::Ours { mailbox, to } => {
                mailbox.send(to, KIND, body).await?;
            }
            Tx::Raw { conn, key } => {
                redis::cmd("XADD")
                    .arg(&*key)
                    .arg("*")
                    .arg("id")
                    .arg(agentry::messaging::new_id())
                    .arg("to")
                    .arg(&*key)
                    .arg("type")
                    .arg(KIND)
                    .arg("body")
                    .arg(body)
                    .exec_async(conn)
                    .await?;
            }
        }
        Ok(())
    }
}

/// The receiving end: an agent's mailbox, or a raw XREADGROUP reader (+ a connection for XACK,
/// as the mailbox has).
enum Rx {
    Ours(Mailbox),
    Raw { reader: Raw, conn: Raw, key: String },
}

impl Rx {
    /// Up to `count` (entry, body), waiting up to `block`.
    async fn recv(
        &mut self,
        count: usize,
        block: Duration,
    ) -> anyhow::Result<Vec<(String, String)>> {
        match self {
            Rx::Ours(mailbox) => mailbox
                .recv(count, block)
                .await?
                .into_iter()
                .map(|m| {
                    ensure!(
                        m.kind == KIND,
                        "unexpected {} message from {}: {}",
                        m.kind,
                        m.from,
                        m.body
                    );
                    Ok((m.entry, m.body))
                })
                .collect(),
            Rx::Raw { reader, key, .. } => {
                let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(CONSUMER)
                    .arg("COUNT")
                    .arg(count)
                    .arg("BLOCK")
                    .arg(block.as_millis().max(1) as u64)
                    .arg("STREAMS")
                    .arg(&*key)
                    .arg(">")
                    .query_async(reader)
                    .await?;
                Ok(reply
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .map(|e| {
                        let body = e
                            .map
                            .get("body")
                            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
                            .unwrap_or_default();
                        (e.id, body)
                    })
                    .collect())
            }
        }
    }

    async fn ack(&mut self, entries: &[String]) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        match self {
            Rx::Ours(mailbox) => {
                let refs: Vec<&str> = entries.iter().map(String::as_str).collect();
                mailbox.ack(&refs).await?;
            }
            Rx::Raw { conn, key, .. } => {
                redis::cmd("XACK")
                    .arg(&*key)
                    .arg(GROUP)
                    .arg(entries)
                    .exec_async(conn)
                    .await?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- round trip

/// `count` round trips, one message at a time; the latencies (ns) after the first `skip`.
async fn roundtrips(
    tx: &mut Tx,
    rx: Rx,
    epoch: Instant,
    skip: usize,
    count: usize,
) -> anyhow::Result<(Rx, Vec<u64>)> {
    let (sink, mut received) = tokio::sync::mpsc::unbounded_channel::<(u64, String)>();
    let stop = CancellationToken::new();
    let receiver = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut rx = rx;
            let result = async {
                while !stop.is_cancelled() {
                    for (entry, body) in rx.recv(1, POLL).await? {
                        let at = now_ns(epoch);
                        rx.ack(std::slice::from_ref(&entry)).await?;
                        // The next message goes out only after this one's ack.
                        let _ = sink.send((at, body));
                    }
                }
                anyhow::Ok(())
            }
            .await;
            (rx, result)
        }
    });
    let mut latencies = Vec::with_capacity(count.saturating_sub(skip));
    let sent = async {
        for i in 0..count {
            let body = i.to_string();
            let start = now_ns(epoch);
            tx.send(&body).await?;
            let got = tokio::time::timeout(LOST_AFTER, received.recv()).await;
            let Ok(Some((at, got))) = got else {
                bail!("message {i} was not received within {LOST_AFTER:?}");
            };
            ensure!(got == body, "received {got:?}, expected {body:?}");
            if i >= skip {
                latencies.push(at - start);
            }
        }
        anyhow::Ok(())
    }
    .await;
    stop.cancel();
    let (rx, received) = receiver.await?;
    received.context("the receiver")?;
    sent?;
    Ok((rx, latencies))
}

/// Percentile `q` of sorted nanoseconds, in microseconds.
fn pct_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64) as usize).min(sorted.len() - 1);
    sorted[i] as f64 / 1000.0
}

struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    n: usize,
}

fn latency(mut ns: Vec<u64>) -> Latency {
    ns.sort_unstable();
    Latency {
        p50: pct_us(&ns, 0.50),
        p99: pct_us(&ns, 0.99),
        p999: pct_us(&ns, 0.999),
        max: ns.last().map_or(f64::NAN, |&x| x as f64 / 1000.0),
        n: ns.len(),
    }
}

// ---------------------------------------------------------------- sustained load

struct Load {
    /// Received inside the measured window.
    delivered: u64,
    window_secs: f64,
    latencies: Vec<u64>,
}

/// Every pair sends for `warmup + secs`, at most `window` messages in flight per pair; counts
/// what receivers get during `secs`. Returns the pairs after every message sent was received.
async fn load(
    pairs: Vec<(Tx, Rx)>,
    epoch: Instant,
    warmup: Duration,
    secs: Duration,
    window: usize,
) -> anyhow::Result<(Vec<(Tx, Rx)>, Load)> {
    let stop = CancellationToken::new();
    let senders_done = Arc::new(AtomicBool::new(false));
    let from = now_ns(epoch) + warmup.as_nanos() as u64;
    let until = from + secs.as_nanos() as u64;
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for (tx, rx) in pairs {
        let credit = Arc::new(Semaphore::new(window));
        let sent = Arc::new(AtomicU64::new(0));
        senders.push(tokio::spawn({
            let (stop, credit, sent) = (stop.clone(), credit.clone(), sent.clone());
            async move {
                let mut tx = tx;
                let result = async {
                    loop {
                        tokio::select! {
                            permit = credit.acquire() => permit?.forget(),
                            _ = stop.cancelled() => break,
                        }
                        tx.send(&now_ns(epoch).to_string()).await?;
                        sent.fetch_add(1, Ordering::Release);
                    }
                    anyhow::Ok(())
                }
                .await;
                (tx, result)
            }
        }));
        receivers.push(tokio::spawn({
            let done = senders_done.clone();
            async move {
                let mut rx = rx;
                let mut latencies = Vec::new();
                let mut received = 0u64;
                let result = async {
                    loop {
                        if done.load(Ordering::Acquire) && received >= sent.load(Ordering::Acquire)
                        {
                            break;
                        }
                        let got = rx.recv(RECV_COUNT, POLL).await?;
                        let at = now_ns(epoch);
                        let mut entries = Vec::with_capacity(got.len());
                        for (entry, body) in got {
                            let start: u64 =
                                body.parse().with_context(|| format!("body {body:?}"))?;
                            received += 1;
                            if (from..until).contains(&at) {
                                latencies.push(at.saturating_sub(start));
                            }
                            entries.push(entry);
                        }
                        rx.ack(&entries).await?;
                        credit.add_permits(entries.len());
                    }
                    anyhow::Ok(())
                }
                .await;
                (rx, latencies, result)
            }
        }));
    }
    tokio::time::sleep(warmup + secs).await;
    stop.cancel();
    let mut txs = Vec::new();
    let mut failed = None;
    for s in senders {
        let (tx, result) = s.await?;
        if let Err(e) = result {
            failed.get_or_insert(e.context("a sender"));
        }
        txs.push(tx);
    }
    senders_done.store(true, Ordering::Release);
    let mut rxs = Vec::new();
    let mut all = Vec::new();
    for r in receivers {
        let (rx, latencies, result) = tokio::time::timeout(LOST_AFTER, r)
            .await
            .context("messages sent were not all received (lost, or stuck in an outbox)")??;
        if let Err(e) = result {
            failed.get_or_insert(e.context("a receiver"));
        }
        all.extend(latencies);
        rxs.push(rx);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    Ok((
        txs.into_iter().zip(rxs).collect(),
        Load {
            delivered: all.len() as u64,
            window_secs: secs.as_secs_f64(),
            latencies: all,
        },
    ))
}

// ---------------------------------------------------------------- one server

fn messaging_spec() -> MessagingSpec {
    MessagingSpec {
        enabled: true,
        max_len: 100_000,
        allow_to: None,
        allow_from: None,
    }
}

struct BenchAgent {
    keys: Keys,
    creds: Credentials,
    peer: Peer,
}

fn bench_agent(server: &Server, ns: &str, name: &str) -> BenchAgent {
    let keys = Keys::of(ns, name, SHARDS);
    let spiffe_id = format!("spiffe://bench.local/ns/{ns}/agent/{name}");
    BenchAgent {
        creds: Credentials {
            endpoint: Endpoint {
                urls: server.admin.urls.clone(),
                cluster: server.admin.cluster,
                user: keys.user.clone(),
                inbox: keys.inbox.clone(),
                outbox: keys.outbox.clone(),
                dead: keys.dead.clone(),
                spiffe_id: spiffe_id.clone(),
            },
            password: acl::new_password(),
        },
        peer: Peer {
            namespace: ns.to_string(),
            name: name.to_string(),
            spiffe_id,
            capabilities: vec![],
            messaging: messaging_spec(),
        },
        keys,
    }
}

fn options() -> Options {
    Options {
        consumer: CONSUMER.into(),
        claim_idle: Duration::from_secs(60),
        max_block: Duration::from_secs(5),
        body_limit: DEFAULT_BODY_LIMIT,
    }
}

async fn mailbox(agent: &BenchAgent) -> anyhow::Result<Mailbox> {
    Mailbox::connect(&agent.creds, options())
        .await
        .with_context(|| format!("connecting as {}", agent.keys.user))
}

/// What one server's run set up, for the cleanup.
#[derive(Default)]
struct Provisioned {
    agents: Vec<BenchAgent>,
    raw_keys: Vec<String>,
}

/// Records everything before creating it, so the cleanup removes it even if this stops half way.
async fn provision(
    admin: &mut Conn,
    server: &Server,
    ns: &str,
    cfg: &Config,
    p: &mut Provisioned,
) -> anyhow::Result<()> {
    let mut names = vec!["lat-a".to_string(), "lat-b".to_string()];
    names.extend((0..cfg.agents).map(|i| format!("load-{i:03}")));
    for name in names {
        p.agents.push(bench_agent(server, ns, &name));
        let agent = p.agents.last().unwrap();
        let hashes = [acl::password_hash(&agent.creds.password)];
        acl::provision(admin, &agent.keys, Some(&hashes))
            .await
            .with_context(|| format!("provisioning {}", agent.keys.user))?;
    }
    for i in 0..=cfg.agents {
        // A hash tag per stream, as inboxes have: spread over a cluster's masters.
        let key = format!("bench:{{{ns}/raw-{i}}}");
        p.raw_keys.push(key.clone());
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .exec_async(admin)
            .await?;
    }
    Ok(())
}

/// Removes everything `provision` recorded, going on past failures; the first one.
async fn cleanup(admin: &mut Conn, p: &Provisioned) -> anyhow::Result<()> {
    let mut first: Option<anyhow::Error> = None;
    let mut note = |r: anyhow::Result<()>| {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    };
    for agent in &p.agents {
        note(
            acl::deprovision(admin, &agent.keys)
                .await
                .with_context(|| format!("removing {}", agent.keys.user)),
        );
    }
    for key in &p.raw_keys {
        note(
            redis::cmd("DEL")
                .arg(key)
                .exec_async(admin)
                .await
                .with_context(|| format!("DEL {key}")),
        );
    }
    // The wake streams stay: a controller on the same Redis uses the same ones (and its relay
    // does not recover from losing their group); only this relay's consumer goes.
    for shard in 0..SHARDS {
        let key = wake_key(shard);
        let removed = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(&key)
            .arg(RELAY_GROUP)
            .arg(CONSUMER)
            .exec_async(admin)
            .await;
        if let Err(e) = removed
            && !is_no_group(&e)
            && !e.to_string().contains("requires the key to exist")
        {
            note(Err(e).with_context(|| format!("removing consumer {CONSUMER} of {key}")));
        }
    }
    first.map_or(Ok(()), Err)
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

async fn run_server(server: &Server, cfg: &Config) -> anyhow::Result<Vec<Row>> {
    let mut admin = reach(server).await;
    let ns = format!("bench-{}", std::process::id());
    eprintln!(
        "{}: {} (namespace {ns})",
        server.label,
        server.admin.urls.join(" ")
    );
    let mut p = Provisioned::default();
    let stop = CancellationToken::new();
    let mut running = None;
    let rows = async {
        provision(&mut admin, server, &ns, cfg, &mut p).await?;
        let pool = Pool::open(&server.admin, 10).await?;
        let directory = Arc::new(StaticDirectory {
            peers: p
                .agents
                .iter()
                .map(|a| (a.peer.reference(), a.peer.clone()))
                .collect(),
            shards: SHARDS,
        });
        let relay = Arc::new(Relay::new(
            server.admin.clone(),
            pool,
            directory,
            Settings {
                shards: SHARDS,
                body_limit: DEFAULT_BODY_LIMIT,
                consumer: CONSUMER.into(),
                relay_id: "spiffe://bench.local/agentry/relay".into(),
                batch: BATCH,
                claim_idle: Duration::from_secs(60),
            },
        ));
        running = Some(tokio::spawn(relay.clone().run(stop.clone())));
        measure(server, cfg, &p, &relay).await
    }
    .await;
    // Whatever happened, the relay stops (so it recreates nothing) and nothing stays behind.
    stop.cancel();
    if let Some(running) = running {
        let _ = running.await;
    }
    let cleaned = cleanup(&mut admin, &p).await;
    match &cleaned {
        Ok(()) => eprintln!(
            "{}: cleanup: removed {} agents and {} raw streams",
            server.label,
            p.agents.len(),
            p.raw_keys.len()
        ),
        Err(e) => eprintln!("{}: cleanup failed: {e:#}", server.label),
    }
    let rows = rows?;
    cleaned?;
    Ok(rows)
}

async fn measure(
    server: &Server,
    cfg: &Config,
    p: &Provisioned,
    relay: &Relay,
) -> anyhow::Result<Vec<Row>> {
    let label = server.label;
    let epoch = Instant::now();
    let blocking = Duration::from_secs(10);
    let mut rows = Vec::new();
    let raw_is = "raw redis-rs on the same server: XADD on one connection, a reader blocked in XREADGROUP on another, XACK";

    if cfg.latency {
        let (a, b) = (&p.agents[0], &p.agents[1]);
        let mut ours_tx = Tx::Ours {
            mailbox: Box::new(mailbox(a).await?),
            to: b.peer.reference(),
        };
        let mut ours_rx = Rx::Ours(mailbox(b).await?);
        let key = p.raw_keys[0].clone();
        let mut raw_tx = Tx::Raw {
            conn: raw_connect(&server.admin, blocking).await?,
            key: key.clone(),
        };
        let mut raw_rx = Rx::Raw {
            reader: raw_connect(&server.admin, blocking).await?,
            conn: raw_connect(&server.admin, blocking).await?,
            key,
        };
        let per_round = cfg.samples.div_ceil(LATENCY_ROUNDS);
        eprintln!(
            "{label}: round trip, {} warm-up then {} samples per side in {LATENCY_ROUNDS} alternating rounds",
            cfg.warmup,
            per_round * LATENCY_ROUNDS
        );
        let (mut ours, mut raw) = (Vec::new(), Vec::new());
        for round in 0..LATENCY_ROUNDS {
            let skip = if round == 0 { cfg.warmup } else { 0 };
            let (rx, mut got) = roundtrips(&mut raw_tx, raw_rx, epoch, skip, skip + per_round)
                .await
                .context("raw round trips")?;
            raw_rx = rx;
            raw.append(&mut got);
            let (rx, mut got) = roundtrips(&mut ours_tx, ours_rx, epoch, skip, skip + per_round)
                .await
                .context("round trips through the relay")?;
            ours_rx = rx;
            ours.append(&mut got);
        }
        let (o, r) = (latency(ours), latency(raw));
        eprintln!(
            "{label}: round trip us: ours p50 {:.0} p99 {:.0} p99.9 {:.0} max {:.0}; raw p50 {:.0} p99 {:.0} p99.9 {:.0} max {:.0}",
            o.p50, o.p99, o.p999, o.max, r.p50, r.p99, r.p999, r.max
        );
        let meets = o.p99 < 1000.0 && o.p99 <= 2.0 * r.p99;
        rows.push(Row {
            name: leak(format!("roundtrip_p50_{label}")),
            ours: o.p50,
            baseline: r.p50,
            unit: "us",
            ratio: o.p50 / r.p50,
            baseline_is: raw_is,
            target: "reported",
            extra: vec![("samples", o.n as f64)],
        });
        rows.push(Row {
            name: leak(format!("roundtrip_p99_{label}")),
            ours: o.p99,
            baseline: r.p99,
            unit: "us",
            ratio: o.p99 / r.p99,
            baseline_is: raw_is,
            target: "<= 2, <1ms",
            extra: vec![
                ("ours_p999_us", o.p999),
                ("baseline_p999_us", r.p999),
                ("ours_max_us", o.max),
                ("baseline_max_us", r.max),
                ("meets_target", if meets { 1.0 } else { 0.0 }),
            ],
        });
    }

    if cfg.throughput {
        let n = cfg.agents;
        let load_agents = &p.agents[2..];
        let mut ours = Vec::new();
        for (i, from) in load_agents.iter().enumerate() {
            let to = &load_agents[(i + 1) % n];
            ours.push((
                Tx::Ours {
                    mailbox: Box::new(mailbox(from).await?),
                    to: to.peer.reference(),
                },
                Rx::Ours(mailbox(to).await?),
            ));
        }
        let mut raw = Vec::new();
        for key in &p.raw_keys[1..] {
            raw.push((
                Tx::Raw {
                    conn: raw_connect(&server.admin, blocking).await?,
                    key: key.clone(),
                },
                Rx::Raw {
                    reader: raw_connect(&server.admin, blocking).await?,
                    conn: raw_connect(&server.admin, blocking).await?,
                    key: key.clone(),
                },
            ));
        }
        let rounds = cfg.rounds.max(1);
        let slice = Duration::from_secs_f64(cfg.secs / rounds as f64);
        let warmup = Duration::from_millis(500);
        eprintln!(
            "{label}: throughput, {n} agents, window {} per sender, {rounds} rounds of {:.1} s per side",
            cfg.window,
            slice.as_secs_f64()
        );
        let (mut o, mut r) = (Vec::new(), Vec::new());
        let (mut o_n, mut r_n, mut o_s, mut r_s) = (0u64, 0u64, 0.0, 0.0);
        let before = relay_counts(relay);
        for _ in 0..rounds {
            let (pairs, got) = load(raw, epoch, warmup, slice, cfg.window)
                .await
                .context("raw load")?;
            raw = pairs;
            eprintln!(
                "  raw:  {:.0} msg/s",
                got.delivered as f64 / got.window_secs
            );
            r_n += got.delivered;
            r_s += got.window_secs;
            r.extend(got.latencies);
            let (pairs, got) = load(ours, epoch, warmup, slice, cfg.window)
                .await
                .context("load through the relay")?;
            ours = pairs;
            eprintln!(
                "  ours: {:.0} msg/s",
                got.delivered as f64 / got.window_secs
            );
            o_n += got.delivered;
            o_s += got.window_secs;
            o.extend(got.latencies);
        }
        let after = relay_counts(relay);
        let (ours_rate, raw_rate) = (o_n as f64 / o_s, r_n as f64 / r_s);
        let (ol, rl) = (latency(o), latency(r));
        rows.push(Row {
            name: leak(format!("throughput_{label}")),
            ours: ours_rate,
            baseline: raw_rate,
            unit: "msg/s",
            ratio: ours_rate / raw_rate,
            baseline_is: "raw redis-rs XADD -> XREADGROUP + XACK on as many streams, same senders, receivers and window",
            target: ">= 10k/s",
            extra: vec![
                ("agents", n as f64),
                ("window", cfg.window as f64),
                ("ours_p50_us", ol.p50),
                ("ours_p99_us", ol.p99),
                ("baseline_p50_us", rl.p50),
                ("baseline_p99_us", rl.p99),
                ("relay_refused", (after.1 - before.1) as f64),
                ("relay_failed", (after.2 - before.2) as f64),
                ("meets_target", if ours_rate >= 10_000.0 { 1.0 } else { 0.0 }),
            ],
        });
    }
    Ok(rows)
}

fn relay_counts(relay: &Relay) -> (u64, u64, u64) {
    let c = &relay.counters;
    (
        c.delivered.load(Ordering::Relaxed),
        c.refused.load(Ordering::Relaxed),
        c.failed.load(Ordering::Relaxed),
    )
}

// ---------------------------------------------------------------- main

fn verdicts(rows: &[Row]) {
    println!("targets (reported, not asserted):");
    let mark = |ok: bool| if ok { "PASS" } else { "FAIL" };
    for r in rows {
        if let Some(deployment) = r.name.strip_prefix("roundtrip_p99_") {
            println!(
                "  {deployment:<10} round trip p99 < 1 ms:          {} ({:.0} us)",
                mark(r.ours < 1000.0),
                r.ours
            );
            println!(
                "  {deployment:<10} round trip p99 <= 2x raw:       {} ({:.2}x: {:.0} us vs {:.0} us)",
                mark(r.ratio <= 2.0),
                r.ratio,
                r.ours,
                r.baseline
            );
        } else if let Some(deployment) = r.name.strip_prefix("throughput_") {
            let agents = r
                .extra
                .iter()
                .find(|(k, _)| *k == "agents")
                .map_or(0.0, |e| e.1);
            println!(
                "  {deployment:<10} >= 10,000 msg/s over {agents:.0} agents: {} ({:.0} msg/s, {:.2}x raw)",
                mark(r.ours >= 10_000.0),
                r.ours,
                r.ratio
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --benches` does not, and must not need Redis.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let only: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let wanted = |group: &str| only.is_empty() || only.iter().any(|a| *a == group);
    let any_of = |groups: &[&str]| groups.iter().any(|g| only.iter().any(|a| *a == g));
    let cfg = Config {
        samples: env_or("AGENTRY_BENCH_MESSAGING_SAMPLES", 5000usize).max(LATENCY_ROUNDS),
        warmup: env_or("AGENTRY_BENCH_MESSAGING_WARMUP", 300usize),
        agents: env_or("AGENTRY_BENCH_MESSAGING_AGENTS", 100usize).max(1),
        window: env_or("AGENTRY_BENCH_MESSAGING_WINDOW", 8usize).max(1),
        secs: env_or("AGENTRY_BENCH_MESSAGING_SECS", 5.0f64).max(0.5),
        rounds: env_or("AGENTRY_BENCH_MESSAGING_ROUNDS", 2usize).max(1),
        latency: !any_of(&["latency", "throughput"]) || wanted("latency"),
        throughput: !any_of(&["latency", "throughput"]) || wanted("throughput"),
    };
    let deployments_named = any_of(&["standalone", "cluster"]);
    let (standalone, cluster) = match servers() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("messaging bench: {e:#}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for server in [&standalone, &cluster] {
        if deployments_named && !wanted(server.label) {
            continue;
        }
        match rt.block_on(run_server(server, &cfg)) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("messaging bench, {}: {e:#}", server.label);
                std::process::exit(1);
            }
        }
    }
    report::write("messaging", &rows);
    verdicts(&rows);
}
