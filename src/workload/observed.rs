//! A child object as the controller observes it (watch events, reads, apply answers): what a
//! pass reads of it and nothing else. Decoding skips the rest of the JSON without allocating it
//! (a Deployment's pod template and managedFields are most of it), and the watch caches keep
//! less still: [`Live`], a few dozen bytes per child. At 10,000 Agents the caches hold
//! 30,000–40,000 children, and each Deployment is decoded at every step of its rollout.

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

impl<K> Observed<K> {
    /// What the watch caches keep of it.
    pub fn live(&self) -> Live {
        let m = &self.metadata;
        let controller = m
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true));
        let spec = self.spec.as_ref();
        let status = self.status.as_ref();
        Live {
            controller: controller.and_then(|o| canonical_uuid(&o.uid)),
            generation: m.generation,
            resource_version: crate::controller::Applied::version(m.resource_version.as_deref()),
            headless: spec
                .and_then(|s| s.cluster_ip.as_deref())
                .map(|ip| ip == super::HEADLESS),
            want: spec.and_then(|s| s.replicas).unwrap_or(1),
            observed_generation: status.and_then(|c| c.observed_generation).unwrap_or(0),
            updated: status.and_then(|c| c.updated_replicas).unwrap_or(0),
            available: status.and_then(|c| c.available_replicas).unwrap_or(0),
        }
    }
}

/// `uid` as a UUID if it is one in the form the apiserver writes (lowercase, hyphenated), so
/// that two uids are equal exactly when their strings are.
fn canonical_uuid(uid: &str) -> Option<uuid::Uuid> {
    let parsed = uuid::Uuid::try_parse(uid).ok()?;
    let mut buf = uuid::Uuid::encode_buffer();
    (parsed.hyphenated().encode_lower(&mut buf) == uid).then_some(parsed)
}

/// A child as the watch caches keep it: what a pass reads, in a few dozen bytes and no
/// allocation (the object itself, as [`Observed`] with its cache key, took ~1.2 KiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    /// The uid of its controlling owner (the `ownerReferences` entry with `controller: true`;
    /// the apiserver allows one), when it is a UUID in its canonical form: an Agent's always is.
    controller: Option<uuid::Uuid>,
    pub generation: Option<i64>,
    /// Its `resourceVersion`, hashed (as the applied-object cache keeps it).
    pub resource_version: Option<u64>,
    /// For a Service: whether it is headless (`clusterIP: None`); `None` before the apiserver
    /// has set a cluster IP, and for other kinds.
    pub headless: Option<bool>,
    /// For workloads: the pods wanted (`spec.replicas`, one when unset: the apps/v1 default),
    /// and the rollout's counts (none observed counts as none).
    want: i32,
    observed_generation: i64,
    updated: i32,
    available: i32,
}

impl Live {
    /// Whether the Agent with uid `uid` controls it (an object it did not create is never
    /// adopted): the same as comparing the uid strings, as the garbage collector does. A uid
    /// that is not a canonical UUID owns nothing.
    pub fn owned_by(&self, uid: &str) -> bool {
        self.controller.is_some() && self.controller == canonical_uuid(uid)
    }

    /// Whether the rollout is done: the current generation observed, every wanted pod updated
    /// and available. What the watch trigger asks at every event, without a message.
    pub fn rolled_out(&self) -> bool {
        self.observed_generation >= self.generation.unwrap_or(0)
            && self.updated >= self.want
            && self.available >= self.want
    }

