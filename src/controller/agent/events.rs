//! Events on Agents. Events are best effort: a failure is logged, never allowed to fail the
//! reconcile.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::events::{Event, EventType, Recorder};

use super::report::Note;
use crate::controller::Context;
use crate::crd::Agent;
use crate::keys::reasons;

/// Publishes `note` as an Event on the Agent.
pub async fn publish(ctx: &Context, agent: &Agent, note: &Note) {
    publish_on(&ctx.recorder_for(note.type_), &agent.object_ref(&()), note).await;
}

/// Publishes `note` as an Event on the object `reference` points at.
pub async fn publish_on(recorder: &Recorder, reference: &ObjectReference, note: &Note) {
    let event = Event {
        type_: note.type_,
        reason: note.reason.into(),
        note: Some(note.message.clone()),
        action: note.action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        tracing::warn!(object = ?reference.name, error = %e, "could not publish event");
    }
}

/// A reference to an Agent known only by its metadata (it may not decode).
pub fn reference(meta: &kube::api::ObjectMeta) -> ObjectReference {
    ObjectReference {
        api_version: Some(Agent::api_version(&()).into()),
        kind: Some(Agent::kind(&()).into()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    }
}

/// An Agent that does not decode into our types cannot be reconciled, but must not stop the
/// others: warn on the object and wait for it to change.
pub async fn report_undecodable(invalid: &InvalidObject, ctx: &Context) {
    let meta = &invalid.metadata;
    tracing::warn!(
        agent = %format!("{}/{}", meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref().unwrap_or("")),
        error = %invalid.error,
        "Agent does not decode; skipping it"
    );
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::telemetry::ErrorLabels {
            kind: "undecodable",
        })
        .inc();
    let note = Note {
        type_: EventType::Warning,
        reason: reasons::INVALID_OBJECT,
        action: "Decode",
        message: format!(
            "the stored Agent does not match the agentry.dev/v1alpha1 schema ({}); re-apply it with valid fields or delete it",
            invalid.error
        ),
    };
    publish_on(&ctx.recorder, &reference(meta), &note).await;
}
