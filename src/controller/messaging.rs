//! Messaging in the controller: the admin connection pool, the directory the relay reads
//! (the Agent cache, and which outboxes are provisioned), and the relay itself.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio_util::sync::CancellationToken;

use crate::crd::Agent;
use crate::messaging::conn::{Pool, Target};
use crate::messaging::policy::Peer;
use crate::messaging::relay::{Directory, Relay, Settings};
use crate::messaging::{Endpoint, Keys, shard_of};

/// `agentry controller`'s messaging flags.
#[derive(Clone, Debug)]
pub struct MessagingConfig {
    /// The controller's own (admin) connection.
    pub target: Target,
    /// What agents are told to connect to (no credentials).
    pub agent_urls: Vec<String>,
    pub pool_size: usize,
    pub shards: u16,
    pub body_limit: usize,
}

/// The Agent cache as the relay's directory, plus the outboxes provisioned in this process.
pub struct StoreDirectory {
    agents: Store<DeserializeGuard<Agent>>,
    trust_domain: String,
    shards: u16,
    /// Per shard: `namespace/name` of provisioned Agents.
    provisioned: RwLock<Vec<BTreeSet<String>>>,
}

impl StoreDirectory {
    pub fn new(agents: Store<DeserializeGuard<Agent>>, trust_domain: String, shards: u16) -> Self {
        StoreDirectory {
            agents,
            trust_domain,
            shards: shards.max(1),
            provisioned: RwLock::new(vec![BTreeSet::new(); shards.max(1) as usize]),
        }
    }

    /// Marks an Agent provisioned; true when it was not (its shard must be woken).
    pub fn add(&self, ns: &str, name: &str) -> bool {
        let shard = shard_of(ns, name, self.shards) as usize;
        let mut p = self.provisioned.write().unwrap_or_else(|e| e.into_inner());
        p[shard].insert(format!("{ns}/{name}"))
    }

    pub fn remove(&self, ns: &str, name: &str) -> bool {
        let shard = shard_of(ns, name, self.shards) as usize;
        let mut p = self.provisioned.write().unwrap_or_else(|e| e.into_inner());
        p[shard].remove(&format!("{ns}/{name}"))
    }
}

/// The policy's view of an Agent that has messaging on and is not being deleted.
pub fn peer_of(agent: &Agent, trust_domain: &str) -> Option<Peer> {
    let messaging = agent.spec.messaging.as_ref().filter(|m| m.enabled)?;
    if agent.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ns = agent.namespace()?;
    let name = agent.name_any();
    Some(Peer {
        spiffe_id: crate::identity::ca::spiffe_id(trust_domain, &ns, &name),
        namespace: ns,
        name,
        capabilities: agent.spec.capabilities.clone(),
        messaging: messaging.clone(),
    })
}

impl Directory for StoreDirectory {
    fn peer(&self, namespace: &str, name: &str) -> Option<Peer> {
        let guard = self.agents.get(&ObjectRef::new(name).within(namespace))?;
        let agent = guard.0.as_ref().ok()?;
        peer_of(agent, &self.trust_domain)
    }

    fn outboxes(&self, shard: u16) -> Vec<(String, String)> {
        let p = self.provisioned.read().unwrap_or_else(|e| e.into_inner());
        p.get(shard as usize)
            .into_iter()
            .flatten()
            .filter_map(|owner| {
                let (ns, name) = owner.split_once('/')?;
                Some((owner.clone(), Keys::of(ns, name, self.shards).outbox))
            })
            .collect()
    }
}

/// What the Agent pipeline and the relay share.
pub struct Messaging {
    pub config: MessagingConfig,
    pub pool: Pool,
    pub directory: Arc<StoreDirectory>,
    pub relay: Arc<Relay>,
    pub trust_domain: String,
    /// The password hashes last set or verified per Agent: Redis keeps ACL users in memory, so
    /// after a restart they are put back from here (see [`Messaging::keep`]).
    hashes: std::sync::Mutex<HashMap<String, Vec<String>>>,
}

/// How often the ACL users of listed Agents are put back even without a sign of a restart.
const RESYNC: Duration = Duration::from_secs(60);

