//! What an agent uses, with its own Redis credentials: send (XADD to its outbox), receive
//! (XREADGROUP on its inbox, group `agent`), acknowledge (XACK), take over messages a stopped
//! consumer left (XAUTOCLAIM after `claim_idle`), and move a message that was delivered
//! [`MAX_DELIVERIES`] times without an ack to its dead-letter stream, with why.

use std::path::Path;
use std::time::{Duration, Instant};

use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};

use super::conn::{Conn, Target};
use super::{Endpoint, GROUP, MAX_DELIVERIES, Message, Refusal, check_body, check_type, new_id};

/// Why a mailbox call failed.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Credentials(String),
}

/// An agent's messaging credentials, as files in its identity directory (`redis.json` and
/// `redis-password` of the identity Secret).
#[derive(Clone)]
pub struct Credentials {
    pub endpoint: Endpoint,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn from_dir(dir: &Path) -> Result<Self, MailboxError> {
        let read = |file: &str| {
            std::fs::read_to_string(dir.join(file)).map_err(|e| {
                MailboxError::Credentials(format!(
                    "reading {}: {e} (is spec.messaging.enabled on the Agent, and is this its identity directory?)",
                    dir.join(file).display()
                ))
            })
        };
        let endpoint: Endpoint = serde_json::from_str(&read("redis.json")?).map_err(|e| {
            MailboxError::Credentials(format!("{}: {e}", dir.join("redis.json").display()))
        })?;
        Ok(Credentials {
            endpoint,
            password: read("redis-password")?.trim().to_string(),
        })
    }

    fn target(&self) -> Target {
        Target {
            urls: self.endpoint.urls.clone(),
            cluster: self.endpoint.cluster,
            username: Some(self.endpoint.user.clone()),
            password: Some(self.password.clone()),
        }
    }
}

/// How a mailbox behaves.
#[derive(Clone, Debug)]
pub struct Options {
    /// This reader's consumer name in the inbox group (e.g. the pod name).
    pub consumer: String,
    /// A message read but not acknowledged for this long is taken over by the next reader.
    pub claim_idle: Duration,
    /// The longest one receive blocks.
    pub max_block: Duration,
    pub body_limit: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            consumer: "default".into(),
            claim_idle: Duration::from_secs(30),
            max_block: Duration::from_secs(5),
            body_limit: super::DEFAULT_BODY_LIMIT,
        }
    }
}

/// One agent's inbox and outbox.
pub struct Mailbox {
    endpoint: Endpoint,
    options: Options,
    conn: Conn,
    reader: Conn,
    next_claim: Instant,
}

impl Mailbox {
    pub async fn connect(creds: &Credentials, options: Options) -> Result<Self, MailboxError> {
        let target = creds.target();
        Ok(Mailbox {
            conn: target.connect().await?,
            reader: target.connect_blocking(options.max_block).await?,
            endpoint: creds.endpoint.clone(),
            options,
            next_claim: Instant::now(),
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends `body` to `to` (`namespace/name`); the message id. Refused here, before anything
    /// is written, when the target, type or body is malformed or the body is over the limit.
    /// The relay refuses the rest (unknown target, policy) with a notice in this inbox.
    pub async fn send(&mut self, to: &str, kind: &str, body: &str) -> Result<String, MailboxError> {
        super::parse_target(to)?;
        check_type(kind)?;
        check_body(body.as_bytes(), self.options.body_limit)?;
        let id = new_id();
        redis::cmd("XADD")
            .arg(&self.endpoint.outbox)
            .arg("*")
            .arg("id")
            .arg(&id)
            .arg("to")
            .arg(to)
            .arg("type")
            .arg(kind)
            .arg("body")
            .arg(body)
            .exec_async(&mut self.conn)
            .await?;
        Ok(id)
    }

    /// Up to `count` messages: first those another consumer left unacknowledged for
    /// `claim_idle` (when a check is due), then new ones, waiting up to `block` for them.
    pub async fn recv(
        &mut self,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Message>, MailboxError> {
        if Instant::now() >= self.next_claim {
            self.next_claim = Instant::now() + self.options.claim_idle / 2;
            let claimed = self.reclaim(count).await?;
            if !claimed.is_empty() {
                return Ok(claimed);
            }
        }
        let block = block
            .min(self.options.max_block)
            .min(self.next_claim.saturating_duration_since(Instant::now()));
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.options.consumer)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.endpoint.inbox)
            .arg(">")
            .query_async(&mut self.reader)
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|e| parse(&e, 1))
            .collect())
    }

