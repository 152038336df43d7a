//! The first step: checks the apiserver may have missed (objects stored before a rule existed,
//! an out-of-date CRD) and the namespace's permission policy, before anything is issued. A
//! failure stalls the Agent until it, or its namespace's policy, changes.

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::report::Report;
use crate::controller::Context;
use crate::crd::{self, Agent, ValidatedSpec};
use crate::identity::scopes;
use crate::keys::{ALLOWED_PERMISSIONS_ANNOTATION, reasons};

pub fn step(agent: &Agent, ctx: &Context) -> Result<ValidatedSpec, Report> {
    let invalid = |e: crate::crd::SpecError| {
        Report::stalled(
            None,
            reasons::INVALID_SPEC,
            format!("{e}; edit the Agent to fix it"),
        )
    };
    let name = agent.name_any();
    crd::validate_name(&name).map_err(invalid)?;
    let spec = agent.spec.validate().map_err(invalid)?;
    crd::validate_env_refs(&name, &agent.spec).map_err(invalid)?;
    let ns = agent.namespace().unwrap_or_default();
    let cached = ctx.stores.namespaces.get(&ObjectRef::new(&ns));
    let annotation = cached
        .as_ref()
        .and_then(|n| n.metadata.annotations.as_ref())
        .and_then(|a| a.get(ALLOWED_PERMISSIONS_ANNOTATION))
        .map(String::as_str);
    scopes::check(&ns, annotation, &agent.spec.permissions)
        .map_err(|e| Report::stalled(None, reasons::PERMISSION_DENIED, e.to_string()))?;
    Ok(spec)
}