impl Messaging {
    /// Opens the pool (lazily on a standalone server; a cluster is asked for its topology now).
    pub async fn start(
        config: MessagingConfig,
        agents: Store<DeserializeGuard<Agent>>,
        trust_domain: &str,
        replica: &str,
        metrics: crate::telemetry::RelayMetrics,
    ) -> redis::RedisResult<Arc<Self>> {
        let pool = Pool::open(&config.target, config.pool_size).await?;
        let directory = Arc::new(StoreDirectory::new(
            agents,
            trust_domain.to_string(),
            config.shards,
        ));
        let relay = Arc::new(
            Relay::new(
                config.target.clone(),
                pool.clone(),
                directory.clone(),
                Settings {
                    shards: config.shards,
                    body_limit: config.body_limit,
                    consumer: replica.to_string(),
                    relay_id: format!("spiffe://{trust_domain}/agentry/relay"),
                    batch: 256,
                    claim_idle: Duration::from_secs(60),
                },
            )
            .with_metrics(metrics),
        );
        Ok(Arc::new(Messaging {
            config,
            pool,
            directory,
            relay,
            trust_domain: trust_domain.to_string(),
            hashes: Default::default(),
        }))
    }

    /// Starts the relay, and the keeper that puts ACL users back after Redis lost them.
    pub fn spawn_relay(self: &Arc<Self>, stop: CancellationToken) {
        tokio::spawn(self.relay.clone().run(stop.clone()));
        tokio::spawn(self.clone().keep(stop));
    }

    /// Remembers the password hashes an Agent's user has now.
    pub fn remember(&self, ns: &str, name: &str, hashes: Vec<String>) {
        let mut h = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        h.insert(format!("{ns}/{name}"), hashes);
    }

    fn forget(&self, ns: &str, name: &str) {
        let mut h = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        h.remove(&format!("{ns}/{name}"));
    }

    /// After the relay reconnects (Redis may have restarted without an ACL file), and every
    /// minute: re-applies every listed Agent's user with the passwords it had, so running agents
    /// are not locked out (and their passwords are not needlessly rotated).
    async fn keep(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.relay.reconnected.notified() => {},
                _ = tokio::time::sleep(RESYNC) => {},
            }
            // Right after a restart some pooled connections still fail once: retry for a while.
            for attempt in 1..=30 {
                match self.restore().await {
                    Ok(restored) => {
                        tracing::debug!(restored, "messaging: ACL users re-applied");
                        break;
                    }
                    Err(e) if attempt == 30 => {
                        tracing::warn!(error = %e, "messaging: restoring ACL users failed; trying again later");
                    }
                    Err(_) => {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {},
                        }
                    }
                }
            }
        }
    }

    async fn restore(&self) -> redis::RedisResult<usize> {
        let users: Vec<(String, Vec<String>)> = {
            let h = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
            h.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        for (agent, hashes) in &users {
            let Some((ns, name)) = agent.split_once('/') else {
                continue;
            };
            let keys = self.keys(ns, name);
            crate::messaging::acl::provision(&mut self.pool.get(), &keys, Some(hashes)).await?;
        }
        Ok(users.len())
    }

    pub fn keys(&self, ns: &str, name: &str) -> Keys {
        Keys::of(ns, name, self.config.shards)
    }

    /// What goes to the agent as `redis.json`.
    pub fn endpoint(&self, ns: &str, name: &str) -> Endpoint {
        let keys = self.keys(ns, name);
        Endpoint {
            urls: self.config.agent_urls.clone(),
            cluster: self.config.target.cluster,
            user: keys.user,
            inbox: keys.inbox,
            outbox: keys.outbox,
            dead: keys.dead,
            spiffe_id: crate::identity::ca::spiffe_id(&self.trust_domain, ns, name),
        }
    }

    /// After an Agent's outbox was provisioned: list it, and wake its shard if it is new.
    pub async fn listed(&self, ns: &str, name: &str) {
        if self.directory.add(ns, name) {
            let shard = shard_of(ns, name, self.config.shards);
            if let Err(e) = self.relay.wake(shard).await {
                tracing::debug!(error = %e, "waking the relay failed; it picks the outbox up within a second");
            }
        }
    }

    /// Before an Agent's outbox is removed.
    pub async fn unlisted(&self, ns: &str, name: &str) {
        self.forget(ns, name);
        if self.directory.remove(ns, name) {
            let _ = self
                .relay
                .wake(shard_of(ns, name, self.config.shards))
                .await;
        }
    }
}
