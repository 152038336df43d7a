//! Workloads end to end: the children of an Agent, pods Running on the kwok node, memory
//! roll-outs and reverts, garbage collection, the admission policy, and discovery by label.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use agentry::crd::{Agent, Phase};

fn ready(a: &Agent) -> bool {
    condition(a, "Ready").is_some_and(|c| c.status == "True")
        && a.status.as_ref().and_then(|s| s.observed_generation) == a.metadata.generation
}

/// The pod's memory: the agent container's limit plus the sidecar's (the spec is the total).
fn memory_limit(d: &Deployment) -> String {
    pod_memory(d.spec.as_ref().unwrap().template.spec.as_ref().unwrap())
}

fn pod_memory(pod: &k8s_openapi::api::core::v1::PodSpec) -> String {
    let bytes: u128 = pod
        .containers
        .iter()
        .map(|c| {
            let q = &c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0;
            agentry::crd::units::parse_quantity(q).unwrap().units_ceil()
        })
        .sum();
    agentry::crd::units::format_memory(bytes as u64)
}

fn owned_by(meta: &kube::api::ObjectMeta, agent: &Agent) -> bool {
    meta.owner_references.as_ref().is_some_and(|o| {
        o.iter().any(|r| {
            r.uid == agent.uid().unwrap() && r.controller == Some(true) && r.kind == "Agent"
        })
    })
}

#[tokio::test]
async fn an_agent_gets_capped_restricted_children_and_running_pods() {
    let (client, ns) = setup("wl-basic").await;
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    let m = agent_manifest(
        "summarizer",
        json!({"spec": {"capabilities": ["summarize", "translate"]}}),
    );
    create_agent(&client, &ns.name, m).await.unwrap();
    let agent = wait_agent(
        &client,
        &ns.name,
        "summarizer",
        Duration::from_secs(60),
        "Ready",
        ready,
    )
    .await;

    let status = agent.status.as_ref().unwrap();
    assert_eq!(status.phase, Some(Phase::Ready));
    assert!(condition(&agent, "WorkloadReady").is_some_and(|c| c.status == "True"));
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("summarizer.{}.svc:8080", ns.name).as_str())
    );
    let assigned = status.assigned_resources.as_ref().unwrap();
    assert_eq!(
        (assigned.memory.as_str(), assigned.cpu.as_deref()),
        ("384Mi", Some("250m"))
    );
    assert_eq!(agent.labels()["agentry.dev/agent"], "summarizer");
    assert!(
        agent
            .labels()
            .contains_key("capability.agentry.dev/translate")
    );

    let d = Api::<Deployment>::namespaced(client.clone(), &ns.name)
        .get("summarizer")
        .await
        .unwrap();
    assert!(owned_by(&d.metadata, &agent));
    assert_eq!(memory_limit(&d), "384Mi");
    let svc = Api::<Service>::namespaced(client.clone(), &ns.name)
        .get("summarizer")
        .await
        .unwrap();
    assert!(owned_by(&svc.metadata, &agent));
    assert!(
        svc.labels()
            .contains_key("capability.agentry.dev/summarize")
    );
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), &ns.name)
        .get("summarizer")
        .await
        .unwrap();
    assert!(owned_by(&sa.metadata, &agent));
    let secret = Api::<Secret>::namespaced(client.clone(), &ns.name)
        .get("summarizer-identity")
        .await
        .unwrap();
    assert!(owned_by(&secret.metadata, &agent));

    // The pod runs on the kwok node with the limits and the restricted security context.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name)
        .list(&ListParams::default().labels("agentry.dev/agent=summarizer"))
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 1);
    let pod = &pods.items[0];
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some("kwok-node-0")
    );
    assert!(
        pod.labels()
            .contains_key("capability.agentry.dev/translate")
    );
    let c = &pod.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        pod_memory(pod.spec.as_ref().unwrap()),
        "384Mi",
        "agent + sidecar = the spec"
    );
    let sidecar = &pod.spec.as_ref().unwrap().containers[1];
    assert_eq!(sidecar.name, "agentry-sidecar");
    assert_eq!(
        sidecar.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0,
        "32Mi"
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(
        (
            sc.run_as_non_root,
            sc.allow_privilege_escalation,
            sc.read_only_root_filesystem
        ),
        (Some(true), Some(false), Some(true))
    );
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "identity")
        .unwrap();
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/var/run/agentry/identity", Some(true))
    );
}

