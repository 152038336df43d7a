//! The controller against the real apiserver: finalizer, conditions, observedGeneration, deletion,
//! leader election between two processes, and isolation of an undecodable object.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use agentry::crd::{Agent, Phase};

fn ready(agent: &Agent) -> bool {
    condition(agent, "Ready").is_some_and(|c| c.status == "True")
        && agent.status.as_ref().and_then(|s| s.observed_generation) == agent.metadata.generation
}

#[tokio::test]
async fn reconcile_adds_finalizer_conditions_and_observed_generation() {
    let (client, ns) = setup("ctl-basic").await;
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    let agent = create_and_wait(
        &client,
        &ns.name,
        "summarizer",
        Duration::from_secs(30),
        "Ready",
        ready,
    )
    .await;
    assert!(
        has_finalizer(&agent),
        "finalizer missing: {:?}",
        agent.finalizers()
    );
    let status = agent.status.as_ref().unwrap();
    assert_eq!(status.observed_generation, Some(1));
    let ready_cond = condition(&agent, "Ready").unwrap();
    assert!(!ready_cond.reason.is_empty() && !ready_cond.message.is_empty());
    assert_eq!(ready_cond.observed_generation, Some(1));
    assert_ne!(status.phase, Some(Phase::Failed));

    // A spec change bumps the generation; the status follows it.
    let api: Api<Agent> = Api::namespaced(client.clone(), &ns.name);
    api.patch(
        "summarizer",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"capabilities": ["summarize", "translate"]}})),
    )
    .await
    .unwrap();
    let agent = wait_agent(
        &client,
        &ns.name,
        "summarizer",
        Duration::from_secs(30),
        "observedGeneration 2",
        |a| a.status.as_ref().and_then(|s| s.observed_generation) == Some(2),
    )
    .await;
    assert_eq!(agent.metadata.generation, Some(2));
}

