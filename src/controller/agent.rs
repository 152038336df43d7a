//! The Agent reconciler: dereference -> validate -> build -> apply -> status.
//!
//! Every pass ends with one server-side-apply status patch (skipped when nothing changed), so the
//! status always describes the generation it names in `observedGeneration`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::core::{DeserializeGuard, error_boundary::InvalidObject};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{Event, finalizer};
use kube::{Api, Resource, ResourceExt};

use super::conditions::{
    self, BACKUP_HEALTHY, CERTIFICATE_ISSUED, MESSAGING_READY, READY, TOKEN_ISSUED, WORKLOAD_READY,
};
use super::{Context, Error, FINALIZER, MANAGER};
use crate::crd::{Agent, AgentStatus, Phase};
use crate::identity::scopes::{self, ALLOWED_PERMISSIONS_ANNOTATION, PolicyError};
use crate::telemetry::ResultLabels;
use crate::workload::MemoryPlan;

/// The longest we wait between two passes over a healthy Agent (a safety net; renewals requeue
/// at their own exact times).
const RESYNC: Duration = Duration::from_secs(600);

pub async fn reconcile(
    guard: Arc<DeserializeGuard<Agent>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let agent = match &guard.0 {
        Ok(agent) => Arc::new(agent.clone()),
        Err(invalid) => {
            report_undecodable(invalid, &ctx).await;
            return Ok(Action::await_change());
        }
    };
    let key = format!(
        "{}/{}",
        agent.namespace().unwrap_or_default(),
        agent.name_any()
    );
    let ns = agent.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<Agent> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, agent, |event| async {
        match event {
            Event::Apply(agent) => apply(agent, &ctx).await,
            Event::Cleanup(agent) => cleanup(agent, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));

    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let label = ResultLabels {
        result: if result.is_ok() { "ok" } else { "error" },
    };
    ctx.metrics.reconciles.get_or_create(&label).inc();
    if result.is_ok() {
        ctx.clear_backoff(&key);
    }
    result
}

/// Brings the world in line with the Agent's spec.
async fn apply(agent: Arc<Agent>, ctx: &Context) -> Result<Action, Error> {
    let generation = agent.metadata.generation;
    let mut status = agent.status.clone().unwrap_or_default();
    status.observed_generation = generation;

    let spec = match agent.spec.validate() {
        Ok(spec) => spec,
        Err(e) => {
            // The apiserver should have refused this; it was stored before a rule existed, or
            // the CRD is out of date. Say so on the object and wait for an edit.
            let message = format!("{e}; edit the Agent to fix it");
            conditions::upsert(
                &mut status.conditions,
                READY,
                false,
                "InvalidSpec",
                &message,
                generation,
            );
            status.phase = Some(Phase::Failed);
            publish(
                ctx,
                &agent,
                EventType::Warning,
                "InvalidSpec",
                "Validate",
                &message,
            )
            .await;
            write_status(ctx, &agent, status).await?;
            return Ok(Action::await_change());
        }
    };

    // The namespace's permission policy, before anything is issued.
    if let Err(e) = permitted(&agent, ctx) {
        let message = e.to_string();
        conditions::upsert(
            &mut status.conditions,
            READY,
            false,
            "PermissionDenied",
            &message,
            generation,
        );
        status.phase = Some(Phase::Failed);
        publish(
            ctx,
            &agent,
            EventType::Warning,
            "PermissionDenied",
            "Validate",
            &message,
        )
        .await;
        write_status(ctx, &agent, status).await?;
        // A change to the Agent or to its namespace's policy triggers the next pass.
        return Ok(Action::await_change());
    }

    // Identity: certificate + token in the Agent's Secret.
    let outcome = match super::identity::reconcile(&agent, &spec, ctx, &ctx.authority).await {
        Ok(o) => o,
        Err(e) => {
            let (reason, ready_reason) = match &e {
                Error::NameConflict { .. } => ("NameConflict", "NameConflict"),
                _ => ("IssueFailed", "IdentityPending"),
            };
            let message = format!("could not issue the identity: {e}");
            conditions::upsert(
                &mut status.conditions,
                CERTIFICATE_ISSUED,
                false,
                reason,
                &message,
                generation,
            );
            conditions::upsert(
                &mut status.conditions,
                READY,
                false,
                ready_reason,
                &message,
                generation,
            );
            status.phase = Some(if status.identity.is_some() {
                Phase::Degraded
            } else {
                Phase::Provisioning
            });
            // Best effort: the error itself goes to the error policy for a retry with backoff.
            let _ = write_status(ctx, &agent, status).await;
            return Err(e);
        }
    };
    for (type_, reason, note) in &outcome.events {
        publish(ctx, &agent, *type_, reason, "Issue", note).await;
    }
    conditions::upsert(
        &mut status.conditions,
        CERTIFICATE_ISSUED,
        true,
        "Issued",
        format!(
            "certificate {} for {} valid until {}",
            outcome.status.serial, outcome.status.spiffe_id, outcome.status.not_after
        ),
        generation,
    );
    conditions::upsert(
        &mut status.conditions,
        TOKEN_ISSUED,
        true,
        "Issued",
        format!(
            "token with scope [{}] valid until {}",
            agent.spec.scope(),
            outcome.status.token_expires_at.as_deref().unwrap_or("")
        ),
        generation,
    );
    let secret_name = outcome.status.secret_name.clone();
    status.identity = Some(outcome.status);

    // Workload: Deployment/StatefulSet, Service, ServiceAccount, memory capped.
    let plan = MemoryPlan::new(spec.memory_bytes, 0);
    let workload = match super::workload::reconcile(&agent, &spec, &plan, &secret_name, ctx).await {
        Ok(w) => w,
        Err(e) => {
            // Say on the object what failed, then let the error policy retry with backoff.
            let reason = match &e {
                Error::NameConflict { .. } => "NameConflict",
                _ => "ApplyFailed",
            };
            let message = format!("could not apply the workload: {e}");
            conditions::upsert(
                &mut status.conditions,
                WORKLOAD_READY,
                false,
                reason,
                &message,
                generation,
            );
            conditions::upsert(
                &mut status.conditions,
                READY,
                false,
                reason,
                &message,
                generation,
            );
            status.phase = Some(Phase::Degraded);
            publish(ctx, &agent, EventType::Warning, reason, "Apply", &message).await;
            let _ = write_status(ctx, &agent, status).await;
            return Err(e);
        }
    };
    conditions::upsert(
        &mut status.conditions,
        WORKLOAD_READY,
        workload.ready,
        if workload.ready {
            "Available"
        } else {
            "RollingOut"
        },
        &workload.message,
        generation,
    );
    status.assigned_resources = Some(crate::workload::assigned_resources(&spec, &plan));
    status.endpoint = Some(crate::workload::endpoint(&agent));
    // Messaging and backups are accepted in the spec but not carried out by this version: say
    // so on the object instead of pretending. They do not hold Ready back.
    let not_yet = "accepted in the spec, but this version of Agentry does not provide it yet";
    match &agent.spec.messaging {
        Some(m) if m.enabled => conditions::unknown(
            &mut status.conditions,
            MESSAGING_READY,
            "NotImplemented",
            not_yet,
            generation,
        ),
        _ => conditions::remove(&mut status.conditions, MESSAGING_READY),
    }
    match &agent.spec.backup {
        Some(_) => conditions::unknown(
            &mut status.conditions,
            BACKUP_HEALTHY,
            "NotImplemented",
            not_yet,
            generation,
        ),
        None => conditions::remove(&mut status.conditions, BACKUP_HEALTHY),
    }

    let was_ready = conditions::is_true(&status.conditions, READY);
    if workload.ready {
        conditions::upsert(
            &mut status.conditions,
            READY,
            true,
            "Ready",
            "identity issued and workload available",
            generation,
        );
        status.phase = Some(Phase::Ready);
    } else {
        let message = format!("waiting for the workload: {}", workload.message);
        conditions::upsert(
            &mut status.conditions,
            READY,
            false,
            "WorkloadNotReady",
            &message,
            generation,
        );
        // Degraded once it has been Ready; Provisioning on the way up.
        status.phase = Some(if was_ready || status.phase == Some(Phase::Degraded) {
            Phase::Degraded
        } else {
            Phase::Provisioning
        });
    }
    write_status(ctx, &agent, status).await?;
    Ok(Action::requeue(outcome.next_due.min(RESYNC)))
}

/// Checks the Agent's permissions against its namespace's policy (from the watch cache).
fn permitted(agent: &Agent, ctx: &Context) -> Result<(), PolicyError> {
    let ns = agent.namespace().unwrap_or_default();
    let cached = ctx
        .stores
        .namespaces
        .get(&kube::runtime::reflector::ObjectRef::new(&ns));
    let annotation = cached
        .as_ref()
        .and_then(|n| n.metadata.annotations.as_ref())
        .and_then(|a| a.get(ALLOWED_PERMISSIONS_ANNOTATION))
        .map(String::as_str);
    scopes::check(&ns, annotation, &agent.spec.permissions)
}

/// Releases what lives outside Kubernetes; children go with their owner references.
async fn cleanup(agent: Arc<Agent>, ctx: &Context) -> Result<Action, Error> {
    let revoked = super::identity::cleanup(&agent, ctx, &ctx.authority).await?;
    publish(
        ctx,
        &agent,
        EventType::Normal,
        "Deleted",
        "Cleanup",
        &format!("revoked {revoked} certificate(s) and published the CRL; removing the finalizer"),
    )
    .await;
    Ok(Action::await_change())
}

/// Writes `status` with one server-side-apply patch, unless it equals what is stored.
pub(crate) async fn write_status(
    ctx: &Context,
    agent: &Agent,
    status: AgentStatus,
) -> Result<(), Error> {
    if agent.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let ns = agent.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<Agent> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": Agent::api_version(&()),
        "kind": Agent::kind(&()),
        "status": status,
    });
    api.patch_status(
        &agent.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Publishes a Kubernetes Event on the Agent. Events are best effort: a failure is logged, never
/// allowed to fail the reconcile.
pub(crate) async fn publish(
    ctx: &Context,
    agent: &Agent,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note.into()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &agent.object_ref(&())).await {
        tracing::warn!(agent = %agent.name_any(), error = %e, "could not publish event");
    }
}

/// An Agent that does not decode into our types cannot be reconciled, but must not stop the
/// others: warn on the object and wait for it to change.
async fn report_undecodable(invalid: &InvalidObject, ctx: &Context) {
    let meta = &invalid.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let namespace = meta.namespace.clone().unwrap_or_default();
    tracing::warn!(agent = %format!("{namespace}/{name}"), error = %invalid.error, "Agent does not decode; skipping it");
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::telemetry::ErrorLabels {
            kind: "undecodable",
        })
        .inc();
    let reference = ObjectReference {
        api_version: Some(Agent::api_version(&()).into()),
        kind: Some(Agent::kind(&()).into()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    };
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "InvalidObject".into(),
        note: Some(format!(
            "the stored Agent does not match the agentry.dev/v1alpha1 schema ({}); re-apply it with valid fields or delete it",
            invalid.error
        )),
        action: "Decode".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        tracing::warn!(agent = %name, error = %e, "could not publish event");
    }
}
