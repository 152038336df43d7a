//! Agent-to-agent messaging on Redis Streams (see docs/messaging.md).
//!
//! Every agent has three streams and one Redis ACL user:
//! - `agentry:{<ns>/<name>}:inbox`: what it receives, read through the consumer group `agent`;
//! - `agentry:{<ns>/<name>}:dead`: messages that failed 5 deliveries, with why;
//! - `agentry:{out:<shard>}:<ns>/<name>`: its outbox, the only stream it may write to send.
//!
//! An agent never holds a key permission on another agent's keys: the relay ([`relay`]) reads
//! the outboxes, stamps `from` with the outbox owner's SPIFFE ID, checks the policy ([`policy`])
//! and writes to the receiver's inbox. [`acl`] builds the users, [`client`] is what agents use.

pub mod acl;
pub mod client;
pub mod conn;
pub mod policy;
pub mod relay;

use serde::{Deserialize, Serialize};

/// The inbox's consumer group, created by the controller.
pub const GROUP: &str = "agent";
/// The outboxes' consumer group, read by the relay.
pub const RELAY_GROUP: &str = "relay";
/// Deliveries after which a message goes to the dead-letter stream.
pub const MAX_DELIVERIES: usize = 5;
/// The default body limit (`--message-body-limit`).
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;
/// The default number of outbox shards (`--relay-shards`).
pub const DEFAULT_SHARDS: u16 = 8;
/// The longest a `type` may be.
pub const MAX_TYPE_LEN: usize = 128;
/// The longest a message id may be.
pub const MAX_ID_LEN: usize = 64;
/// The `type` of the notices the relay sends back for messages it could not deliver.
pub const UNDELIVERABLE: &str = "agentry.undeliverable";

/// One agent's Redis names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keys {
    pub inbox: String,
    pub dead: String,
    pub outbox: String,
    pub user: String,
}

impl Keys {
    /// The names for Agent `ns/name` with `shards` outbox shards.
    pub fn of(ns: &str, name: &str, shards: u16) -> Self {
        Keys {
            inbox: format!("agentry:{{{ns}/{name}}}:inbox"),
            dead: format!("agentry:{{{ns}/{name}}}:dead"),
            outbox: format!("agentry:{{out:{}}}:{ns}/{name}", shard_of(ns, name, shards)),
            user: format!("agent:{ns}:{name}"),
        }
    }
}

/// The outbox shard of Agent `ns/name`: stable across processes and versions (BLAKE3).
pub fn shard_of(ns: &str, name: &str, shards: u16) -> u16 {
    let hash = blake3::hash(format!("{ns}/{name}").as_bytes());
    let b = hash.as_bytes();
    u16::from_le_bytes([b[0], b[1]]) % shards.max(1)
}

/// The stream the controller writes to wake a relay shard (new or removed outboxes).
pub fn wake_key(shard: u16) -> String {
    format!("agentry:{{out:{shard}}}:wake")
}

/// A delivered message, as the receiver sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The sender's id for the message (stable across redeliveries: drop duplicates by it).
    pub id: String,
    /// The sender's SPIFFE ID, stamped by the relay from the outbox it came from.
    pub from: String,
    /// `namespace/name` of the receiver.
    pub to: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub body: String,
    /// When the relay accepted it, Unix milliseconds.
    pub ts: i64,
    /// The inbox entry, for `ack`.
    pub entry: String,
    /// How many times it was delivered (1 on first delivery; higher after reclaims).
    pub deliveries: usize,
}

/// Why a message cannot be sent or was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("to: {0:?} is not an Agent reference; use namespace/name, e.g. team-a/summarizer")]
    BadTarget(String),
    #[error(
        "type: must be 1 to {MAX_TYPE_LEN} printable characters, e.g. task.request (got {0} bytes)"
    )]
    BadType(usize),
    #[error("id: must be 1 to {MAX_ID_LEN} characters of [A-Za-z0-9._:-]")]
    BadId,
    #[error(
        "body: {size} bytes is over the {limit}-byte limit; send a reference (e.g. an S3 key) instead, or raise --message-body-limit on the controller"
    )]
    TooLarge { size: usize, limit: usize },
    #[error("body: must be UTF-8 text; base64-encode binary data")]
    NotText,
    #[error("to: Agent {0} does not exist or does not have spec.messaging.enabled")]
    NoSuchAgent(String),
    #[error("policy: {0}")]
    Forbidden(String),
    #[error(
        "to: {0} cannot be reached: there is no such Agent with spec.messaging.enabled, or its spec.messaging.allowFrom or your allowTo does not allow it"
    )]
    Unreachable(String),
    #[error("missing field {0}")]
    Missing(&'static str),
}

