//! The relay: the only writer of inboxes. Outboxes are spread over `shards` hash tags
//! (`agentry:{out:<n>}:<ns>/<name>`) so one blocking XREADGROUP per shard covers all of a shard's
//! outboxes, on a standalone server and on a cluster alike. For each entry the relay checks the
//! fields, the receiver and the policy, stamps `from` (the outbox owner's SPIFFE ID) and `ts`,
//! XADDs it to the receiver's inbox (`MAXLEN ~ spec.messaging.maxLen`), then XACKs and XDELs it
//! from the outbox. Refused messages go back to the sender's inbox as `agentry.undeliverable`.
//!
//! At-least-once: an entry leaves the outbox only after its inbox write succeeded. A relay that
//! dies between the two re-reads its pending entries when it starts again (and entries of a
//! consumer gone for a minute are claimed by the live one), so a message can arrive twice,
//! never zero times; receivers drop duplicates by `id`, which is the same on every copy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, Pool, Target, is_busy_group, is_no_group};
use super::policy::{self, Peer};
use super::{Keys, RELAY_GROUP, Refusal, UNDELIVERABLE, check_body, check_id, check_type};
use super::{parse_target, wake_key};

/// Who the relay can deliver to, and which outboxes it reads.
pub trait Directory: Send + Sync + 'static {
    /// A messaging-enabled Agent, or None.
    fn peer(&self, namespace: &str, name: &str) -> Option<Peer>;
    /// The provisioned outboxes of `shard`, as (`namespace/name`, outbox key).
    fn outboxes(&self, shard: u16) -> Vec<(String, String)>;
}

/// A fixed directory (the bench; tests of the relay without Kubernetes).
#[derive(Default)]
pub struct StaticDirectory {
    pub peers: HashMap<String, Peer>,
    pub shards: u16,
}

impl Directory for StaticDirectory {
    fn peer(&self, namespace: &str, name: &str) -> Option<Peer> {
        self.peers.get(&format!("{namespace}/{name}")).cloned()
    }
    fn outboxes(&self, shard: u16) -> Vec<(String, String)> {
        self.peers
            .values()
            .map(|p| {
                (
                    p.reference(),
                    Keys::of(&p.namespace, &p.name, self.shards).outbox,
                )
            })
            .filter(|(_, key)| key.starts_with(&format!("agentry:{{out:{shard}}}:")))
            .collect()
    }
}

/// How the relay runs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub shards: u16,
    pub body_limit: usize,
    /// This relay's consumer name in the outbox groups (the controller replica).
    pub consumer: String,
    /// `from` on the notices the relay itself sends.
    pub relay_id: String,
    /// Entries read per XREADGROUP.
    pub batch: usize,
    /// Entries pending this long at a consumer that stopped are taken over.
    pub claim_idle: Duration,
}

/// What the relay did, for metrics and tests.
#[derive(Default, Debug)]
pub struct Counters {
    pub delivered: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
}

pub struct Relay {
    target: Target,
    pool: Pool,
    directory: Arc<dyn Directory>,
    settings: Settings,
    pub counters: Counters,
    /// The controller's Prometheus metrics for the relay (None: the bench, tests).
    metrics: Option<crate::telemetry::RelayMetrics>,
    /// Signalled when a shard reconnected after losing Redis (it may have restarted and lost
    /// its ACL users, which live in memory unless Redis has an ACL file).
    pub reconnected: tokio::sync::Notify,
}

/// How long one blocking read waits before the shard re-reads its list of outboxes.
const BLOCK: Duration = Duration::from_secs(1);
/// How often a shard looks for entries stuck at a consumer that stopped.
const CLAIM_EVERY: Duration = Duration::from_secs(30);

/// One message on its way to an inbox.
struct Delivery {
    inbox: String,
    max_len: i64,
    fields: Vec<(&'static str, Vec<u8>)>,
}

impl Relay {
    pub fn new(
        target: Target,
        pool: Pool,
        directory: Arc<dyn Directory>,
        settings: Settings,
    ) -> Self {
        Relay {
            target,
            pool,
            directory,
            settings,
            counters: Counters::default(),
            metrics: None,
            reconnected: tokio::sync::Notify::new(),
        }
    }

