//! Agents as the controller's watch decodes them: straight to what the cache keeps, without
//! managedFields or kubectl's copy of the last applied manifest (nothing here reads either).
//!
//! kube's `DeserializeGuard` (which keeps one undecodable Agent from stopping the watch) first
//! decodes each object into a generic value tree, clones that tree, decodes the Agent from
//! it, and the watch then dropped the managed fields: several thousand short-lived
//! allocations per watch event, between the long-lived ones of the cache. At 10,000 Agents
//! (four or more events each, a few seconds apart) that churn left the allocator holding
//! tens of MiB it could not give back. Here the metadata is decoded field by field, skipping
//! managedFields and that annotation while parsing, and only `spec` and `status` are
//! buffered (as JSON values) so that an Agent that does not match our types is still known
//! by its metadata, as with `DeserializeGuard`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use kube::core::error_boundary::{DeserializeGuard, InvalidObject};
use kube::runtime::watcher;
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::crd::{Agent, AgentSpec, AgentStatus};

/// kubectl's annotation holding the whole manifest it last applied.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// An Agent from the watch: decoded, or (when it does not match our types) its metadata and
/// why, as kube's `DeserializeGuard` holds it.
#[derive(Clone, Debug)]
pub struct Watched(pub DeserializeGuard<Agent>);

impl Watched {
    /// The watch event as the reflector and the controller take it.
    pub fn into_guard(event: watcher::Event<Watched>) -> watcher::Event<DeserializeGuard<Agent>> {
        use watcher::Event;
        match event {
            Event::Apply(w) => Event::Apply(w.0),
            Event::Delete(w) => Event::Delete(w.0),
            Event::Init => Event::Init,
            Event::InitApply(w) => Event::InitApply(w.0),
            Event::InitDone => Event::InitDone,
        }
    }
}

impl Resource for Watched {
    type DynamicType = ();
    type Scope = <Agent as Resource>::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        Agent::kind(&())
    }
    fn group(_: &()) -> Cow<'_, str> {
        Agent::group(&())
    }
    fn version(_: &()) -> Cow<'_, str> {
        Agent::version(&())
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Agent::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

impl<'de> Deserialize<'de> for Watched {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(AgentVisitor)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Metadata,
    Spec,
    Status,
    #[serde(other)]
    Other,
}

struct AgentVisitor;

impl<'de> Visitor<'de> for AgentVisitor {
    type Value = Watched;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an Agent object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Watched, A::Error> {
        let (mut metadata, mut spec, mut status) = (None, None, None);
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Metadata => metadata = Some(map.next_value::<LeanMeta>()?.0),
                Field::Spec => spec = Some(map.next_value::<serde_json::Value>()?),
                Field::Status => status = Some(map.next_value::<serde_json::Value>()?),
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let metadata = metadata.unwrap_or_default();
        let decoded = spec
            .ok_or_else(|| <serde_json::Error as serde::de::Error>::missing_field("spec"))
            .and_then(serde_json::from_value::<AgentSpec>)
            .and_then(|spec| {
                let status =
                    status.map_or(Ok(None), serde_json::from_value::<Option<AgentStatus>>)?;
                Ok((spec, status))
            });
        Ok(Watched(DeserializeGuard(match decoded {
            Ok((spec, status)) => Ok(Agent {
                metadata,
                spec,
                status,
            }),
            Err(e) => Err(InvalidObject {
                error: e.to_string(),
                metadata,
            }),
        })))
    }
}

/// An Agent's metadata without managedFields and the last-applied annotation, neither of
/// which is allocated while parsing.
struct LeanMeta(ObjectMeta);

impl<'de> Deserialize<'de> for LeanMeta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // ObjectMeta's fields but managedFields (unknown fields are skipped unread).
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Fields {
            #[serde(default, deserialize_with = "annotations")]
            annotations: Option<BTreeMap<String, String>>,
            creation_timestamp: Option<Time>,
            deletion_grace_period_seconds: Option<i64>,
            deletion_timestamp: Option<Time>,
            finalizers: Option<Vec<String>>,
            generate_name: Option<String>,
            generation: Option<i64>,
            labels: Option<BTreeMap<String, String>>,
            name: Option<String>,
            namespace: Option<String>,
            owner_references: Option<Vec<OwnerReference>>,
            resource_version: Option<String>,
            self_link: Option<String>,
            uid: Option<String>,
        }
        let f = Option::<Fields>::deserialize(d)?;
        Ok(LeanMeta(f.map_or_else(ObjectMeta::default, |f| {
            ObjectMeta {
                annotations: f.annotations,
                creation_timestamp: f.creation_timestamp,
                deletion_grace_period_seconds: f.deletion_grace_period_seconds,
                deletion_timestamp: f.deletion_timestamp,
                finalizers: f.finalizers,
                generate_name: f.generate_name,
                generation: f.generation,
                labels: f.labels,
                managed_fields: None,
                name: f.name,
                namespace: f.namespace,
                owner_references: f.owner_references,
                resource_version: f.resource_version,
                self_link: f.self_link,
                uid: f.uid,
            }
        })))
    }
}