/// Splits `namespace/name`, both valid object names.
pub fn parse_target(to: &str) -> Result<(&str, &str), Refusal> {
    match to.split_once('/') {
        Some((ns, name))
            if crate::crd::units::is_object_name(ns) && crate::crd::units::is_object_name(name) =>
        {
            Ok((ns, name))
        }
        _ => Err(Refusal::BadTarget(to.chars().take(300).collect())),
    }
}

/// Checks a message type.
pub fn check_type(kind: &str) -> Result<(), Refusal> {
    if kind.is_empty() || kind.len() > MAX_TYPE_LEN || kind.chars().any(|c| c.is_control()) {
        return Err(Refusal::BadType(kind.len()));
    }
    Ok(())
}

/// Checks a message id.
pub fn check_id(id: &str) -> Result<(), Refusal> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok { Ok(()) } else { Err(Refusal::BadId) }
}

/// Checks a body against the limit.
pub fn check_body(body: &[u8], limit: usize) -> Result<(), Refusal> {
    if body.len() > limit {
        return Err(Refusal::TooLarge {
            size: body.len(),
            limit,
        });
    }
    Ok(())
}

/// One field of a stream entry, as bytes (None: absent or not a string).
pub fn field(entry: &redis::streams::StreamId, name: &str) -> Option<Vec<u8>> {
    entry
        .map
        .get(name)
        .and_then(|v| redis::from_redis_value::<Vec<u8>>(v.clone()).ok())
}

/// A new message id: 128 random bits, hex.
pub fn new_id() -> String {
    let bytes: [u8; 16] = rand::random();
    hex::encode(bytes)
}

/// What an agent needs to reach its mailbox: `redis.json` in the identity Secret (the password
/// is `redis-password`, kept apart so it is the only secret value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Seed URLs (`redis://` or `rediss://`, no credentials).
    pub urls: Vec<String>,
    /// Whether `urls` are Redis Cluster seed nodes.
    #[serde(default)]
    pub cluster: bool,
    pub user: String,
    pub inbox: String,
    pub outbox: String,
    pub dead: String,
    /// The agent's SPIFFE ID (what receivers see as `from`).
    pub spiffe_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_a_hash_tag_per_agent_and_shards_are_stable() {
        let k = Keys::of("team-a", "summarizer", 8);
        assert_eq!(k.inbox, "agentry:{team-a/summarizer}:inbox");
        assert_eq!(k.dead, "agentry:{team-a/summarizer}:dead");
        assert_eq!(k.user, "agent:team-a:summarizer");
        let shard = shard_of("team-a", "summarizer", 8);
        assert!(shard < 8);
        assert_eq!(
            k.outbox,
            format!("agentry:{{out:{shard}}}:team-a/summarizer")
        );
        // Same inputs, same shard; shards spread.
        let spread: std::collections::HashSet<u16> = (0..200)
            .map(|i| shard_of("ns", &format!("a{i}"), 8))
            .collect();
        assert_eq!(spread.len(), 8);
        assert_eq!(shard_of("x", "y", 0), 0);
    }

    #[test]
    fn checks_name_the_field_and_the_fix() {
        assert_eq!(
            parse_target("team-a/summarizer"),
            Ok(("team-a", "summarizer"))
        );
        for bad in ["", "a", "a/", "/b", "A/b", "a/b/c", "a b/c", "a/{b}"] {
            let e = parse_target(bad).unwrap_err();
            assert!(e.to_string().starts_with("to: "), "{bad}: {e}");
        }
        assert!(check_type("task.request").is_ok());
        assert!(check_type("").is_err());
        assert!(check_type("a\nb").is_err());
        assert!(check_type(&"x".repeat(129)).is_err());
        assert!(check_id(&new_id()).is_ok());
        assert!(check_id("a b").is_err());
        assert!(check_id(&"x".repeat(65)).is_err());
        let e = check_body(&[0; 65_537], DEFAULT_BODY_LIMIT).unwrap_err();
        assert_eq!(
            e,
            Refusal::TooLarge {
                size: 65_537,
                limit: 65_536
            }
        );
        assert!(e.to_string().contains("--message-body-limit"));
        assert!(check_body(&[0; 65_536], DEFAULT_BODY_LIMIT).is_ok());
    }
}
