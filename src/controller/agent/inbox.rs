//! The messaging step: the Agent's Redis ACL user, inbox (with its consumer group) and outbox,
//! listed for the relay; `MessagingReady` and `status.messaging`. The user's password is
//! decided with the credentials (it lives in the identity Secret and rotates with the
//! certificate), see [`password`].

use std::time::Duration;

use kube::ResourceExt;

use super::report::{Level, Report};
use crate::controller::Context;
use crate::crd::{Agent, MessagingStatus};
use crate::keys::{conditions::MESSAGING_READY, reasons};
use crate::messaging::acl;

/// How soon a failed provisioning is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// What the step reports, and the status it leaves (None: leave `status.messaging` as it is;
/// Some(None): clear it).
pub struct Outcome {
    pub report: Report,
    pub status: Option<Option<MessagingStatus>>,
}

fn enabled(agent: &Agent) -> bool {
    agent.spec.messaging.as_ref().is_some_and(|m| m.enabled)
}

pub async fn step(agent: &Agent, ctx: &Context) -> Outcome {
    let (ns, name) = (agent.namespace().unwrap_or_default(), agent.name_any());
    let Some(m) = &ctx.messaging else {
        let level = if enabled(agent) {
            Level::Unknown
        } else {
            Level::Absent
        };
        return Outcome {
            report: Report::optional(
                MESSAGING_READY,
                level,
                reasons::NOT_CONFIGURED,
                "spec.messaging.enabled, but this controller runs without --redis-url: no inbox is provisioned",
            ),
            status: None,
        };
    };
    let keys = m.keys(&ns, &name);
    if !enabled(agent) {
        if agent
            .status
            .as_ref()
            .and_then(|s| s.messaging.as_ref())
            .is_none()
        {
            return Outcome {
                report: Report::optional(MESSAGING_READY, Level::Absent, reasons::INBOX_READY, ""),
                status: None,
            };
        }
        // Turned off: release the user and the streams.
        m.unlisted(&ns, &name).await;
        return match acl::deprovision(&mut m.pool.get(), &keys).await {
            Ok(()) => Outcome {
                report: Report::optional(MESSAGING_READY, Level::Absent, reasons::INBOX_READY, ""),
                status: Some(None),
            },
            Err(e) => Outcome {
                report: Report::optional(
                    MESSAGING_READY,
                    Level::Unknown,
                    reasons::REDIS_UNAVAILABLE,
                    format!("messaging was turned off, but removing the inbox and user {} failed: {e}; retrying", keys.user),
                )
                .requeue_after(RETRY),
                status: None,
            },
        };
    }
    match acl::provision(&mut m.pool.get(), &keys, None).await {
        Ok(()) => {
            m.listed(&ns, &name).await;
            let endpoint = m.config.agent_urls.join(",");
            Outcome {
                report: Report::ok(
                    MESSAGING_READY,
                    reasons::INBOX_READY,
                    format!(
                        "inbox {} (group agent) and outbox {} ready for Redis user {}",
                        keys.inbox, keys.outbox, keys.user
                    ),
                ),
                status: Some(Some(MessagingStatus {
                    inbox: keys.inbox,
                    outbox: keys.outbox,
                    dead_letters: keys.dead,
                    user: keys.user,
                    endpoint,
                })),
            }
        }
        Err(e) => Outcome {
            report: Report::pending(
                MESSAGING_READY,
                reasons::REDIS_UNAVAILABLE,
                format!("provisioning the inbox in Redis failed: {e}; retrying"),
            )
            .requeue_after(RETRY),
            status: None,
        },
    }
}

/// The `redis-password` and `redis.json` the identity Secret holds after this pass, with Redis
/// already accepting the password (so a rotation never locks the running agent out: the
/// previous password stays valid until the next rotation). None: messaging is off here.
///
/// The stored password is tenant-writable, so it is kept only when Redis already holds its
/// hash; anything else is replaced.
pub async fn password(
    agent: &Agent,
    stored: Option<&str>,
    rotate: bool,
    ctx: &Context,
) -> Option<(String, String)> {
    let m = ctx.messaging.as_ref().filter(|_| enabled(agent))?;
    let (ns, name) = (agent.namespace()?, agent.name_any());
    let keys = m.keys(&ns, &name);
    let endpoint = serde_json::to_string(&m.endpoint(&ns, &name)).ok()?;
    let mut conn = m.pool.get();
    let known = match acl::password_hashes(&mut conn, &keys.user).await {
        Ok(known) => known.unwrap_or_default(),
        Err(e) => {
            // Keep what is there; the messaging step reports Redis being unavailable.
            tracing::warn!(user = %keys.user, error = %e, "reading the agent's Redis user failed; keeping its password");
            return stored.map(|p| (p.to_string(), endpoint));
        }
    };
    let valid = stored.filter(|p| known.contains(&acl::password_hash(p)));
    if let Some(p) = valid
        && !rotate
    {
        m.remember(&ns, &name, known);
        return Some((p.to_string(), endpoint));
    }
    let new = acl::new_password();
    let mut hashes = vec![acl::password_hash(&new)];
    hashes.extend(valid.map(acl::password_hash));
    match acl::provision(&mut conn, &keys, Some(&hashes)).await {
        Ok(()) => {
            m.remember(&ns, &name, hashes);
            Some((new, endpoint))
        }
        Err(e) => {
            tracing::warn!(user = %keys.user, error = %e, "setting the agent's Redis password failed; keeping the old one");
            valid.map(|p| (p.to_string(), endpoint))
        }
    }
}

/// On deletion: the user and the streams go with the Agent.
pub async fn cleanup(agent: &Agent, ctx: &Context) -> Result<bool, redis::RedisError> {
    let Some(m) = &ctx.messaging else {
        return Ok(false);
    };
    let (ns, name) = (agent.namespace().unwrap_or_default(), agent.name_any());
    m.unlisted(&ns, &name).await;
    acl::deprovision(&mut m.pool.get(), &m.keys(&ns, &name)).await?;
    Ok(true)
}