/// Messaging on a controller run without --redis-url is reported as not configured, not faked; a
/// backup whose BackupLocation does not exist is reported unhealthy, and Ready is not held back.
#[tokio::test]
async fn messaging_without_redis_is_not_configured_and_a_missing_backup_location_unhealthy() {
    let (client, ns) = setup("ctl-notyet").await;
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    let m = agent_manifest(
        "later",
        json!({"spec": {"messaging": {"enabled": true}, "backup": {"schedule": "@daily", "paths": ["/data"]}}}),
    );
    create_agent(&client, &ns.name, m).await.unwrap();
    let agent = wait_agent(
        &client,
        &ns.name,
        "later",
        Duration::from_secs(60),
        "Ready",
        ready,
    )
    .await;
    let c = condition(&agent, "MessagingReady").expect("MessagingReady");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("Unknown", "NotConfigured")
    );
    assert!(c.message.contains("--redis-url"), "{}", c.message);
    let agent = wait_agent(
        &client,
        &ns.name,
        "later",
        Duration::from_secs(30),
        "BackupHealthy=False",
        |a| condition(a, "BackupHealthy").is_some_and(|c| c.status == "False"),
    )
    .await;
    let c = condition(&agent, "BackupHealthy").unwrap();
    assert_eq!(c.reason, "LocationUnavailable");
    assert!(
        c.message.contains("BackupLocation default"),
        "{}",
        c.message
    );
    assert!(ready(&agent), "backups do not hold Ready back");
    // No AgentBackup is created for a location that is not there.
    let backups: kube::Api<agentry::crd::AgentBackup> =
        kube::Api::namespaced(client.clone(), &ns.name);
    assert!(
        backups
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn delete_runs_cleanup_and_removes_the_finalizer() {
    let (client, ns) = setup("ctl-delete").await;
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    create_and_wait(
        &client,
        &ns.name,
        "doomed",
        Duration::from_secs(30),
        "finalizer",
        has_finalizer,
    )
    .await;

    let api: Api<Agent> = Api::namespaced(client.clone(), &ns.name);
    api.delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    eventually_ok(Duration::from_secs(30), "agent deleted", || async {
        Ok::<bool, kube::Error>(api.get_opt("doomed").await?.is_none())
    })
    .await;
    // The cleanup left its trace as an Event.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    let list = events.list(&Default::default()).await.unwrap();
    assert!(
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Deleted")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("doomed")),
        "no Deleted event: {:?}",
        list.items.iter().map(|e| &e.reason).collect::<Vec<_>>()
    );
}

/// Who holds the Lease; an API error is an error, never "nobody" (a failed GET must not pass
/// for a released Lease). A missing Lease is `None`.
async fn leader_of(client: &kube::Client, ns: &str) -> Result<Option<String>, kube::Error> {
    Ok(Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt("agentry-controller")
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    let (client, ns) = setup("ctl-leader").await;
    let lease = Duration::from_secs(4);
    let mut a = ControllerProcess::start(ControllerOptions {
        replica: "replica-a",
        ..ControllerOptions::new(&ns.name)
    });
    eventually_ok(Duration::from_secs(20), "replica-a leads", || async {
        Ok::<_, kube::Error>(leader_of(&client, &ns.name).await?.as_deref() == Some("replica-a"))
    })
    .await;
    let b = ControllerProcess::start(ControllerOptions {
        replica: "replica-b",
        ..ControllerOptions::new(&ns.name)
    });
    eventually(
        Duration::from_secs(20),
        "replica-b serves metrics",
        || async { b.metric("agentry_leader").await.is_some() },
    )
    .await;

    for i in 0..3 {
        create_agent(
            &client,
            &ns.name,
            agent_manifest(&format!("first-{i}"), json!({})),
        )
        .await
        .unwrap();
    }
    for i in 0..3 {
        wait_agent(
            &client,
            &ns.name,
            &format!("first-{i}"),
            Duration::from_secs(30),
            "Ready",
            ready,
        )
        .await;
    }
    assert_eq!(a.metric("agentry_leader").await, Some(1.0));
    assert_eq!(b.metric("agentry_leader").await, Some(0.0));
    assert!(a.metric("agentry_reconcile_total").await.unwrap_or(0.0) >= 3.0);
    assert_eq!(
        b.metric("agentry_reconcile_total").await.unwrap_or(0.0),
        0.0,
        "the standby reconciled:\n{}",
        b.logs()
    );

    // SIGKILL the leader: no lease release. The standby must take over within the lease time
    // (plus a renewal period of slack) and reconcile new work.
    a.kill();
    let killed = Instant::now();
    eventually_ok(lease * 3, "replica-b takes the lease", || async {
        Ok::<_, kube::Error>(leader_of(&client, &ns.name).await?.as_deref() == Some("replica-b"))
    })
    .await;
    let takeover = killed.elapsed();
    assert!(
        takeover <= lease * 2,
        "takeover took {takeover:?}, lease is {lease:?}"
    );
    create_and_wait(
        &client,
        &ns.name,
        "second",
        Duration::from_secs(30),
        "Ready after failover",
        ready,
    )
    .await;
    assert_eq!(b.metric("agentry_leader").await, Some(1.0));
}

#[tokio::test]
async fn sigterm_releases_the_lease_and_exits_cleanly() {
    let (client, ns) = setup("ctl-term").await;
    let mut a = ControllerProcess::start(ControllerOptions::new(&ns.name));
    eventually_ok(Duration::from_secs(20), "replica-a leads", || async {
        Ok::<_, kube::Error>(leader_of(&client, &ns.name).await?.is_some())
    })
    .await;
    assert_eq!(a.terminate(), Some(0), "exit status; logs:\n{}", a.logs());
    // Released on the way out, so a successor need not wait for expiry.
    let holder = leader_of(&client, &ns.name)
        .await
        .expect("reading the Lease after shutdown");
    assert_eq!(holder, None, "the Lease must be released on SIGTERM");
}

/// An Agent stored under a looser schema (here: `template.port` as a string) does not decode into
/// our types. It gets a Warning event, and every other Agent is still reconciled.
#[tokio::test]
async fn an_undecodable_agent_does_not_stop_the_others() {
    let (client, ns) = setup("ctl-guard").await;

    // Loosen the stored schema just long enough to store one odd object, then restore it.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let path = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/template/properties/port";
    let loosen = json!([
        {"op": "replace", "path": format!("{path}"), "value": {"x-kubernetes-int-or-string": true, "minimum": 1, "maximum": 65535}}
    ]);
    crds.patch(
        "agents.agentry.dev",
        &PatchParams::default(),
        &Patch::Json::<()>(serde_json::from_value(loosen).unwrap()),
    )
    .await
    .unwrap();
    let odd = agent_manifest("odd", json!({"spec": {"template": {"port": "http"}}}));
    let dynamic = Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        &ns.name,
        &kube::api::ApiResource::erase::<Agent>(&()),
    );
    let created = async {
        for _ in 0..50 {
            let obj: kube::api::DynamicObject = serde_json::from_value(odd.clone()).unwrap();
            if dynamic.create(&Default::default(), &obj).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
    .await;
    ensure_crds(&client).await; // restores the generated schema
    assert!(
        created,
        "could not store the odd Agent under the loosened schema"
    );

    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    for name in ["good-1", "good-2"] {
        create_agent(&client, &ns.name, agent_manifest(name, json!({})))
            .await
            .unwrap();
    }
    for name in ["good-1", "good-2"] {
        wait_agent(
            &client,
            &ns.name,
            name,
            Duration::from_secs(30),
            "Ready",
            ready,
        )
        .await;
    }
    let events: Api<Event> = Api::namespaced(client.clone(), &ns.name);
    eventually_ok(
        Duration::from_secs(20),
        "InvalidObject event on the odd Agent",
        || async {
            Ok::<bool, kube::Error>({
                events
                    .list(&Default::default())
                    .await?
                    .items
                    .iter()
                    .any(|e| {
                        e.reason.as_deref() == Some("InvalidObject")
                            && e.type_.as_deref() == Some("Warning")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("odd")
                    })
            })
        },
    )
    .await;
    let odd_now = dynamic.get("odd").await.unwrap();
    assert!(
        odd_now.finalizers().is_empty(),
        "the controller must not touch what it cannot read"
    );
}

/// The default mode: no `--watch-namespace`, so the controller reconciles Agents in every
/// namespace (here limited by `--agent-selector` to this test's Agents, so that it leaves the
/// other tests' Agents on the shared cluster alone), and its namespace watch covers them all.
/// A controller watching every namespace, limited to the Agents labelled with its shard (so it
/// leaves other tests' Agents alone), and that label as a manifest overlay.
fn shard_controller(home: &str) -> (ControllerProcess, serde_json::Value) {
    let mut opts = ControllerOptions::new(home);
    opts.cluster_wide = true;
    opts.extra_args = vec![
        "--agent-selector".into(),
        format!("agentry.dev/e2e-shard={home}"),
    ];
    let label = json!({"metadata": {"labels": {"agentry.dev/e2e-shard": home}}});
    (ControllerProcess::start(opts), label)
}

#[tokio::test]
async fn cluster_wide_mode_reconciles_agents_in_every_namespace() {
    let (client, home) = setup("ctl-wide").await;
    let one = TestNamespace::new(&client, "ctl-wide-a").await;
    let two = TestNamespace::new(&client, "ctl-wide-b").await;
    let (_controller, label) = shard_controller(&home.name);
    for ns in [&one.name, &two.name] {
        create_agent(&client, ns, agent_manifest("wide", label.clone()))
            .await
            .unwrap();
    }
    // An Agent outside the shard is not this controller's.
    create_agent(&client, &one.name, agent_manifest("other-shard", json!({})))
        .await
        .unwrap();
    for ns in [&one.name, &two.name] {
        wait_agent(&client, ns, "wide", Duration::from_secs(60), "Ready", ready).await;
    }
    let other = Api::<Agent>::namespaced(client.clone(), &one.name)
        .get("other-shard")
        .await
        .unwrap();
    assert!(
        other.status.as_ref().and_then(|s| s.observed_generation) == Some(-1)
            && !has_finalizer(&other),
        "reconciled outside its shard"
    );
}

/// Deleting an Agent's namespace: the namespace controller removes the Agent's children while
/// the Agent waits on its finalizer. The controller leaves a terminating namespace alone (no
/// re-apply of a removed child, which the apiserver refuses as "being terminated", so no failed
/// reconcile), and the Agents' cleanup still runs, so the namespace goes away.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminating_namespace_is_left_alone_and_still_goes_away() {
    let (client, home) = setup("ctl-nsdel").await;
    let doomed = TestNamespace::new(&client, "ctl-nsdel-x").await;
    let (controller, label) = shard_controller(&home.name);
    for name in ["one", "two", "three"] {
        create_agent(&client, &doomed.name, agent_manifest(name, label.clone()))
            .await
            .unwrap();
    }
    for name in ["one", "two", "three"] {
        wait_agent(
            &client,
            &doomed.name,
            name,
            Duration::from_secs(60),
            "Ready",
            ready,
        )
        .await;
    }
    let errors_before = controller
        .metric("agentry_reconcile_errors_total")
        .await
        .unwrap_or(0.0);
    Api::<Namespace>::all(client.clone())
        .delete(&doomed.name, &DeleteParams::default())
        .await
        .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    eventually_ok(Duration::from_secs(90), "namespace gone", || async {
        Ok::<bool, kube::Error>(namespaces.get_opt(&doomed.name).await?.is_none())
    })
    .await;
    let errors = controller
        .metric("agentry_reconcile_errors_total")
        .await
        .unwrap_or(0.0)
        - errors_before;
    let logs = controller.logs();
    assert!(
        errors == 0.0 && !logs.contains("being terminated"),
        "{errors} failed reconciles while the namespace was deleted: {}",
        logs.lines()
            .filter(|l| l.contains("WARN"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
