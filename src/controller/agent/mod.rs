//! The Agent reconcile as a pipeline: validate -> credentials -> rollout -> inbox -> backups ->
//! status. Each step returns reports (its condition with a typed reason, the Events it wants,
//! when to run again); `status::compute` derives Ready, Reconciling, Stalled and the phase, and
//! one server-side-apply status patch (skipped when nothing changed) ends every pass.

pub mod backups;
pub mod credentials;
pub mod events;
pub mod inbox;
pub mod metadata;
pub mod report;
pub mod rollout;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event, finalizer};
use kube::{Api, Resource, ResourceExt};

use self::report::Report;
use self::status::Facts;
use super::watched::Watched;
use super::{Context, Error};
use crate::crd::Agent;
use crate::keys::{FINALIZER, reasons};
use crate::telemetry::ResultLabels;
use crate::workload::MemoryPlan;

/// How long a pass that found the watch cache behind its own last write waits to run again.
const CACHE_CATCH_UP: std::time::Duration = std::time::Duration::from_millis(500);

pub async fn reconcile(
    guard: Arc<DeserializeGuard<Agent>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let agent = match &guard.0 {
        Ok(agent) => Arc::new(agent.clone()),
        Err(invalid) => {
            events::report_undecodable(invalid, &ctx).await;
            return Ok(Action::await_change());
        }
    };
    let ns = agent.namespace().ok_or(Error::MissingNamespace)?;
    let key = format!("{ns}/{}", agent.name_any());
    if agent.meta().deletion_timestamp.is_none() && namespace_terminating(&ctx, &ns) {
        // The namespace controller is removing the Agent's children and deletes the Agent
        // next; its deletion brings the cleanup. Re-creating what it removes would only be
        // refused ("being terminated") and retried.
        return Ok(Action::await_change());
    }
    let api: Api<Agent> = Api::namespaced(ctx.client.clone(), &ns);
    let lean: Api<Watched> = Api::namespaced(ctx.client.clone(), &ns);
    let result = match metadata::ensure(agent, &lean, &ctx).await {
        // Our finalizer and labels are on it: kube's helper goes straight to the apply (or,
        // for a deleting Agent, the cleanup).
        Ok(Some(agent)) => finalizer(&api, FINALIZER, agent, |event| async {
            match event {
                Event::Apply(agent) => apply(agent, &ctx).await,
                Event::Cleanup(agent) => cleanup(agent, &ctx).await,
            }
        })
        .await
        .or_else(|e| match e {
            // The Agent is already gone: a second cleanup pass (its trigger raced the first
            // pass's finalizer removal) found nothing left to release. Not an error.
            kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s))
                if s.code == 404 =>
            {
                Ok(Action::await_change())
            }
            other => Err(Error::Finalizer(Box::new(other))),
        }),
        Ok(None) => Ok(Action::requeue(CACHE_CATCH_UP)),
        Err(e) => Err(Error::Metadata(e)),
    };
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let result_label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabels {
            result: result_label,
        })
        .inc();
    if result.is_ok() {
        ctx.clear_backoff(&key);
    }
    result
}

/// Whether the Agent's namespace is being deleted (as the namespace cache shows it).
fn namespace_terminating(ctx: &Context, ns: &str) -> bool {
    ctx.stores
        .namespaces
        .get(&kube::runtime::reflector::ObjectRef::new(ns))
        .is_some_and(|n| n.metadata.deletion_timestamp.is_some())
}

/// Brings the world in line with the Agent's spec, one step after the other.
async fn apply(agent: Arc<Agent>, ctx: &Context) -> Result<Action, Error> {
    let mut pass = Pass::new(&agent, ctx);
    let spec = match validate::step(&agent, ctx) {
        Ok(spec) => spec,
        Err(stalled) => return pass.finish(vec![stalled]).await,
    };
    let (credentials, reports) = pass
        .run(credentials::step(&agent, &spec, ctx).await)
        .await?;
    pass.facts.identity = Some(credentials.status);
    pass.reports.extend(reports);
    // The sidecar's share comes out of the pod's memory, never on top of it.
    let sidecar_bytes = match ctx.config.sidecar {
        Some(_) => crate::workload::SIDECAR_MEMORY_BYTES,
        None => 0,
    };
    let plan = MemoryPlan::new(spec.memory_bytes, sidecar_bytes);
    let rollout = rollout::step(&agent, &spec, &plan, &credentials.secret_name, ctx).await;
    let workload = pass.run(rollout).await?;
    pass.facts.assigned_resources = Some(crate::workload::assigned_resources(&spec, &plan));
    pass.facts.endpoint = Some(crate::workload::endpoint(&agent));
    let messaging = inbox::step(&agent, ctx).await;
    pass.facts.messaging = messaging.status;
    let mut last = vec![workload, messaging.report];
    if ctx.config.backup.is_none() {
        last.push(backups::step(&agent));
    }
    pass.finish(last).await
}