#[tokio::test]
async fn memory_changes_roll_out_and_hand_edits_are_reverted() {
    let (client, ns) = setup("wl-memory").await;
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    create_and_wait(
        &client,
        &ns.name,
        "a",
        Duration::from_secs(60),
        "Ready",
        ready,
    )
    .await;

    let agents: Api<Agent> = Api::namespaced(client.clone(), &ns.name);
    agents
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"memory": "256Mi"}}})),
        )
        .await
        .unwrap();
    wait_agent(
        &client,
        &ns.name,
        "a",
        Duration::from_secs(60),
        "Ready at generation 2",
        ready,
    )
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(memory_limit(&deployments.get("a").await.unwrap()), "256Mi");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    eventually_ok(
        Duration::from_secs(60),
        "a running pod with the new limit",
        || async {
            Ok::<bool, kube::Error>({
                pods.list(&ListParams::default().labels("agentry.dev/agent=a"))
                    .await?
                    .items
                    .iter()
                    .any(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                            && p.metadata.deletion_timestamp.is_none()
                            && pod_memory(p.spec.as_ref().unwrap()) == "256Mi"
                    })
            })
        },
    )
    .await;

    // Someone raises the Deployment's memory by hand (an update, as `kubectl edit` does; like
    // kubectl, it retries when a status update moved the object under it: 409 Conflict).
    for attempt in 1.. {
        let mut d = deployments.get("a").await.unwrap();
        d.spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap()
            .containers[0]
            .resources
            .as_mut()
            .unwrap()
            .limits
            .as_mut()
            .unwrap()
            .insert(
                "memory".into(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("500Mi".into()),
            );
        match deployments.replace("a", &PostParams::default(), &d).await {
            Ok(_) => break,
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < 10 => continue,
            Err(e) => panic!("editing the Deployment by hand: {e}"),
        }
    }
    eventually_ok(
        Duration::from_secs(30),
        "memory reverted to 256Mi",
        || async { Ok::<bool, kube::Error>(memory_limit(&deployments.get("a").await?) == "256Mi") },
    )
    .await;
}

#[tokio::test]
async fn deleting_an_agent_garbage_collects_its_children() {
    let (client, ns) = setup("wl-gc").await;
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    create_and_wait(
        &client,
        &ns.name,
        "short-lived",
        Duration::from_secs(60),
        "Ready",
        ready,
    )
    .await;
    Api::<Agent>::namespaced(client.clone(), &ns.name)
        .delete("short-lived", &DeleteParams::default())
        .await
        .unwrap();
    let (d, s, sa, sec, pods) = (
        Api::<Deployment>::namespaced(client.clone(), &ns.name),
        Api::<Service>::namespaced(client.clone(), &ns.name),
        Api::<ServiceAccount>::namespaced(client.clone(), &ns.name),
        Api::<Secret>::namespaced(client.clone(), &ns.name),
        Api::<Pod>::namespaced(client.clone(), &ns.name),
    );
    eventually_ok(
        Duration::from_secs(60),
        "children garbage-collected",
        || async {
            Ok::<bool, kube::Error>({
                d.get_opt("short-lived").await?.is_none()
                    && s.get_opt("short-lived").await?.is_none()
                    && sa.get_opt("short-lived").await?.is_none()
                    && sec.get_opt("short-lived-identity").await?.is_none()
                    && pods
                        .list(&ListParams::default().labels("agentry.dev/agent=short-lived"))
                        .await?
                        .items
                        .is_empty()
            })
        },
    )
    .await;
}

/// The Agent's Service as it is now: (uid, clusterIP) once it has one.
async fn service_addressing(services: &Api<Service>, name: &str) -> Option<(String, String)> {
    let s = services.get_opt(name).await.unwrap()?;
    let ip = s.spec.as_ref()?.cluster_ip.clone()?;
    Some((s.uid()?, ip))
}