    /// Also counts into the controller's metrics.
    pub fn with_metrics(mut self, metrics: crate::telemetry::RelayMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Counts a delivered or refused message, with its lag (`now` minus the outbox entry's
    /// time, from its stream ID `<ms>-<seq>`).
    fn count(&self, result: &'static str, entry: &StreamId, now: i64) {
        let counter = match result {
            "delivered" => &self.counters.delivered,
            _ => &self.counters.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let Some(m) = &self.metrics else { return };
        m.messages
            .get_or_create(&crate::telemetry::ResultLabels { result })
            .inc();
        let written = entry
            .id
            .split('-')
            .next()
            .and_then(|ms| ms.parse::<i64>().ok());
        if let Some(written) = written {
            m.lag.observe((now - written).max(0) as f64 / 1000.0);
        }
    }

    /// Counts a failed Redis operation.
    fn count_error(&self) {
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.errors.inc();
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Wakes the shard's blocked read, so it picks up a changed list of outboxes at once.
    pub async fn wake(&self, shard: u16) -> redis::RedisResult<()> {
        redis::cmd("XADD")
            .arg(wake_key(shard))
            .arg("MAXLEN")
            .arg("~")
            .arg(64)
            .arg("*")
            .arg("w")
            .arg(1)
            .exec_async(&mut self.pool.get())
            .await
    }

    /// Runs one loop per shard until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let loops: Vec<_> = (0..self.settings.shards.max(1))
            .map(|shard| tokio::spawn(self.clone().shard(shard, stop.clone())))
            .collect();
        for l in loops {
            let _ = l.await;
        }
    }

    async fn shard(self: Arc<Self>, shard: u16, stop: CancellationToken) {
        let mut conn: Option<Conn> = None;
        let mut backoff = Duration::from_millis(100);
        // First, what this consumer read but did not finish before it stopped.
        let mut pending_due = Some(Instant::now());
        let mut claim_due = Instant::now();
        let mut lost = false;
        // Outboxes whose pending entries were read back (with id 0) since this loop started.
        // The directory may learn of an outbox after the first read (the Agent cache is still
        // filling when a restarted controller starts relaying): each new one gets its read.
        let mut seen: HashSet<String> = HashSet::new();
        let wake = wake_key(shard);
        while !stop.is_cancelled() {
            let Some(mut c) = self
                .connection(conn.take(), shard, &wake, &mut lost, &mut pending_due)
                .await
            else {
                self.pause(&mut backoff, &stop).await;
                continue;
            };
            let outboxes = self.directory.outboxes(shard);
            self.arm_reads(
                &outboxes,
                &mut seen,
                &mut pending_due,
                &mut claim_due,
                backoff,
            )
            .await;
            let pending = pending_due.is_some_and(|due| Instant::now() >= due);
            let block = match pending_due {
                _ if pending => None,
                Some(due) => Some(due.saturating_duration_since(Instant::now()).min(BLOCK)),
                None => Some(BLOCK),
            };
            let read = tokio::select! {
                r = self.read(&mut c, &wake, &outboxes, pending, block) => r,
                _ = stop.cancelled() => break,
            };
            let reply = match read {
                Ok(reply) => reply,
                Err(e) if is_no_group(&e) => {
                    // A stream lost its group (Redis lost data, or a new key): recreate the
                    // outboxes' here and the wake stream's on reconnecting.
                    tracing::info!(shard, error = %e, "relay: recreating consumer groups");
                    self.ensure_groups(&outboxes).await;
                    self.pause(&mut backoff, &stop).await;
                    continue;
                }
                Err(e) => {
                    lost = true;
                    tracing::warn!(shard, error = %e, "relay: reading the outboxes failed; reconnecting");
                    self.count_error();
                    self.pause(&mut backoff, &stop).await;
                    continue;
                }
            };
            conn = Some(c);
            let streams = reply.map(|r| r.keys).unwrap_or_default();
            let read_any = streams.iter().any(|s| !s.ids.is_empty());
            let all_ok = self.handle(&wake, &outboxes, &streams).await;
            if all_ok {
                backoff = Duration::from_millis(100);
                if pending && !read_any {
                    pending_due = None;
                }
            } else {
                pending_due = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }

    /// The shard's connection: the one kept from the last read, or a new one (None when
    /// connecting failed). After a lost connection, re-reads what was pending.
    async fn connection(
        &self,
        kept: Option<Conn>,
        shard: u16,
        wake: &str,
        lost: &mut bool,
        pending_due: &mut Option<Instant>,
    ) -> Option<Conn> {
        if kept.is_some() {
            return kept;
        }
        match self.open(wake).await {
            Ok(c) => {
                if std::mem::take(lost) {
                    self.reconnected.notify_one();
                    *pending_due = Some(Instant::now());
                }
                Some(c)
            }
            Err(e) => {
                *lost = true;
                tracing::warn!(shard, error = %e, "relay: connecting to Redis failed; retrying");
                None
            }
        }
    }

    /// Before a read: a pending read (id 0) for outboxes the directory did not list before,
    /// and, when due, a take-over of entries stuck at a consumer that stopped.
    async fn arm_reads(
        &self,
        outboxes: &[(String, String)],
        seen: &mut HashSet<String>,
        pending_due: &mut Option<Instant>,
        claim_due: &mut Instant,
        backoff: Duration,
    ) {
        if outboxes.iter().any(|(_, key)| !seen.contains(key)) {
            *seen = outboxes.iter().map(|(_, key)| key.clone()).collect();
            *pending_due = Some(Instant::now());
        }
        if Instant::now() >= *claim_due {
            *claim_due = Instant::now() + CLAIM_EVERY;
            if !self.claim_orphans(outboxes).await {
                pending_due.get_or_insert(Instant::now() + backoff);
            }
        }
    }

    /// Relays what one read returned: the outboxes at once, not one after the other; the wake
    /// entries are only removed. False when some entry must be tried again.
    async fn handle(
        &self,
        wake: &str,
        outboxes: &[(String, String)],
        streams: &[redis::streams::StreamKey],
    ) -> bool {
        let owners: HashMap<&str, &str> = outboxes
            .iter()
            .map(|(owner, key)| (key.as_str(), owner.as_str()))
            .collect();
        let jobs = streams.iter().map(|stream| {
            let owners = &owners;
            async move {
                if stream.key == wake {
                    let ids: Vec<&str> = stream.ids.iter().map(|e| e.id.as_str()).collect();
                    return self.finish(wake, &ids).await;
                }
                let owner = owners.get(stream.key.as_str()).copied();
                self.relay(&stream.key, owner, &stream.ids).await
            }
        });
        futures::future::join_all(jobs)
            .await
            .into_iter()
            .all(|ok| ok)
    }

    async fn pause(&self, backoff: &mut Duration, stop: &CancellationToken) {
        tokio::select! {
            _ = tokio::time::sleep(*backoff) => {},
            _ = stop.cancelled() => {},
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
    }

    async fn open(&self, wake: &str) -> redis::RedisResult<Conn> {
        let mut c = self.target.connect_blocking(BLOCK).await?;
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(wake)
            .arg(RELAY_GROUP)
            .arg("$")
            .arg("MKSTREAM")
            .exec_async(&mut c)
            .await;
        match created {
            Err(e) if !is_busy_group(&e) => Err(e),
            _ => Ok(c),
        }
    }

    async fn read(
        &self,
        c: &mut Conn,
        wake: &str,
        outboxes: &[(String, String)],
        pending: bool,
        block: Option<Duration>,
    ) -> redis::RedisResult<Option<StreamReadReply>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(RELAY_GROUP)
            .arg(&self.settings.consumer)
            .arg("COUNT")
            .arg(self.settings.batch);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(wake);
        for (_, key) in outboxes {
            cmd.arg(key);
        }
        let id = if pending { "0" } else { ">" };
        for _ in 0..=outboxes.len() {
            cmd.arg(id);
        }
        cmd.query_async(c).await
    }

    /// Recreates the relay's group on outboxes that lost it.
    async fn ensure_groups(&self, outboxes: &[(String, String)]) {
        for (_, key) in outboxes {
            let created = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(key)
                .arg(RELAY_GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .exec_async(&mut self.pool.get())
                .await;
            if let Err(e) = created
                && !is_busy_group(&e)
            {
                tracing::warn!(outbox = %key, error = %e, "relay: creating the outbox group failed");
            }
        }
    }

    /// Takes over entries another relay consumer read and never finished (it stopped).
    async fn claim_orphans(&self, outboxes: &[(String, String)]) -> bool {
        let mut ok = true;
        for (owner, key) in outboxes {
            let claimed: redis::RedisResult<StreamAutoClaimReply> = redis::cmd("XAUTOCLAIM")
                .arg(key)
                .arg(RELAY_GROUP)
                .arg(&self.settings.consumer)
                .arg(self.settings.claim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(self.settings.batch)
                .query_async(&mut self.pool.get())
                .await;
            match claimed {
                Ok(reply) if !reply.claimed.is_empty() => {
                    tracing::info!(outbox = %key, entries = reply.claimed.len(), "relay: took over entries of a stopped relay");
                    ok &= self.relay(key, Some(owner), &reply.claimed).await;
                }
                Ok(_) => {}
                Err(e) if is_no_group(&e) => {}
                Err(e) => {
                    tracing::warn!(outbox = %key, error = %e, "relay: claiming stuck entries failed");
                    ok = false;
                }
            }
        }
        ok
    }

    /// Delivers (or refuses) the entries of one outbox, then removes the ones that are done.
    /// False when some must be tried again.
    async fn relay(&self, outbox: &str, owner: Option<&str>, entries: &[StreamId]) -> bool {
        if entries.is_empty() {
            return true;
        }
        let sender = owner
            .and_then(|o| o.split_once('/'))
            .and_then(|(ns, name)| self.directory.peer(ns, name));
        let Some(sender) = sender else {
            // The owner is gone (or turned messaging off) since it wrote: nobody to send as.
            tracing::info!(
                outbox,
                entries = entries.len(),
                "relay: dropping entries of an outbox whose Agent is gone"
            );
            let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            return self.finish(outbox, &ids).await;
        };
        let now = jiff::Timestamp::now().as_millisecond();
        // Grouped by inbox, in outbox order: one pipeline per inbox keeps each sender's
        // messages in order (an inbox's keys share a slot, so this works on a cluster too).
        let mut by_inbox: BTreeMap<String, (i64, Vec<(usize, Delivery)>)> = BTreeMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let delivery = match self.decide(&sender, entry, now) {
                Ok(d) => {
                    self.count("delivered", entry, now);
                    d
                }
                Err((refusal, id, to)) => {
                    self.count("refused", entry, now);
                    tracing::debug!(from = %sender.reference(), %to, error = %refusal, "relay: refused a message");
                    self.undeliverable(&sender, &id, &to, &refusal, now)
                }
            };
            by_inbox
                .entry(delivery.inbox.clone())
                .or_insert((delivery.max_len, Vec::new()))
                .1
                .push((i, delivery));
        }
        let writes = by_inbox.into_values().map(|(_, group)| async move {
            let mut pipe = redis::pipe();
            for (_, d) in &group {
                let cmd = pipe.cmd("XADD").arg(&d.inbox).arg("MAXLEN").arg("~");
                cmd.arg(d.max_len).arg("*");
                for (field, value) in &d.fields {
                    cmd.arg(*field).arg(value.as_slice());
                }
            }
            let written: redis::RedisResult<()> = pipe.exec_async(&mut self.pool.get()).await;
            match written {
                Ok(()) => group.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
                Err(e) => {
                    tracing::warn!(inbox = %group[0].1.inbox, error = %e, "relay: writing to an inbox failed; will retry");
                    self.count_error();
                    Vec::new()
                }
            }
        });
        let done: Vec<usize> = futures::future::join_all(writes)
            .await
            .into_iter()
            .flatten()
            .collect();
        let ids: Vec<&str> = done.iter().map(|i| entries[*i].id.as_str()).collect();
        let finished = self.finish(outbox, &ids).await;
        finished && done.len() == entries.len()
    }

    /// XACK + XDEL of finished entries (one slot: one pipeline).
    async fn finish(&self, stream: &str, ids: &[&str]) -> bool {
        if ids.is_empty() {
            return true;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(stream).arg(RELAY_GROUP).arg(ids);
        pipe.cmd("XDEL").arg(stream).arg(ids);
        match pipe.exec_async(&mut self.pool.get()).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%stream, error = %e, "relay: acknowledging entries failed; they will be delivered again");
                false
            }
        }
    }

    /// Checks one outbox entry; the delivery, or why not (with the id and target to report).
    fn decide(
        &self,
        sender: &Peer,
        entry: &StreamId,
        now: i64,
    ) -> Result<Delivery, (Refusal, String, String)> {
        let field = |name: &str| super::field(entry, name);
        let text = |name: &str| field(name).map(|b| String::from_utf8_lossy(&b).into_owned());
        let id = text("id")
            .filter(|id| check_id(id).is_ok())
            .unwrap_or_else(|| entry.id.clone());
        let to = text("to").unwrap_or_default();
        let refuse = |r: Refusal| (r, id.clone(), to.clone());
        if field("to").is_none() {
            return Err(refuse(Refusal::Missing("to")));
        }
        let (ns, name) = parse_target(&to).map_err(refuse)?;
        let kind = text("type").ok_or_else(|| refuse(Refusal::Missing("type")))?;
        check_type(&kind).map_err(refuse)?;
        let body = field("body").unwrap_or_default();
        check_body(&body, self.settings.body_limit).map_err(refuse)?;
        if std::str::from_utf8(&body).is_err() {
            return Err(refuse(Refusal::NotText));
        }
        // Across namespaces, one answer for "no such Agent" and "not allowed": a sender learns
        // nothing about namespaces it may not talk to.
        let foreign = ns != sender.namespace;
        let receiver = self.directory.peer(ns, name).ok_or_else(|| {
            refuse(match foreign {
                true => Refusal::Unreachable(to.clone()),
                false => Refusal::NoSuchAgent(to.clone()),
            })
        })?;
        policy::check(sender, &receiver).map_err(|why| {
            refuse(match foreign {
                true => Refusal::Unreachable(to.clone()),
                false => Refusal::Forbidden(why),
            })
        })?;
        Ok(Delivery {
            inbox: Keys::of(ns, name, self.settings.shards).inbox,
            max_len: receiver.messaging.max_len,
            fields: vec![
                ("id", id.into_bytes()),
                ("from", sender.spiffe_id.clone().into_bytes()),
                ("to", to.into_bytes()),
                ("type", kind.into_bytes()),
                ("body", body),
                ("ts", now.to_string().into_bytes()),
            ],
        })
    }

    /// The notice to the sender's inbox for a message that was refused.
    fn undeliverable(
        &self,
        sender: &Peer,
        id: &str,
        to: &str,
        refusal: &Refusal,
        now: i64,
    ) -> Delivery {
        let body = serde_json::json!({ "id": id, "to": to, "error": refusal.to_string() });
        Delivery {
            inbox: Keys::of(&sender.namespace, &sender.name, self.settings.shards).inbox,
            max_len: sender.messaging.max_len,
            fields: vec![
                ("id", format!("{id}.undeliverable").into_bytes()),
                ("from", self.settings.relay_id.clone().into_bytes()),
                ("to", sender.reference().into_bytes()),
                ("type", UNDELIVERABLE.as_bytes().to_vec()),
                ("body", body.to_string().into_bytes()),
                ("ts", now.to_string().into_bytes()),
            ],
        }
    }
}