/// Releases what lives outside Kubernetes; children go with their owner references.
async fn cleanup(agent: Arc<Agent>, ctx: &Context) -> Result<Action, Error> {
    let released = inbox::cleanup(&agent, ctx)
        .await
        .map_err(|e| Error::Messaging(e.to_string()))?;
    let revoked = credentials::cleanup(&agent, ctx).await?;
    ctx.forget_applied(&agent.namespace().unwrap_or_default(), &agent.name_any());
    if let Some(uid) = agent.uid() {
        ctx.forget_writes(&uid);
    }
    let note = format!(
        "revoked {revoked} certificate(s) and published the CRL{}; removing the finalizer",
        if released {
            ", removed its Redis user and streams"
        } else {
            ""
        }
    );
    let ns = agent.namespace().unwrap_or_default();
    if namespace_terminating(ctx, &ns) {
        // No new Event can be created in a namespace being deleted: the log keeps the trace.
        tracing::info!(agent = %format!("{ns}/{}", agent.name_any()), "{note}");
    } else {
        events::publish(
            ctx,
            &agent,
            &report::Note::normal(reasons::DELETED, "Cleanup", note),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// One pass over an Agent: the reports so far and the facts for the status.
struct Pass<'a> {
    agent: &'a Agent,
    ctx: &'a Context,
    reports: Vec<Report>,
    facts: Facts,
}

impl<'a> Pass<'a> {
    fn new(agent: &'a Agent, ctx: &'a Context) -> Self {
        Self {
            agent,
            ctx,
            reports: Vec::new(),
            facts: Facts::default(),
        }
    }

    /// A step's outcome: its output, or its failure written to its condition (then the error
    /// policy retries with backoff).
    async fn run<T, E: Into<Error>>(&mut self, outcome: Result<T, E>) -> Result<T, Error> {
        let error = match outcome {
            Ok(output) => return Ok(output),
            Err(e) => e.into(),
        };
        if let Some(failed) = error.report() {
            // Best effort: the error itself is what the error policy acts on.
            let _ = self.write(vec![failed]).await;
        }
        Err(error)
    }

    /// The last step: publish the Events, write the status, and say when to come back.
    async fn finish(mut self, last: Vec<Report>) -> Result<Action, Error> {
        let stalled = last.iter().any(|r| r.stalled);
        self.write(last).await?;
        if stalled {
            // A change to the Agent, or to its namespace's policy, triggers the next pass.
            return Ok(Action::await_change());
        }
        let next = self
            .reports
            .iter()
            .filter_map(|r| r.requeue_after)
            .min()
            .unwrap_or(self.ctx.config.resync);
        // The longest between two passes (a safety net; renewals come back at their own times).
        Ok(Action::requeue(next.min(self.ctx.config.resync)))
    }

    async fn write(&mut self, last: Vec<Report>) -> Result<(), Error> {
        self.reports.extend(last);
        for note in self.reports.iter().flat_map(|r| &r.events) {
            events::publish(self.ctx, self.agent, note).await;
        }
        let generation = self.agent.metadata.generation;
        let mut facts = std::mem::take(&mut self.facts);
        facts.agent_card_url = self.ctx.config.api.as_ref().map(|api| {
            format!(
                "{}/a2a/{}/{}/.well-known/agent-card.json",
                api.public_url.trim_end_matches('/'),
                self.agent.namespace().unwrap_or_default(),
                self.agent.name_any()
            )
        });
        let status = status::compute(self.agent.status.as_ref(), generation, &self.reports, facts);
        status::write(self.ctx, self.agent, status).await
    }
}
