//! The Helm chart: it lints and renders, and its RBAC is enough for the controller and no more.
//! The controller runs here impersonating the chart's ServiceAccount, so every API call it makes
//! is checked against the chart's Roles by the real apiserver.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use agentry::crd::Agent;

fn helm(args: &[&str]) -> String {
    let out = Command::new(tool_dir().join("helm"))
        .args(args)
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn chart_rbac_is_sufficient_and_least_privilege() {
    let (client, ns) = setup("chart-rbac").await;
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/agentry");
    helm(&["lint", chart]);
    let rendered = helm(&[
        "template",
        "agentry",
        chart,
        "--namespace",
        &ns.name,
        "--set",
        &format!("watchNamespaces={{{}}}", ns.name),
        "--set",
        "admissionPolicy.enabled=false",
    ]);
    // No wildcards anywhere in the RBAC.
    for line in rendered
        .lines()
        .filter(|l| l.contains("verbs") || l.contains("resources") || l.contains("apiGroups"))
    {
        assert!(!line.contains('*'), "wildcard in RBAC: {line}");
    }
    // Apply the ServiceAccount and RBAC objects (the controller itself runs as a local process).
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&rendered).unwrap();
    let mut kinds = Vec::new();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = doc["kind"].as_str().unwrap().to_string();
        if !["ServiceAccount", "Role", "RoleBinding"].contains(&kind.as_str()) {
            continue;
        }
        let obj: kube::api::DynamicObject = serde_json::from_value(doc.clone()).unwrap();
        let (group, version) = match obj.types.as_ref().unwrap().api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (
                String::new(),
                obj.types.as_ref().unwrap().api_version.clone(),
            ),
        };
        let gvk = kube::api::GroupVersionKind::gvk(&group, &version, &kind);
        let (ar, _) = kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client.clone(), &ns.name, &ar);
        let name = obj.metadata.name.clone().unwrap();
        api.patch(
            &name,
            &PatchParams::apply("agentry-e2e").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap();
        kinds.push(kind);
    }
    assert!(
        kinds.contains(&"ServiceAccount".to_string())
            && kinds.iter().filter(|k| *k == "Role").count() == 2
    );

    // The controller, as the chart's ServiceAccount.
    let sa = format!("system:serviceaccount:{}:agentry", ns.name);
    let groups = [
        "system:serviceaccounts",
        &format!("system:serviceaccounts:{}", ns.name),
        "system:authenticated",
    ];
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = impersonating_kubeconfig(dir.path(), &sa, &groups);
    let mut opts = ControllerOptions::new(&ns.name);
    opts.kubeconfig = Some(&kubeconfig);
    let controller = ControllerProcess::start(opts);
    create_agent(&client, &ns.name, agent_manifest("rbac", json!({})))
        .await
        .unwrap();
    let ready = |a: &Agent| condition(a, "Ready").is_some_and(|c| c.status == "True");
    let agent = wait_agent(
        &client,
        &ns.name,
        "rbac",
        Duration::from_secs(60),
        "Ready under the chart's RBAC",
        ready,
    )
    .await;
    assert!(
        condition(&agent, "CertificateIssued").is_some_and(|c| c.status == "True"),
        "{}",
        controller.logs()
    );
    assert!(
        !controller.logs().contains("403"),
        "forbidden calls:\n{}",
        controller.logs()
    );

    // ... and no more: the same identity cannot read Secrets elsewhere or list them cluster-wide.
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let limited = Client::try_from(config).unwrap();
    let forbidden =
        |r: Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.code == 403);
    assert!(forbidden(
        Api::<Secret>::namespaced(limited.clone(), "kube-system")
            .list(&Default::default())
            .await
            .map(|_| ())
    ));
    assert!(forbidden(
        Api::<Secret>::all(limited.clone())
            .list(&Default::default())
            .await
            .map(|_| ())
    ));
    assert!(forbidden(
        Api::<Secret>::namespaced(limited.clone(), "default")
            .get("anything")
            .await
            .map(|_| ())
    ));
    // In its own namespace it may create Secrets, but read only the two it owns by name.
    let other = Api::<Secret>::namespaced(limited, &ns.name)
        .get("not-ours")
        .await
        .map(|_| ());
    assert!(
        matches!(other, Err(kube::Error::Api(ref s)) if s.code == 404 || s.code == 403),
        "{other:?}"
    );
}
