//! A child object as the controller observes it (watch caches, reads, apply answers): what a
//! pass reads of it and nothing else. Decoding skips the rest of the JSON without allocating it
//! (a Deployment's pod template and managedFields are most of it): at 10,000 Agents the watch
//! caches hold 30,000–40,000 children, and each Deployment is decoded at every step of its
//! rollout.

use std::borrow::Cow;
use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::Resource;
use kube::api::ObjectMeta;
use serde::{Deserialize, Deserializer};

/// A child of kind `K` (Deployment, StatefulSet, Service, ServiceAccount), read through the
/// API as `K` and decoded to: its identity, version, owners and deletion (the metadata a pass
/// reads); for workloads, the replicas wanted and the rollout's counts; for Services, the
/// cluster IP (whether the Service is headless).
#[derive(Deserialize)]
pub struct Observed<K> {
    #[serde(default, deserialize_with = "kept_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<Wanted>,
    #[serde(default)]
    status: Option<Counts>,
    #[serde(skip)]
    kind: PhantomData<fn() -> K>,
}

// By hand: derive would require K: Clone and K: Debug, which the marker does not need.
impl<K> Clone for Observed<K> {
    fn clone(&self) -> Self {
        Self {
            metadata: self.metadata.clone(),
            spec: self.spec.clone(),
            status: self.status.clone(),
            kind: PhantomData,
        }
    }
}

impl<K: Resource<DynamicType = ()>> std::fmt::Debug for Observed<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(&K::kind(&()))
            .field("metadata", &self.metadata)
            .field("spec", &self.spec)
            .field("status", &self.status)
            .finish()
    }
}

#[derive(Clone, Debug, Deserialize)]
struct Wanted {
    replicas: Option<i32>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Counts {
    observed_generation: Option<i64>,
    updated_replicas: Option<i32>,
    available_replicas: Option<i32>,
}

/// The metadata fields a pass reads; labels, annotations, timestamps and managedFields are
/// skipped while decoding.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeptMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
    owner_references: Option<Vec<OwnerReference>>,
    deletion_timestamp: Option<Time>,
}

fn kept_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = KeptMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        generation: m.generation,
        owner_references: m.owner_references,
        deletion_timestamp: m.deletion_timestamp,
        ..Default::default()
    })
}

impl<K: Resource<DynamicType = ()>> Observed<K> {
    /// The pods wanted: `spec.replicas`, one when unset (the apps/v1 default).
    fn want(&self) -> i32 {
        self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    }

    /// One of the rollout's counts; nothing observed counts as none.
    fn count(&self, field: fn(&Counts) -> Option<i32>) -> i32 {
        self.status.as_ref().and_then(field).unwrap_or(0)
    }

    /// For a Service: whether it is headless (`clusterIP: None`); `None` before the apiserver
    /// has set a cluster IP or for other kinds.
    pub fn headless(&self) -> Option<bool> {
        let ip = self.spec.as_ref()?.cluster_ip.as_deref()?;
        Some(ip == super::HEADLESS)
    }

    /// Whether the rollout is done: the current generation observed, every wanted pod updated
    /// and available. What the watch trigger asks at every event, without a message.
    pub fn rolled_out(&self) -> bool {
        let observed = self.status.as_ref().and_then(|c| c.observed_generation);
        let want = self.want();
        observed.unwrap_or(0) >= self.metadata.generation.unwrap_or(0)
            && self.count(|c| c.updated_replicas) >= want
            && self.count(|c| c.available_replicas) >= want
    }

    /// [`Self::rolled_out`], and a message saying so. While rolling out, one message that does
    /// not change with each step (the Agent's status is written when its message changes: a
    /// count ticking up would cost a write per step per Agent).
    pub fn rollout(&self) -> (bool, String) {
        let want = self.want();
        if self.rolled_out() {
            let available = self.count(|c| c.available_replicas);
            (true, format!("{available}/{want} pods available"))
        } else {
            let kind = K::kind(&());
            (
                false,
                format!(
                    "rolling out: waiting for the {kind}'s {want} pod(s) to be updated and available"
                ),
            )
        }
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Observed<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        K::kind(&())
    }
    fn group(_: &()) -> Cow<'_, str> {
        K::group(&())
    }
    fn version(_: &()) -> Cow<'_, str> {
        K::version(&())
    }
    fn plural(_: &()) -> Cow<'_, str> {
        K::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;

    fn deployment(v: serde_json::Value) -> Observed<Deployment> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn readiness_follows_the_rollout() {
        let mut d = serde_json::json!({
            "metadata": {"name": "a", "generation": 2},
            "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "x"}]}}},
            "status": {"observedGeneration": 1}
        });
        assert!(!deployment(d.clone()).rollout().0);
        d["status"] = serde_json::json!({"observedGeneration": 2, "updatedReplicas": 1, "availableReplicas": 0});
        let (ready, message) = deployment(d.clone()).rollout();
        assert!(!ready);
        assert!(message.contains("Deployment's 1 pod(s)"), "{message}");
        d["status"]["availableReplicas"] = 1.into();
        assert_eq!(deployment(d).rollout(), (true, "1/1 pods available".into()));
        // No spec.replicas: the API's default of one.
        let d = deployment(serde_json::json!({
            "metadata": {"generation": 1},
            "spec": {},
            "status": {"observedGeneration": 1, "updatedReplicas": 1, "availableReplicas": 1}
        }));
        assert!(d.rollout().0);
    }

    #[test]
    fn tells_a_headless_service_from_one_with_a_cluster_ip() {
        let service = |spec: serde_json::Value| {
            serde_json::from_value::<Observed<Service>>(serde_json::json!({"spec": spec})).unwrap()
        };
        assert_eq!(
            service(serde_json::json!({"clusterIP": "None"})).headless(),
            Some(true)
        );
        assert_eq!(
            service(serde_json::json!({"clusterIP": "10.0.0.7"})).headless(),
            Some(false)
        );
        assert_eq!(service(serde_json::json!({})).headless(), None);
        assert_eq!(deployment(serde_json::json!({"spec": {}})).headless(), None);
    }

    #[test]
    fn keeps_only_what_a_pass_reads() {
        let s: Observed<Service> = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "a", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                "labels": {"x": "y"}, "annotations": {"big": "z"},
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "deletionTimestamp": "2026-01-01T00:00:01Z",
                "managedFields": [{"manager": "m", "fieldsV1": {"f:spec": {}}}],
                "ownerReferences": [{"apiVersion": "agentry.dev/v1alpha1", "kind": "Agent",
                    "name": "a", "uid": "o", "controller": true}]
            },
            "spec": {"ports": [{"port": 80}], "clusterIP": "10.0.0.1"},
            "status": {"loadBalancer": {}}
        }))
        .unwrap();
        let m = s.meta();
        assert_eq!(
            (m.name.as_deref(), m.namespace.as_deref(), m.uid.as_deref()),
            (Some("a"), Some("ns"), Some("u"))
        );
        assert_eq!(m.resource_version.as_deref(), Some("7"));
        assert!(m.deletion_timestamp.is_some());
        assert!(crate::controller::owned_by(m, "o"));
        assert!(m.labels.is_none() && m.annotations.is_none());
        assert!(m.managed_fields.is_none() && m.creation_timestamp.is_none());
        assert_eq!(s.headless(), Some(false));
        assert_eq!(Observed::<Service>::kind(&()), "Service");
        assert_eq!(Observed::<Service>::plural(&()), "services");
    }
}
