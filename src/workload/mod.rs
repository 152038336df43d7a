//! Builds an Agent's workload objects (pure functions: spec in, objects out): a Deployment (or a
//! StatefulSet with a volume when `spec.state.persistent`), a Service and a ServiceAccount, all
//! owned by the Agent, labelled for discovery, memory-capped and locked down ("restricted").

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::units::{MEMORY_CAP_BYTES, format_memory};
use crate::crd::{Agent, AssignedResources, ValidatedSpec};

mod observed;
pub mod policy;

pub use observed::{Live, Observed};

pub use crate::keys::{AGENT_LABEL, CAPABILITY_PREFIX, MANAGED_BY};
/// Where the identity Secret (tls.crt, tls.key, ca.crt, token) appears in the agent's container.
pub const IDENTITY_MOUNT: &str = "/var/run/agentry/identity";
pub const AGENT_CONTAINER: &str = "agent";
pub const SIDECAR_CONTAINER: &str = "agentry-sidecar";
/// The sidecar's memory (limit = request): twice what it was measured to use. The release
/// build peaked at 16.4 MiB RSS (VmHWM) registering, minting a token and answering 100 local
/// requests for its token and card; a debug build, 26 MiB (tests/api.rs prints it).
pub const SIDECAR_MEMORY_BYTES: u64 = 32 * 1024 * 1024;
/// Where the agent reaches its sidecar (same pod, loopback).
pub const SIDECAR_ADDR: &str = "127.0.0.1:8181";

/// The `agentry sidecar` container every agent pod gets when the API is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarSpec {
    pub image: String,
    /// The API as agents reach it.
    pub api_url: String,
}
/// The non-root user agent containers run as when the image does not say.
pub const DEFAULT_UID: i64 = 65532;

/// The labels that make an Agent and its objects discoverable by capability.
pub fn discovery_labels(agent: &Agent) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(AGENT_LABEL.to_string(), agent.name_any())]);
    for c in &agent.spec.capabilities {
        labels.insert(format!("{CAPABILITY_PREFIX}{c}"), String::new());
    }
    labels
}

/// Labels on every child object: discovery plus the standard app.kubernetes.io set.
pub fn child_labels(agent: &Agent) -> BTreeMap<String, String> {
    let mut labels = discovery_labels(agent);
    labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    labels.insert("app.kubernetes.io/name".into(), "agent".into());
    labels.insert("app.kubernetes.io/instance".into(), agent.name_any());
    labels
}

fn selector(agent: &Agent) -> LabelSelector {
    LabelSelector {
        match_labels: Some([(AGENT_LABEL.to_string(), agent.name_any())].into()),
        ..Default::default()
    }
}

fn meta(agent: &Agent, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: agent.namespace(),
        labels: Some(child_labels(agent)),
        owner_references: agent.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// How a pod's memory is split: the agent container gets what the spec asks minus what the
/// sidecar (when present) takes, so the pod total never exceeds the spec, nor the 512Mi cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub agent_bytes: u64,
    pub sidecar_bytes: u64,
}

impl MemoryPlan {
    pub fn new(spec_bytes: u64, sidecar_bytes: u64) -> Self {
        let total = spec_bytes.min(MEMORY_CAP_BYTES);
        let sidecar = sidecar_bytes.min(total / 2);
        Self {
            agent_bytes: total - sidecar,
            sidecar_bytes: sidecar,
        }
    }
    pub fn total(&self) -> u64 {
        self.agent_bytes + self.sidecar_bytes
    }
}

/// What `status.assignedResources` reports for this spec.
pub fn assigned_resources(spec: &ValidatedSpec, plan: &MemoryPlan) -> AssignedResources {
    AssignedResources {
        memory: format_memory(plan.total()),
        cpu: spec.cpu_millis.map(|m| format!("{m}m")),
    }
}