/// Starts the controller over `data_dir` with `args`; waits until the Agent "talker"'s Service
/// is a new one (not `old_uid`), headless or not as `headless` says, and the Agent is Ready and
/// owns it. Returns the controller and the Service's uid.
async fn restart_and_expect_service(
    client: &kube::Client,
    ns: &str,
    data_dir: &std::path::Path,
    args: Vec<String>,
    old_uid: &str,
    headless: bool,
) -> (ControllerProcess, String) {
    let mut opts = ControllerOptions::new(ns);
    opts.data_dir = Some(data_dir);
    opts.extra_args = args;
    let controller = ControllerProcess::start(opts);
    let services = Api::<Service>::namespaced(client.clone(), ns);
    eventually(Duration::from_secs(60), "the Service replaced", || {
        let services = services.clone();
        async move {
            service_addressing(&services, "talker")
                .await
                .is_some_and(|(uid, ip)| uid != old_uid && (ip == "None") == headless)
        }
    })
    .await;
    let (uid, _) = service_addressing(&services, "talker").await.unwrap();
    let agent = wait_agent(
        client,
        ns,
        "talker",
        Duration::from_secs(60),
        "Ready",
        ready,
    )
    .await;
    let svc = services.get("talker").await.unwrap();
    assert!(owned_by(&svc.metadata, &agent));
    assert_eq!(svc.uid().as_deref(), Some(uid.as_str()));
    (controller, uid)
}

#[tokio::test]
async fn agent_services_are_headless_and_changing_the_cluster_ip_flag_replaces_them() {
    let (client, ns) = setup("wl-svc").await;
    let services = Api::<Service>::namespaced(client.clone(), &ns.name);
    // A tenant's Service named like an Agent, labelled as the controller's (so it is in the
    // controller's cache) and with a cluster IP where the controller wants none: it is never
    // deleted to make way; the Agent says NameConflict.
    let squatter = services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "squatter", "labels": {"app.kubernetes.io/managed-by": "agentry"}},
                "spec": {"ports": [{"port": 80}], "selector": {"x": "y"}}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let mut controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    create_agent(&client, &ns.name, agent_manifest("squatter", json!({})))
        .await
        .unwrap();
    create_and_wait(
        &client,
        &ns.name,
        "talker",
        Duration::from_secs(60),
        "Ready",
        ready,
    )
    .await;
    let (first_uid, ip) = service_addressing(&services, "talker").await.unwrap();
    assert_eq!(ip, "None", "headless by default");
    wait_agent(
        &client,
        &ns.name,
        "squatter",
        Duration::from_secs(60),
        "NameConflict",
        |a| condition(a, "WorkloadReady").is_some_and(|c| c.reason == "NameConflict"),
    )
    .await;
    let kept = services.get("squatter").await.unwrap();
    assert_eq!(
        (&kept.metadata.uid, &kept.metadata.resource_version),
        (&squatter.metadata.uid, &squatter.metadata.resource_version),
        "the tenant's Service was replaced or modified"
    );

    // --agent-service-cluster-ip: the headless Service is replaced by one with a cluster IP.
    // The same data directory (the CA and ledger) across the restarts; the first process,
    // which owns it, lives to the end of the test.
    let data_dir = controller.data_dir();
    controller.terminate();
    let args = vec!["--agent-service-cluster-ip".to_string()];
    let (mut controller, second_uid) =
        restart_and_expect_service(&client, &ns.name, &data_dir, args, &first_uid, false).await;
    assert!(
        controller.logs().contains("replacing the Agent's Service"),
        "{}",
        controller.logs()
    );

    // And back: headless again, and the Agent is Ready.
    controller.terminate();
    let _controller =
        restart_and_expect_service(&client, &ns.name, &data_dir, vec![], &second_uid, true).await;
    let kept = services.get("squatter").await.unwrap();
    assert_eq!(
        kept.metadata.uid, squatter.metadata.uid,
        "the tenant's Service was deleted"
    );
}

fn labelled_pod(name: &str, limits: Option<&str>, second: Option<&str>) -> Pod {
    let container = |n: &str, mem: Option<&str>| {
        let mut c = json!({"name": n, "image": "busybox"});
        if let Some(m) = mem {
            c["resources"] = json!({"limits": {"memory": m}});
        }
        c
    };
    let mut containers = vec![container("main", limits)];
    if let Some(m) = second {
        containers.push(container("helper", Some(m)));
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"agentry.dev/agent": "hand-made"}},
        "spec": {"containers": containers}
    }))
    .unwrap()
}