/// The annotations but [`LAST_APPLIED`], whose value (a whole manifest) is skipped unread.
fn annotations<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    struct Kept(BTreeMap<String, String>);
    impl<'de> Deserialize<'de> for Kept {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Kept;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a map of annotations")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kept, A::Error> {
                    let mut kept = BTreeMap::new();
                    while let Some(key) = map.next_key::<String>()? {
                        if key == LAST_APPLIED {
                            map.next_value::<IgnoredAny>()?;
                        } else {
                            kept.insert(key, map.next_value()?);
                        }
                    }
                    Ok(Kept(kept))
                }
            }
            d.deserialize_map(V)
        }
    }
    Ok(Option::<Kept>::deserialize(d)?.map(|k| k.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn watched(v: serde_json::Value) -> DeserializeGuard<Agent> {
        serde_json::from_value::<Watched>(v).unwrap().0
    }

    fn stored(extra_meta: serde_json::Value) -> serde_json::Value {
        let mut meta = json!({
            "name": "a", "namespace": "ns", "uid": "u", "resourceVersion": "7", "generation": 2,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"team": "x"}, "finalizers": ["agentry.dev/cleanup"],
            "annotations": {"keep": "me", LAST_APPLIED: "{\"huge\": \"manifest\"}"},
            "managedFields": [{"manager": "kubectl", "operation": "Apply",
                "fieldsV1": {"f:spec": {"f:template": {}}}}]
        });
        meta.as_object_mut()
            .unwrap()
            .extend(extra_meta.as_object().unwrap().clone());
        json!({
            "apiVersion": "agentry.dev/v1alpha1", "kind": "Agent",
            "metadata": meta,
            "spec": {"template": {"image": "x:1"}, "capabilities": ["c"]},
            "status": {"phase": "Ready", "observedGeneration": 2}
        })
    }

    /// The same Agent kube's own decoding gives, minus what the cache never keeps.
    #[test]
    fn decodes_what_the_cache_keeps_and_nothing_else() {
        let json = stored(json!({}));
        let ours = watched(json.clone()).0.unwrap();
        let mut theirs: Agent = serde_json::from_value(json).unwrap();
        theirs.metadata.managed_fields = None;
        theirs
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(LAST_APPLIED);
        assert_eq!(
            serde_json::to_value(&ours).unwrap(),
            serde_json::to_value(&theirs).unwrap()
        );
        assert!(ours.metadata.managed_fields.is_none());
        assert_eq!(
            ours.metadata.annotations,
            Some([("keep".to_string(), "me".to_string())].into())
        );
        // No status, null status, null metadata fields: as the derived decoding has them.
        let mut bare = stored(json!({"labels": null, "annotations": null}));
        bare.as_object_mut().unwrap().remove("status");
        let a = watched(bare).0.unwrap();
        assert!(
            a.status.is_none() && a.metadata.labels.is_none() && a.metadata.annotations.is_none()
        );
        let mut null_status = stored(json!({}));
        null_status["status"] = serde_json::Value::Null;
        assert!(watched(null_status).0.unwrap().status.is_none());
    }

    /// An Agent that does not match our types is kept as its metadata and the reason (one
    /// such Agent must not stop the watch); one without metadata at all still decodes.
    #[test]
    fn an_agent_that_does_not_match_is_known_by_its_metadata() {
        let mut odd = stored(json!({}));
        odd["spec"]["template"]["port"] = json!("http");
        let invalid = watched(odd).0.unwrap_err();
        assert_eq!(invalid.metadata.name.as_deref(), Some("a"));
        assert!(invalid.metadata.managed_fields.is_none());
        assert!(invalid.error.contains("invalid type"), "{}", invalid.error);
        let mut no_spec = stored(json!({}));
        no_spec.as_object_mut().unwrap().remove("spec");
        let invalid = watched(no_spec).0.unwrap_err();
        assert!(invalid.error.contains("spec"), "{}", invalid.error);
        let nothing = watched(json!({"spec": {"template": {"image": "x"}}}))
            .0
            .unwrap();
        assert!(nothing.metadata.name.is_none());
        // Not an object at all: an error for the watch to report, not a panic.
        assert!(serde_json::from_value::<Watched>(json!("x")).is_err());
    }

    /// Watch events (the form the apiserver sends them in) decode through it.
    #[test]
    fn decodes_watch_events() {
        let line = serde_json::to_string(&json!({"type": "MODIFIED", "object": stored(json!({}))}))
            .unwrap();
        match serde_json::from_str::<kube::api::WatchEvent<Watched>>(&line).unwrap() {
            kube::api::WatchEvent::Modified(w) => {
                assert_eq!(w.meta().resource_version.as_deref(), Some("7"))
            }
            other => panic!("{other:?}"),
        }
    }
}