fn agent_container(agent: &Agent, spec: &ValidatedSpec, plan: &MemoryPlan) -> Container {
    let t = &agent.spec.template;
    let memory = Quantity(format_memory(plan.agent_bytes));
    let mut requests = BTreeMap::from([("memory".to_string(), memory.clone())]);
    if let Some(cpu) = spec.cpu_millis {
        requests.insert("cpu".into(), Quantity(format!("{cpu}m")));
    }
    let mut mounts = vec![
        VolumeMount {
            name: "identity".into(),
            mount_path: IDENTITY_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        },
    ];
    if let Some(path) = state_mount_path(agent) {
        mounts.push(VolumeMount {
            name: "state".into(),
            mount_path: path,
            ..Default::default()
        });
    }
    let mut env = t.env.clone();
    env.push(k8s_openapi::api::core::v1::EnvVar {
        name: "AGENTRY_IDENTITY_DIR".into(),
        value: Some(IDENTITY_MOUNT.into()),
        ..Default::default()
    });
    Container {
        name: AGENT_CONTAINER.into(),
        image: Some(t.image.clone()),
        command: (!t.command.is_empty()).then(|| t.command.clone()),
        args: (!t.args.is_empty()).then(|| t.args.clone()),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: t.port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            // Requests equal the memory limit: the agent is never OOM-killed for using what it
            // was promised. CPU is requested, not limited (no throttling).
            limits: Some([("memory".to_string(), memory)].into()),
            requests: Some(requests),
            ..Default::default()
        }),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// Pod Security "restricted" for a container.
pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn sidecar_container(agent: &Agent, plan: &MemoryPlan, sidecar: &SidecarSpec) -> Container {
    let memory = Quantity(format_memory(plan.sidecar_bytes));
    let id = format!(
        "{}/{}",
        agent.namespace().unwrap_or_default(),
        agent.name_any()
    );
    let mut args = vec![
        "sidecar".to_string(),
        "--api".into(),
        sidecar.api_url.clone(),
        "--identity-dir".into(),
        IDENTITY_MOUNT.into(),
        "--id".into(),
        id,
        "--listen".into(),
        SIDECAR_ADDR.into(),
    ];
    if !agent.spec.capabilities.is_empty() {
        args.push("--capabilities".into());
        args.push(agent.spec.capabilities.join(","));
    }
    // A restore is staged (an unnamed file) and verified on the state volume, which has room
    // for it, before it is written there.
    if let Some(path) = state_mount_path(agent).filter(|_| agent.spec.backup.is_some()) {
        args.push("--scratch-dir".into());
        args.push(path);
    }
    Container {
        name: SIDECAR_CONTAINER.into(),
        image: Some(sidecar.image.clone()),
        args: Some(args),
        resources: Some(ResourceRequirements {
            limits: Some([("memory".to_string(), memory.clone())].into()),
            requests: Some(
                [
                    ("memory".to_string(), memory),
                    ("cpu".to_string(), Quantity("10m".into())),
                ]
                .into(),
            ),
            ..Default::default()
        }),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(sidecar_mounts(agent)),
        ..Default::default()
    }
}