#[tokio::test]
async fn the_apiserver_refuses_agent_pods_above_the_cap_or_without_limits() {
    let (client, ns) = setup("wl-policy").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // The policy is enforced by the apiserver after it syncs; wait until a violating pod is refused.
    let refused = |name: &'static str, pod: Pod| {
        let pods = pods.clone();
        async move {
            match pods.create(&PostParams::default(), &pod).await {
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 403 => Some(s.message),
                Ok(_) => {
                    let _ = pods
                        .delete(name, &DeleteParams::default().grace_period(0))
                        .await;
                    None
                }
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
    };
    let mut message = None;
    for _ in 0..50 {
        message = refused("big", labelled_pod("big", Some("1Gi"), None)).await;
        if message.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let message = message.expect("a labelled pod with 1Gi was admitted");
    assert!(message.contains("512Mi"), "{message}");

    let msg = refused("nolimit", labelled_pod("nolimit", None, None))
        .await
        .expect("a pod without a limit was admitted");
    assert!(
        msg.contains("main") && msg.contains("no memory limit"),
        "{msg}"
    );
    let msg = refused("sum", labelled_pod("sum", Some("300Mi"), Some("300Mi")))
        .await
        .expect("300Mi + 300Mi was admitted");
    assert!(msg.contains("512Mi"), "{msg}");

    // Within the cap: admitted. Unlabelled pods are none of our business.
    pods.create(
        &PostParams::default(),
        &labelled_pod("fits", Some("256Mi"), Some("256Mi")),
    )
    .await
    .unwrap();
    let mut plain = labelled_pod("plain", Some("2Gi"), None);
    plain.metadata.labels = None;
    pods.create(&PostParams::default(), &plain).await.unwrap();
}

/// Creates `pod` until the (possibly just updated) policy refuses it; returns the refusal.
async fn refused_once_synced(pods: &Api<Pod>, pod: &Pod) -> String {
    let name = pod.metadata.name.clone().unwrap();
    for _ in 0..50 {
        match pods.create(&PostParams::default(), pod).await {
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 403 => return s.message,
            Ok(_) => {
                let _ = pods
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    panic!("pod {name} was admitted: {pod:?}");
}

#[tokio::test]
async fn the_apiserver_refuses_zero_limits_on_containers_and_init_containers() {
    let (client, ns) = setup("wl-zero").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);

    // `0` is a memory limit that means "unlimited".
    let msg = refused_once_synced(&pods, &labelled_pod("zero", Some("0"), None)).await;
    assert!(
        msg.contains("main") && msg.contains("greater than 0"),
        "{msg}"
    );
    let msg = refused_once_synced(&pods, &labelled_pod("zero2", Some("256Mi"), Some("0Mi"))).await;
    assert!(msg.contains("helper") && !msg.contains("main,"), "{msg}");

    let with_init = |name: &str, init: serde_json::Value| -> Pod {
        let mut pod = labelled_pod(name, Some("256Mi"), None);
        let mut spec = serde_json::to_value(pod.spec.take().unwrap()).unwrap();
        spec["initContainers"] = json!([init]);
        pod.spec = Some(serde_json::from_value(spec).unwrap());
        pod
    };
    let msg = refused_once_synced(
        &pods,
        &with_init(
            "init-zero",
            json!({"name": "setup", "image": "busybox", "resources": {"limits": {"memory": "0"}}}),
        ),
    )
    .await;
    assert!(
        msg.contains("setup") && msg.contains("greater than 0"),
        "{msg}"
    );
    // A sidecar (an init container that keeps running) without a limit.
    let msg = refused_once_synced(
        &pods,
        &with_init(
            "sidecar",
            json!({"name": "proxy", "image": "busybox", "restartPolicy": "Always"}),
        ),
    )
    .await;
    assert!(
        msg.contains("proxy") && msg.contains("no memory limit"),
        "{msg}"
    );
    // A sidecar that fits is admitted.
    pods.create(
        &PostParams::default(),
        &with_init(
            "sidecar-ok",
            json!({"name": "proxy", "image": "busybox", "restartPolicy": "Always",
                   "resources": {"limits": {"memory": "128Mi"}}}),
        ),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn an_in_place_resize_cannot_lift_an_agent_pod_above_the_cap() {
    let (client, ns) = setup("wl-resize").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    // The policy must be in force before we rely on it refusing the resize.
    refused_once_synced(&pods, &labelled_pod("probe", Some("0"), None)).await;

    // The apiserver resizes a pod whose containers are not running yet, or run on a node that
    // reports container resources (kwok's fake node does not): keep this one unscheduled.
    let mut pod = labelled_pod("resizable", Some("256Mi"), None);
    pod.spec.as_mut().unwrap().node_selector =
        Some([("agentry.dev/e2e-nowhere".to_string(), "true".to_string())].into());
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let resize = |memory: &str| {
        json!({"spec": {"containers": [
            {"name": "main", "resources": {"limits": {"memory": memory}, "requests": {"memory": "256Mi"}}}
        ]}})
    };
    let limit = |p: &Pod| {
        p.spec.as_ref().unwrap().containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()["memory"]
            .0
            .clone()
    };
    // Within the cap the resize goes through: the subresource works on this cluster.
    let resized = pods
        .patch_subresource(
            "resize",
            "resizable",
            &PatchParams::default(),
            &Patch::Strategic(resize("384Mi")),
        )
        .await
        .expect("a resize within the cap is admitted");
    assert_eq!(limit(&resized), "384Mi");
    // Above it: refused, and the pod keeps its limit.
    for memory in ["1Gi", "513Mi"] {
        match pods
            .patch_subresource(
                "resize",
                "resizable",
                &PatchParams::default(),
                &Patch::Strategic(resize(memory)),
            )
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 403 => {
                assert!(
                    s.message.contains("512Mi") || s.message.contains("greater than 0"),
                    "{memory}: {}",
                    s.message
                );
            }
            Ok(p) => panic!("resize to {memory} admitted: limit {}", limit(&p)),
            Err(e) => panic!("resize to {memory}: unexpected error {e}"),
        }
    }
    assert_eq!(limit(&pods.get("resizable").await.unwrap()), "384Mi");
}

#[tokio::test]
async fn discovery_by_capability_returns_exactly_the_matching_agents() {
    let (client, ns) = setup("wl-discover").await;
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    let caps = |i: usize| {
        let mut c = vec![];
        if i.is_multiple_of(2) {
            c.push("summarize");
        }
        if i.is_multiple_of(3) {
            c.push("translate");
        }
        if i.is_multiple_of(5) {
            c.push("search");
        }
        c
    };
    for i in 0..50 {
        let m = agent_manifest(
            &format!("agent-{i:02}"),
            json!({"spec": {"capabilities": caps(i), "resources": {"memory": "32Mi"}}}),
        );
        create_agent(&client, &ns.name, m).await.unwrap();
    }
    let api: Api<Agent> = Api::namespaced(client.clone(), &ns.name);
    let expected = |cap: &str| -> Vec<String> {
        (0..50)
            .filter(|i| caps(*i).contains(&cap))
            .map(|i| format!("agent-{i:02}"))
            .collect()
    };
    for cap in ["summarize", "translate", "search"] {
        let want = expected(cap);
        eventually_ok(
            Duration::from_secs(90),
            &format!("discovery of {cap}"),
            || async {
                Ok::<bool, kube::Error>({
                    let mut got: Vec<String> = api
                        .list(
                            &ListParams::default().labels(&format!("capability.agentry.dev/{cap}")),
                        )
                        .await?
                        .items
                        .iter()
                        .map(|a| a.name_any())
                        .collect();
                    got.sort();
                    got == want
                })
            },
        )
        .await;
    }
    // Both at once: the intersection.
    let both: Vec<String> = (0..50)
        .filter(|i: &usize| i.is_multiple_of(6))
        .map(|i| format!("agent-{i:02}"))
        .collect();
    let mut got: Vec<String> = api
        .list(
            &ListParams::default()
                .labels("capability.agentry.dev/summarize,capability.agentry.dev/translate"),
        )
        .await
        .unwrap()
        .items
        .iter()
        .map(|a| a.name_any())
        .collect();
    got.sort();
    assert_eq!(got, both);
    // Dropping a capability drops its label.
    api.patch(
        "agent-00",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"capabilities": ["search"]}})),
    )
    .await
    .unwrap();
    eventually_ok(
        Duration::from_secs(30),
        "label follows the capability list",
        || async {
            Ok::<bool, kube::Error>({
                let a = api.get("agent-00").await?;
                !a.labels().contains_key("capability.agentry.dev/summarize")
                    && a.labels().contains_key("capability.agentry.dev/search")
            })
        },
    )
    .await;
}