    /// Acknowledges messages (by their inbox entry): they will not be delivered again.
    pub async fn ack(&mut self, entries: &[&str]) -> Result<(), MailboxError> {
        if entries.is_empty() {
            return Ok(());
        }
        redis::cmd("XACK")
            .arg(&self.endpoint.inbox)
            .arg(GROUP)
            .arg(entries)
            .exec_async(&mut self.conn)
            .await?;
        Ok(())
    }

    /// Dead-letters what was delivered too often, then takes over what stopped consumers left.
    pub async fn reclaim(&mut self, count: usize) -> Result<Vec<Message>, MailboxError> {
        let idle = self.options.claim_idle.as_millis() as u64;
        let stuck: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.endpoint.inbox)
            .arg(GROUP)
            .arg("IDLE")
            .arg(idle)
            .arg("-")
            .arg("+")
            .arg(count.max(1))
            .query_async(&mut self.conn)
            .await?;
        let mut deliveries = std::collections::HashMap::new();
        for p in &stuck.ids {
            if p.times_delivered >= MAX_DELIVERIES {
                self.dead_letter(&p.id, p.times_delivered, &p.consumer)
                    .await?;
            } else {
                deliveries.insert(p.id.clone(), p.times_delivered + 1);
            }
        }
        let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.endpoint.inbox)
            .arg(GROUP)
            .arg(&self.options.consumer)
            .arg(idle)
            .arg("0-0")
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut self.conn)
            .await?;
        Ok(claimed
            .claimed
            .iter()
            .map(|e| parse(e, deliveries.get(&e.id).copied().unwrap_or(2)))
            .collect())
    }

    /// Moves one pending entry to the dead-letter stream (with why), then acknowledges it.
    async fn dead_letter(
        &mut self,
        entry: &str,
        delivered: usize,
        consumer: &str,
    ) -> Result<(), MailboxError> {
        let found: Vec<StreamId> = redis::cmd("XRANGE")
            .arg(&self.endpoint.inbox)
            .arg(entry)
            .arg(entry)
            .query_async::<redis::streams::StreamRangeReply>(&mut self.conn)
            .await?
            .ids;
        if let Some(e) = found.first() {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&self.endpoint.dead).arg("*");
            for field in ["id", "from", "to", "type", "body", "ts"] {
                cmd.arg(field).arg(text(e, field));
            }
            let why = format!(
                "delivered {delivered} times without an acknowledgement (last to consumer {consumer})"
            );
            cmd.arg("entry")
                .arg(entry)
                .arg("deliveries")
                .arg(delivered)
                .arg("reason")
                .arg(why);
            cmd.exec_async(&mut self.conn).await?;
        }
        // Trimmed away already (MAXLEN): nothing to keep, only the pending entry to clear.
        self.ack(&[entry]).await
    }

    /// The dead-letter stream, oldest first.
    pub async fn dead_letters(
        &mut self,
        count: usize,
    ) -> Result<Vec<(Message, String)>, MailboxError> {
        let range: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.endpoint.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut self.conn)
            .await?;
        Ok(range
            .ids
            .iter()
            .map(|e| {
                let deliveries = text(e, "deliveries").parse().unwrap_or(0);
                (parse(e, deliveries), text(e, "reason"))
            })
            .collect())
    }
}

fn text(e: &StreamId, field: &str) -> String {
    super::field(e, field)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// An inbox entry as a message (the relay wrote every field).
fn parse(e: &StreamId, deliveries: usize) -> Message {
    Message {
        id: text(e, "id"),
        from: text(e, "from"),
        to: text(e, "to"),
        kind: text(e, "type"),
        body: text(e, "body"),
        ts: text(e, "ts").parse().unwrap_or(0),
        entry: e.id.clone(),
        deliveries,
    }
}
