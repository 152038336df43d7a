//! The admission policy that makes the 512Mi cap hold for every agent pod, whoever creates it:
//! a ValidatingAdmissionPolicy (CEL, in the apiserver, no webhook) and its binding. Pods
//! labelled `agentry.dev/agent` must give every container and init container (sidecars included)
//! a memory limit greater than zero (`0` means unlimited), adding up to 512Mi. The policy checks
//! CREATE and UPDATE of pods and of the `pods/resize` subresource, so an in-place resize cannot
//! lift a pod above the cap either. Ephemeral containers cannot declare resources and run inside
//! the pod's memory cgroup, which these limits bound, so they need no rule.

use k8s_openapi::api::admissionregistration::v1::{
    MatchResources, NamedRuleWithOperations, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicyBindingSpec,
    ValidatingAdmissionPolicySpec, Validation, Variable,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::ObjectMeta;

use super::AGENT_LABEL;
use crate::crd::units::MEMORY_CAP_BYTES;

pub const POLICY_NAME: &str = "agentry-agent-pod-memory";

pub fn memory_policy() -> ValidatingAdmissionPolicy {
    let has_limit = "has(c.resources) && has(c.resources.limits) && 'memory' in c.resources.limits \
         && isQuantity(c.resources.limits.memory) \
         && quantity(c.resources.limits.memory).isGreaterThan(quantity('0'))";
    ValidatingAdmissionPolicy {
        metadata: ObjectMeta {
            name: Some(POLICY_NAME.into()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "agentry".to_string())].into()),
            ..Default::default()
        },
        spec: Some(ValidatingAdmissionPolicySpec {
            failure_policy: Some("Fail".into()),
            match_constraints: Some(MatchResources {
                object_selector: Some(LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: AGENT_LABEL.into(),
                        operator: "Exists".into(),
                        values: None,
                    }]),
                    ..Default::default()
                }),
                resource_rules: Some(vec![NamedRuleWithOperations {
                    api_groups: Some(vec!["".into()]),
                    api_versions: Some(vec!["v1".into()]),
                    operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
                    resources: Some(vec!["pods".into(), "pods/resize".into()]),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            variables: Some(vec![
                Variable {
                    name: "containers".into(),
                    expression: "object.spec.containers + (has(object.spec.initContainers) ? object.spec.initContainers : [])".into(),
                },
                Variable {
                    name: "unlimited".into(),
                    expression: format!("variables.containers.filter(c, !({has_limit})).map(c, c.name)"),
                },
            ]),
            validations: Some(vec![
                Validation {
                    expression: "size(variables.unlimited) == 0".into(),
                    message_expression: Some(
                        "'agent pod: container(s) ' + variables.unlimited.join(', ') + ' have no memory limit greater than 0 (a missing or 0 limit means unlimited); set resources.limits.memory on every container and init container of a pod labelled agentry.dev/agent, 512Mi in total at most'".into(),
                    ),
                    reason: Some("Invalid".into()),
                    ..Default::default()
                },
                Validation {
                    expression: format!(
                        "size(variables.unlimited) != 0 || variables.containers.map(c, quantity(c.resources.limits.memory).asApproximateFloat()).sum() <= {MEMORY_CAP_BYTES}.0"
                    ),
                    message_expression: Some(
                        "'agent pod: the memory limits of its containers (' + variables.containers.map(c, c.name + '=' + c.resources.limits.memory).join(', ') + ') add up to more than the 512Mi cap; lower them'".into(),
                    ),
                    reason: Some("Invalid".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn memory_policy_binding() -> ValidatingAdmissionPolicyBinding {
    ValidatingAdmissionPolicyBinding {
        metadata: ObjectMeta {
            name: Some(POLICY_NAME.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/part-of".to_string(),
                    "agentry".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(ValidatingAdmissionPolicyBindingSpec {
            policy_name: Some(POLICY_NAME.into()),
            validation_actions: Some(vec!["Deny".into()]),
            ..Default::default()
        }),
    }
}