    /// [`Self::rolled_out`], and a message saying so, for a workload of `kind`. While rolling
    /// out, one message that does not change with each step (the Agent's status is written
    /// when its message changes: a count ticking up would cost a write per step per Agent).
    pub fn rollout(&self, kind: &str) -> (bool, String) {
        let want = self.want;
        if self.rolled_out() {
            (true, format!("{}/{want} pods available", self.available))
        } else {
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
        let rollout = |d: &serde_json::Value| deployment(d.clone()).live().rollout("Deployment");
        assert!(!rollout(&d).0);
        d["status"] = serde_json::json!({"observedGeneration": 2, "updatedReplicas": 1, "availableReplicas": 0});
        let (ready, message) = rollout(&d);
        assert!(!ready);
        assert!(message.contains("Deployment's 1 pod(s)"), "{message}");
        d["status"]["availableReplicas"] = 1.into();
        assert_eq!(rollout(&d), (true, "1/1 pods available".into()));
        // No spec.replicas: the API's default of one.
        let d = deployment(serde_json::json!({
            "metadata": {"generation": 1},
            "spec": {},
            "status": {"observedGeneration": 1, "updatedReplicas": 1, "availableReplicas": 1}
        }));
        assert!(d.live().rolled_out());
    }

    #[test]
    fn tells_a_headless_service_from_one_with_a_cluster_ip() {
        let service = |spec: serde_json::Value| {
            serde_json::from_value::<Observed<Service>>(serde_json::json!({"spec": spec})).unwrap()
        };
        assert_eq!(
            service(serde_json::json!({"clusterIP": "None"}))
                .live()
                .headless,
            Some(true)
        );
        assert_eq!(
            service(serde_json::json!({"clusterIP": "10.0.0.7"}))
                .live()
                .headless,
            Some(false)
        );
        assert_eq!(service(serde_json::json!({})).live().headless, None);
        assert_eq!(
            deployment(serde_json::json!({"spec": {}})).live().headless,
            None
        );
    }

    const OWNER: &str = "0b3f7b0e-5d7a-4c2e-9f3a-2a1d6c8e9b10";

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
                    "name": "a", "uid": OWNER, "controller": true}]
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
        assert!(crate::controller::owned_by(m, OWNER));
        assert!(m.labels.is_none() && m.annotations.is_none());
        assert!(m.managed_fields.is_none() && m.creation_timestamp.is_none());
        let live = s.live();
        assert_eq!(live.headless, Some(false));
        assert!(live.owned_by(OWNER));
        assert_eq!(live.resource_version, Some(crate::controller::hash_of("7")));
        assert_eq!(Observed::<Service>::kind(&()), "Service");
        assert_eq!(Observed::<Service>::plural(&()), "services");
    }

    /// Only the controlling owner counts, compared exactly: another owner, an owner reference
    /// without `controller: true`, or a uid that is not a UUID (a tenant can write any string
    /// there) owns nothing.
    #[test]
    fn the_cache_knows_only_the_controlling_owner() {
        let with_owners = |owners: serde_json::Value| {
            serde_json::from_value::<Observed<Service>>(
                serde_json::json!({"metadata": {"ownerReferences": owners}}),
            )
            .unwrap()
            .live()
        };
        let owner = |uid: &str, controller: bool| {
            serde_json::json!({"apiVersion": "agentry.dev/v1alpha1", "kind": "Agent",
                "name": "a", "uid": uid, "controller": controller})
        };
        let other = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
        assert!(
            with_owners(serde_json::json!([owner(other, false), owner(OWNER, true)]))
                .owned_by(OWNER)
        );
        assert!(!with_owners(serde_json::json!([owner(OWNER, false)])).owned_by(OWNER));
        assert!(!with_owners(serde_json::json!([owner(other, true)])).owned_by(OWNER));
        assert!(!with_owners(serde_json::json!([])).owned_by(OWNER));
        // Not a UUID on either side: never a match, not even with itself.
        assert!(!with_owners(serde_json::json!([owner("o", true)])).owned_by("o"));
        // The same UUID written another way (upper case) is another string: not the owner, as
        // for the garbage collector.
        let upper = OWNER.to_uppercase();
        assert!(!with_owners(serde_json::json!([owner(&upper, true)])).owned_by(OWNER));
        assert!(!with_owners(serde_json::json!([owner(OWNER, true)])).owned_by(&upper));
    }
}
