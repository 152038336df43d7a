//! The Redis ACL user of each agent, and the streams the controller creates for it.
//!
//! Redis key permissions are coarse (XREADGROUP creates consumers with read access alone, XADD
//! can trim with MAXLEN, XCLAIM returns bodies to a writer), so an agent holds no permission at
//! all on another agent's keys, and on its own keys only what its role needs, split with ACL
//! selectors (Redis 7):
//! - on its inbox: read and acknowledge (XREADGROUP, XACK, XAUTOCLAIM, XCLAIM, XPENDING, XRANGE,
//!   XLEN, XINFO), never XADD: only the relay writes there, so `from` is trustworthy;
//! - on its outbox and its dead-letter stream: XADD, XRANGE, XLEN, XINFO STREAM;
//! - no other key, no Pub/Sub channel, no other command (no DEL, XTRIM, XGROUP, XDEL, SCRIPT,
//!   FUNCTION, KEYS, SCAN, CONFIG, ACL, ...).

use redis::aio::ConnectionLike;
use sha2::{Digest, Sha256};

use super::conn::is_busy_group;
use super::{GROUP, Keys, RELAY_GROUP};

/// Commands any agent may run, on no key: connection housekeeping and cluster topology.
const ROOT_COMMANDS: &[&str] = &[
    "+ping",
    "+hello",
    "+auth",
    "+client|setname",
    "+client|getname",
    "+client|id",
    "+readonly",
    "+readwrite",
    "+asking",
    "+cluster|slots",
    "+cluster|shards",
    "+cluster|nodes",
];

/// What an agent may do to its inbox.
const INBOX_COMMANDS: &str = "+xreadgroup +xack +xautoclaim +xclaim +xpending +xlen +xrange +xrevrange +xinfo|stream +xinfo|groups +xinfo|consumers";

/// What an agent may do to its outbox and its dead-letter stream.
const WRITE_COMMANDS: &str = "+xadd +xlen +xrange +xrevrange +xinfo|stream";

/// The password hash Redis stores (`#<sha256 hex>`), without the `#`.
pub fn password_hash(password: &str) -> String {
    hex::encode(Sha256::digest(password.as_bytes()))
}

/// A new password: 256 random bits, URL-safe base64.
pub fn new_password() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The permissions of `keys.user`, as `ACL SETUSER` arguments after the user name. Passwords
/// are untouched unless `passwords` is Some (then exactly those hashes are valid).
pub fn rules(keys: &Keys, passwords: Option<&[String]>) -> Vec<String> {
    let mut rules: Vec<String> = vec!["on".into()];
    if let Some(hashes) = passwords {
        rules.push("resetpass".into());
        rules.extend(hashes.iter().map(|h| format!("#{h}")));
    }
    rules.extend(["resetkeys", "resetchannels", "clearselectors", "nocommands"].map(String::from));
    rules.extend(ROOT_COMMANDS.iter().map(|c| c.to_string()));
    rules.push(format!("({INBOX_COMMANDS} ~{})", keys.inbox));
    rules.push(format!(
        "({WRITE_COMMANDS} ~{} ~{})",
        keys.outbox, keys.dead
    ));
    rules
}

/// The password hashes Redis holds for `user` (None: no such user).
pub async fn password_hashes<C: ConnectionLike>(
    conn: &mut C,
    user: &str,
) -> redis::RedisResult<Option<Vec<String>>> {
    let reply: redis::Value = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(user)
        .query_async(conn)
        .await?;
    let fields: Vec<(String, redis::Value)> = match reply {
        redis::Value::Nil => return Ok(None),
        redis::Value::Map(m) => m
            .into_iter()
            .filter_map(|(k, v)| redis::from_redis_value::<String>(k).ok().map(|k| (k, v)))
            .collect(),
        other => {
            let flat: Vec<redis::Value> = redis::from_redis_value(other)?;
            flat.chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => redis::from_redis_value::<String>(k.clone())
                        .ok()
                        .map(|k| (k, v.clone())),
                    _ => None,
                })
                .collect()
        }
    };
    let hashes = fields
        .into_iter()
        .find(|(k, _)| k == "passwords")
        .map(|(_, v)| redis::from_redis_value::<Vec<String>>(v))
        .transpose()?
        .unwrap_or_default();
    Ok(Some(hashes))
}

/// Creates or updates the user (on every node of a cluster) and the streams: the inbox with
/// its consumer group, the outbox with the relay's. Idempotent.
pub async fn provision<C: ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    passwords: Option<&[String]>,
) -> redis::RedisResult<()> {
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&keys.user)
        .arg(rules(keys, passwords))
        .exec_async(conn)
        .await?;
    for (key, group) in [(&keys.inbox, GROUP), (&keys.outbox, RELAY_GROUP)] {
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .exec_async(conn)
            .await;
        match created {
            Err(e) if !is_busy_group(&e) => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Removes the user (on every node) and the agent's streams.
pub async fn deprovision<C: ConnectionLike>(conn: &mut C, keys: &Keys) -> redis::RedisResult<()> {
    redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&keys.user)
        .exec_async(conn)
        .await?;
    // One key per DEL: the three live in different cluster slots.
    for key in [&keys.inbox, &keys.dead, &keys.outbox] {
        redis::cmd("DEL").arg(key).exec_async(conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_give_exact_keys_and_no_write_on_the_inbox() {
        let keys = Keys::of("team-a", "summarizer", 8);
        let r = rules(&keys, Some(&["ab".into()]));
        assert_eq!(&r[..3], ["on", "resetpass", "#ab"]);
        let inbox = r.iter().find(|s| s.contains(&keys.inbox)).unwrap();
        assert!(inbox.starts_with('(') && !inbox.contains("+xadd"));
        assert!(!inbox.contains('*'), "no key glob");
        let write = r.iter().find(|s| s.contains(&keys.outbox)).unwrap();
        assert!(write.contains("+xadd") && write.contains(&keys.dead));
        for forbidden in [
            "+xtrim",
            "+del",
            "+xdel",
            "+xgroup",
            "+@",
            "allkeys",
            "allchannels",
        ] {
            assert!(r.iter().all(|s| !s.contains(forbidden)), "{forbidden}");
        }
        // Without passwords, the rules leave them alone.
        assert!(!rules(&keys, None).iter().any(|s| s == "resetpass"));
    }

    #[test]
    fn password_hash_is_redis_sha256() {
        assert_eq!(
            password_hash("pw"),
            "30c952fab122c3f9759f02a6d95c3758b246b4fee239957b2d4fee46e26170c4"
        );
        let p = new_password();
        assert_eq!(p.len(), 43);
        assert_ne!(p, new_password());
    }
}