/// The identity (read-only); with backups, `/tmp` (where a restore is checked before it is
/// written) and the agent's state volume at the agent's own path, so `spec.backup.paths` on
/// it mean the same in both containers.
fn sidecar_mounts(agent: &Agent) -> Vec<VolumeMount> {
    let mut mounts = vec![VolumeMount {
        name: "identity".into(),
        mount_path: IDENTITY_MOUNT.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    if let Some(path) = state_mount_path(agent).filter(|_| agent.spec.backup.is_some()) {
        mounts.push(VolumeMount {
            name: "state".into(),
            mount_path: path,
            ..Default::default()
        });
    }
    mounts
}

/// Where the agent's state volume is mounted, if it has one: a PersistentVolumeClaim with
/// `spec.state.persistent`, else an emptyDir (living as long as the pod) when it has backups,
/// so that the sidecar sees the files `spec.backup.paths` name (put them under this path).
pub fn state_mount_path(agent: &Agent) -> Option<String> {
    let state = agent.spec.state.as_ref();
    let persistent = state.is_some_and(|s| s.persistent);
    (persistent || agent.spec.backup.is_some())
        .then(|| state.map_or_else(|| DEFAULT_STATE_PATH.to_string(), |s| s.mount_path.clone()))
}

/// `spec.state.mountPath`'s default.
pub const DEFAULT_STATE_PATH: &str = "/var/lib/agent";

fn pod_template(
    agent: &Agent,
    spec: &ValidatedSpec,
    plan: &MemoryPlan,
    identity_secret: &str,
    sidecar: Option<&SidecarSpec>,
) -> PodTemplateSpec {
    let mut containers = vec![agent_container(agent, spec, plan)];
    if let Some(sidecar) = sidecar.filter(|_| plan.sidecar_bytes > 0) {
        containers.push(sidecar_container(agent, plan, sidecar));
    }
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(child_labels(agent)),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(agent.name_any()),
            // Agents talk to Agentry with their own certificate and token, not to the apiserver.
            automount_service_account_token: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(DEFAULT_UID),
                run_as_group: Some(DEFAULT_UID),
                fs_group: Some(DEFAULT_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers,
            volumes: Some(
                vec![
                    Volume {
                        name: "identity".into(),
                        secret: Some(SecretVolumeSource {
                            secret_name: Some(identity_secret.into()),
                            default_mode: Some(0o440),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    Volume {
                        name: "tmp".into(),
                        empty_dir: Some(EmptyDirVolumeSource {
                            size_limit: Some(Quantity("64Mi".into())),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ]
                .into_iter()
                .chain(ephemeral_state(agent))
                .collect(),
            ),
            ..Default::default()
        }),
    }
}

/// An emptyDir for the state of an Agent that has backups but no persistent volume.
fn ephemeral_state(agent: &Agent) -> Option<Volume> {
    let persistent = agent.spec.state.as_ref().is_some_and(|s| s.persistent);
    // As large as a persistent volume would be (spec.state.size, 1Gi by default): the
    // node's disk is shared.
    let size = agent
        .spec
        .state
        .as_ref()
        .map_or_else(|| "1Gi".to_string(), |s| s.size.clone());
    (!persistent && agent.spec.backup.is_some()).then(|| Volume {
        name: "state".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(size)),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The agent's workload: a Deployment, or a StatefulSet when it keeps persistent state.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    Deployment(Box<Deployment>),
    StatefulSet(Box<StatefulSet>),
}

pub fn workload(
    agent: &Agent,
    spec: &ValidatedSpec,
    plan: &MemoryPlan,
    identity_secret: &str,
    sidecar: Option<&SidecarSpec>,
) -> Workload {
    let template = pod_template(agent, spec, plan, identity_secret, sidecar);
    match agent.spec.state.as_ref().filter(|s| s.persistent) {
        None => Workload::Deployment(Box::new(Deployment {
            metadata: meta(agent, agent.name_any()),
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                revision_history_limit: Some(3),
                selector: selector(agent),
                template,
                ..Default::default()
            }),
            ..Default::default()
        })),
        Some(state) => Workload::StatefulSet(Box::new(StatefulSet {
            metadata: meta(agent, agent.name_any()),
            spec: Some(StatefulSetSpec {
                replicas: Some(1),
                revision_history_limit: Some(3),
                service_name: Some(agent.name_any()),
                selector: selector(agent),
                template,
                volume_claim_templates: Some(vec![PersistentVolumeClaim {
                    metadata: ObjectMeta {
                        name: Some("state".into()),
                        ..Default::default()
                    },
                    spec: Some(PersistentVolumeClaimSpec {
                        access_modes: Some(vec!["ReadWriteOnce".into()]),
                        resources: Some(VolumeResourceRequirements {
                            requests: Some(
                                [("storage".to_string(), Quantity(state.size.clone()))].into(),
                            ),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

/// A headless Service's `spec.clusterIP`.
pub const HEADLESS: &str = "None";

/// The Agent's Service: `<name>.<namespace>.svc` on its port. Headless unless `cluster_ip`:
/// the name resolves to the Agent's pod (one replica; the Service port is the container port),
/// and no cluster IP is allocated. Allocation is serialized in the apiserver (one loopback
/// write each, under one lock), bounds Service creation at a few dozen per second on a busy
/// control plane, and draws on a service range that is often smaller than a fleet (a /20 holds
/// 4,096); a StatefulSet's pods also get their own DNS names only through a headless Service.
pub fn service(agent: &Agent, cluster_ip: bool) -> Service {
    Service {
        metadata: meta(agent, agent.name_any()),
        spec: Some(ServiceSpec {
            selector: Some([(AGENT_LABEL.to_string(), agent.name_any())].into()),
            cluster_ip: (!cluster_ip).then(|| HEADLESS.to_string()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: agent.spec.template.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn service_account(agent: &Agent) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(agent, agent.name_any()),
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

/// `<name>.<namespace>.svc:<port>`
pub fn endpoint(agent: &Agent) -> String {
    format!(
        "{}.{}.svc:{}",
        agent.name_any(),
        agent.namespace().unwrap_or_default(),
        agent.spec.template.port
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{AgentSpec, StateSpec};

    fn agent(memory: &str) -> Agent {
        let spec: AgentSpec = serde_json::from_value(serde_json::json!({
            "capabilities": ["summarize", "translate"],
            "template": {"image": "img:1", "env": [{"name": "A", "value": "b"}]},
            "resources": {"memory": memory, "cpu": "250m"}
        }))
        .unwrap();
        let mut a = Agent::new("summarizer", spec);
        a.metadata.namespace = Some("team-a".into());
        a.metadata.uid = Some("uid-1".into());
        a
    }

    fn container(w: &Workload) -> Container {
        let t = match w {
            Workload::Deployment(d) => d.spec.as_ref().unwrap().template.clone(),
            Workload::StatefulSet(s) => s.spec.as_ref().unwrap().template.clone(),
        };
        t.spec.unwrap().containers[0].clone()
    }

    /// With backups, the sidecar sees the agent's state volume at the agent's path (an
    /// emptyDir without persistence, the PVC with it) and stages restores there; without
    /// backups it sees only the identity.
    #[test]
    fn with_backups_the_sidecar_shares_the_state_volume() {
        let sidecar = SidecarSpec {
            image: "img".into(),
            api_url: "https://api".into(),
        };
        let pod_of = |a: &Agent| {
            let spec = a.spec.validate().unwrap();
            let plan = MemoryPlan::new(spec.memory_bytes, SIDECAR_MEMORY_BYTES);
            let t = match workload(a, &spec, &plan, "x-identity", Some(&sidecar)) {
                Workload::Deployment(d) => d.spec.unwrap().template,
                Workload::StatefulSet(s) => s.spec.unwrap().template,
            };
            t.spec.unwrap()
        };
        let mounts = |c: &Container| -> Vec<(String, String)> {
            c.volume_mounts
                .iter()
                .flatten()
                .map(|m| (m.name.clone(), m.mount_path.clone()))
                .collect()
        };
        let plain = pod_of(&agent("384Mi"));
        assert_eq!(
            mounts(&plain.containers[1]),
            [("identity".into(), IDENTITY_MOUNT.into())]
        );
        assert!(!plain.volumes.unwrap().iter().any(|v| v.name == "state"));

        let mut a = agent("384Mi");
        a.spec.backup = serde_json::from_value(
            serde_json::json!({"schedule": "@daily", "paths": ["/var/lib/agent/memory"]}),
        )
        .unwrap();
        let pod = pod_of(&a);
        let state = ("state".to_string(), DEFAULT_STATE_PATH.to_string());
        assert!(mounts(&pod.containers[0]).contains(&state));
        assert!(mounts(&pod.containers[1]).contains(&state));
        let volumes = pod.volumes.unwrap();
        let v = volumes.iter().find(|v| v.name == "state").unwrap();
        assert!(v.empty_dir.is_some(), "ephemeral state without persistence");
        let args = pod.containers[1].args.clone().unwrap();
        assert!(
            args.windows(2)
                .any(|w| w == ["--scratch-dir", DEFAULT_STATE_PATH]),
            "{args:?}"
        );

        a.spec.state = Some(
            serde_json::from_value(serde_json::json!({"persistent": true, "mountPath": "/data"}))
                .unwrap(),
        );
        let pod = pod_of(&a);
        let state = ("state".to_string(), "/data".to_string());
        assert!(mounts(&pod.containers[1]).contains(&state));
        assert!(
            !pod.volumes.unwrap().iter().any(|v| v.name == "state"),
            "the StatefulSet's claim provides it"
        );
    }

    #[test]
    fn the_sidecar_takes_its_share_of_the_pod_not_more() {
        let a = agent("384Mi");
        let spec = a.spec.validate().unwrap();
        let plan = MemoryPlan::new(spec.memory_bytes, SIDECAR_MEMORY_BYTES);
        let sidecar = SidecarSpec {
            image: "ghcr.io/agentry-dev/agentry:0.1.0".into(),
            api_url: "https://agentry-api.agentry-system.svc:8443".into(),
        };
        let w = workload(&a, &spec, &plan, "summarizer-identity", Some(&sidecar));
        let Workload::Deployment(d) = &w else {
            panic!("expected a Deployment")
        };
        let pod = d.spec.as_ref().unwrap().template.spec.clone().unwrap();
        let limit = |c: &Container| {
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"]
                .0
                .clone()
        };
        assert_eq!(pod.containers.len(), 2);
        assert_eq!(limit(&pod.containers[0]), "352Mi");
        assert_eq!(limit(&pod.containers[1]), "32Mi");
        assert_eq!(
            assigned_resources(&spec, &plan).memory,
            "384Mi",
            "the pod total is the spec"
        );
        let s = &pod.containers[1];
        assert_eq!(s.name, SIDECAR_CONTAINER);
        let args = s.args.clone().unwrap().join(" ");
        assert!(args.starts_with("sidecar --api https://agentry-api.agentry-system.svc:8443 --identity-dir /var/run/agentry/identity --id team-a/summarizer"), "{args}");
        assert!(
            args.ends_with("--capabilities summarize,translate"),
            "{args}"
        );
        assert_eq!(s.security_context, Some(restricted_container_security()));
        assert_eq!(s.volume_mounts.as_ref().unwrap()[0].read_only, Some(true));
        // A tiny agent: the sidecar never takes more than half.
        let small = MemoryPlan::new(32 * 1024 * 1024, SIDECAR_MEMORY_BYTES);
        assert_eq!(
            (small.agent_bytes, small.sidecar_bytes),
            (16 * 1024 * 1024, 16 * 1024 * 1024)
        );
    }

    #[test]
    fn deployment_is_capped_owned_labelled_and_restricted() {
        let a = agent("384Mi");
        let spec = a.spec.validate().unwrap();
        let plan = MemoryPlan::new(spec.memory_bytes, 0);
        let w = workload(&a, &spec, &plan, "summarizer-identity", None);
        let Workload::Deployment(d) = &w else {
            panic!("expected a Deployment")
        };
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("Agent", "summarizer", Some(true))
        );
        let labels = d.metadata.labels.as_ref().unwrap();
        assert_eq!(labels["agentry.dev/agent"], "summarizer");
        assert!(labels.contains_key("capability.agentry.dev/summarize"));
        assert!(labels.contains_key("capability.agentry.dev/translate"));
        let c = container(&w);
        let res = c.resources.unwrap();
        assert_eq!(res.limits.unwrap()["memory"].0, "384Mi");
        let req = res.requests.unwrap();
        assert_eq!(req["memory"].0, "384Mi");
        assert_eq!(req["cpu"].0, "250m");
        let sc = c.security_context.unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let identity = c
            .volume_mounts
            .unwrap()
            .into_iter()
            .find(|m| m.name == "identity")
            .unwrap();
        assert_eq!(
            (identity.mount_path.as_str(), identity.read_only),
            (IDENTITY_MOUNT, Some(true))
        );
        assert_eq!(endpoint(&a), "summarizer.team-a.svc:8080");
        let headless = service(&a, false).spec.unwrap();
        assert_eq!(
            headless.selector.unwrap()["agentry.dev/agent"],
            "summarizer"
        );
        assert_eq!(headless.cluster_ip.as_deref(), Some(HEADLESS));
        // The name resolves to the pod: the Service port must be the container's.
        let port = &headless.ports.unwrap()[0];
        assert_eq!(
            Some(port.port),
            c.ports.as_ref().unwrap()[0].container_port.into()
        );
        // --agent-service-cluster-ip: the apiserver allocates one.
        assert_eq!(service(&a, true).spec.unwrap().cluster_ip, None);
        assert_eq!(
            service_account(&a).automount_service_account_token,
            Some(false)
        );
    }

    #[test]
    fn memory_plan_never_exceeds_the_spec_or_the_cap() {
        let mi = 1024 * 1024;
        assert_eq!(MemoryPlan::new(512 * mi, 0).total(), 512 * mi);
        let p = MemoryPlan::new(512 * mi, 64 * mi);
        assert_eq!(
            (p.agent_bytes, p.sidecar_bytes, p.total()),
            (448 * mi, 64 * mi, 512 * mi)
        );
        // The sidecar never takes more than half.
        let p = MemoryPlan::new(64 * mi, 64 * mi);
        assert_eq!((p.agent_bytes, p.sidecar_bytes), (32 * mi, 32 * mi));
        // Nothing above the cap, even from a spec that slipped past validation.
        assert_eq!(MemoryPlan::new(2048 * mi, 0).total(), 512 * mi);
    }

    #[test]
    fn persistent_state_makes_a_statefulset_with_a_volume() {
        let mut a = agent("256Mi");
        a.spec.state = Some(StateSpec {
            persistent: true,
            size: "2Gi".into(),
            mount_path: "/var/lib/agent".into(),
        });
        let spec = a.spec.validate().unwrap();
        let w = workload(&a, &spec, &MemoryPlan::new(spec.memory_bytes, 0), "x", None);
        let Workload::StatefulSet(s) = &w else {
            panic!("expected a StatefulSet")
        };
        let claims = s
            .spec
            .as_ref()
            .unwrap()
            .volume_claim_templates
            .clone()
            .unwrap();
        assert_eq!(
            claims[0]
                .spec
                .as_ref()
                .unwrap()
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"]
                .0,
            "2Gi"
        );
        assert!(
            container(&w)
                .volume_mounts
                .unwrap()
                .iter()
                .any(|m| m.name == "state" && m.mount_path == "/var/lib/agent")
        );
    }
}
