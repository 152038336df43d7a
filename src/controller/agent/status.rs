//! The last step: derive the status from the steps' reports (a pure function, unit-tested as a
//! table) and write it with one server-side-apply patch, only when it changed.
//!
//! The health rules follow kstatus (sigs.k8s.io/cli-utils), which Argo CD and Flux read:
//! `Reconciling=True` while work is under way, `Stalled=True` when nothing will change until the
//! Agent or what it depends on changes, and `Ready` when every required part is True. Reconciling
//! and Stalled are removed when false, as Flux does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};

use super::report::{Level, Report};
use crate::controller::conditions;
use crate::controller::watched::Watched;
use crate::controller::{Context, Error, OwnWrite};
use crate::crd::{Agent, AgentStatus, AssignedResources, IdentityStatus, Phase};
use crate::keys::conditions::{READY, RECONCILING, STALLED};
use crate::keys::{MANAGER, reasons};

/// What the steps applied, for the status (None: keep what the status says).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    pub identity: Option<IdentityStatus>,
    pub assigned_resources: Option<AssignedResources>,
    pub endpoint: Option<String>,
    /// Where the API serves the agent's card (None: no API).
    pub agent_card_url: Option<String>,
    /// Some: set `status.messaging` to this (Some(None) clears it).
    pub messaging: Option<Option<crate::crd::MessagingStatus>>,
}

/// The status after a pass (pure): `previous` as stored, this pass's `reports` in pipeline order.
pub fn compute(
    previous: Option<&AgentStatus>,
    generation: Option<i64>,
    reports: &[Report],
    facts: Facts,
) -> AgentStatus {
    let mut s = previous.cloned().unwrap_or_default();
    s.observed_generation = generation;
    for r in reports {
        if let Some(type_) = r.condition {
            set(
                &mut s.conditions,
                type_,
                r.level,
                r.reason,
                &r.message,
                generation,
            );
        }
    }
    if let Some(identity) = facts.identity {
        s.identity = Some(identity);
    }
    if let Some(assigned) = facts.assigned_resources {
        s.assigned_resources = Some(assigned);
    }
    if let Some(endpoint) = facts.endpoint {
        s.endpoint = Some(endpoint);
    }
    if facts.agent_card_url.is_some() {
        s.agent_card_url = facts.agent_card_url;
    }
    if let Some(messaging) = facts.messaging {
        s.messaging = messaging;
    }
    if !reports.is_empty() {
        health(&mut s, reports, generation);
    }
    s
}

fn set(
    list: &mut Vec<Condition>,
    type_: &str,
    level: Level,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    match level {
        Level::True => conditions::upsert(list, type_, true, reason, message, generation),
        Level::False => conditions::upsert(list, type_, false, reason, message, generation),
        Level::Unknown => conditions::unknown(list, type_, reason, message, generation),
        Level::Absent => conditions::remove(list, type_),
    }
}

/// Ready, Reconciling, Stalled and the phase, from the first stalled or unready required part.
fn health(s: &mut AgentStatus, reports: &[Report], generation: Option<i64>) {
    let stalled = reports.iter().find(|r| r.stalled);
    let blocking = reports
        .iter()
        .find(|r| r.required && r.level != Level::True);
    let was_up = matches!(s.phase, Some(Phase::Ready | Phase::Degraded));
    let (ready, reconciling, stall, phase) = match (stalled, blocking) {
        (Some(r), _) => (r.into(), None, Some(r), Phase::Failed),
        (None, Some(r)) => {
            let phase = if was_up {
                Phase::Degraded
            } else {
                Phase::Provisioning
            };
            (r.into(), Some(r), None, phase)
        }
        (None, None) => (Verdict::READY, None, None, Phase::Ready),
    };
    let list = &mut s.conditions;
    set(
        list,
        READY,
        ready.level,
        ready.reason,
        ready.message,
        generation,
    );
    match reconciling {
        Some(r) => set(
            list,
            RECONCILING,
            Level::True,
            r.reason,
            &r.message,
            generation,
        ),
        None => conditions::remove(list, RECONCILING),
    }
    match stall {
        Some(r) => set(list, STALLED, Level::True, r.reason, &r.message, generation),
        None => conditions::remove(list, STALLED),
    }
    s.phase = Some(phase);
}

/// What Ready says.
struct Verdict<'a> {
    level: Level,
    reason: &'a str,
    message: &'a str,
}

impl Verdict<'_> {
    const READY: Verdict<'static> = Verdict {
        level: Level::True,
        reason: reasons::READY,
        message: "identity issued and workload available",
    };
}

impl<'a> From<&'a Report> for Verdict<'a> {
    fn from(r: &'a Report) -> Self {
        Verdict {
            level: Level::False,
            reason: r.reason,
            message: &r.message,
        }
    }
}

/// Writes `status` with one server-side-apply patch, unless it equals what is stored.
pub async fn write(ctx: &Context, agent: &Agent, status: AgentStatus) -> Result<(), Error> {
    if agent.status.as_ref() == Some(&status) || ctx.in_flight(OwnWrite::Status, agent, &status) {
        return Ok(());
    }
    let ns = agent.namespace().ok_or(Error::MissingNamespace)?;
    // The answer is not read: decoded as `Watched`, its managedFields are skipped unread.
    let api: Api<Watched> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": Agent::api_version(&()),
        "kind": Agent::kind(&()),
        "status": reconciler_owned(status.clone(), ctx.config.backup.is_some()),
    });
    api.patch_status(
        &agent.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Status)?;
    ctx.wrote(OwnWrite::Status, agent, &status);
    Ok(())
}

/// The status without what others own: `registration` and the `Registered` condition (the
/// API, field manager `agentry-api`) and, when the backup manager runs, `backup` and the
/// `BackupHealthy` condition (field manager `agentry-backup`). The reconciler never applies
/// them, so it can neither take them over nor write back a stale copy.
pub fn reconciler_owned(mut status: AgentStatus, backups_managed: bool) -> AgentStatus {
    use crate::keys::conditions::{BACKUP_HEALTHY, REGISTERED};
    status.registration = None;
    status.conditions.retain(|c| c.type_ != REGISTERED);
    if backups_managed {
        status.backup = None;
        status.conditions.retain(|c| c.type_ != BACKUP_HEALTHY);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::conditions::{
        CERTIFICATE_ISSUED, MESSAGING_READY, TOKEN_ISSUED, WORKLOAD_READY,
    };

    fn issued() -> Vec<Report> {
        vec![
            Report::ok(CERTIFICATE_ISSUED, reasons::ISSUED, "certificate"),
            Report::ok(TOKEN_ISSUED, reasons::ISSUED, "token"),
        ]
    }

    fn get<'a>(s: &'a AgentStatus, type_: &str) -> Option<(&'a str, &'a str)> {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.as_str(), c.reason.as_str()))
    }

    fn previous(phase: Phase) -> AgentStatus {
        AgentStatus {
            phase: Some(phase),
            ..Default::default()
        }
    }

    /// (case, previous phase, reports) -> (phase, Ready, Reconciling reason, Stalled reason)
    type Row = (
        &'static str,
        Option<Phase>,
        Vec<Report>,
        Phase,
        (&'static str, &'static str),
        Option<&'static str>,
        Option<&'static str>,
    );

    fn health_table() -> Vec<Row> {
        let available = Report::ok(WORKLOAD_READY, reasons::AVAILABLE, "1/1");
        let rolling = Report::pending(WORKLOAD_READY, reasons::ROLLING_OUT, "0/1");
        let conflict = Report::stalled(Some(WORKLOAD_READY), reasons::NAME_CONFLICT, "Service foo");
        let invalid = Report::stalled(None, reasons::INVALID_SPEC, "spec.resources.memory");
        let issue_failed = Report::pending(CERTIFICATE_ISSUED, reasons::ISSUE_FAILED, "ledger");
        let messaging = Report::optional(
            MESSAGING_READY,
            Level::Unknown,
            reasons::NOT_IMPLEMENTED,
            "later",
        );
        let with = |extra: Vec<Report>| issued().into_iter().chain(extra).collect::<Vec<_>>();
        vec![
            (
                "all good",
                None,
                with(vec![available.clone()]),
                Phase::Ready,
                ("True", "Ready"),
                None,
                None,
            ),
            (
                "optional parts do not hold Ready back",
                None,
                with(vec![available.clone(), messaging]),
                Phase::Ready,
                ("True", "Ready"),
                None,
                None,
            ),
            (
                "rolling out on the way up",
                None,
                with(vec![rolling.clone()]),
                Phase::Provisioning,
                ("False", "RollingOut"),
                Some("RollingOut"),
                None,
            ),
            (
                "rolling out after Ready",
                Some(Phase::Ready),
                with(vec![rolling]),
                Phase::Degraded,
                ("False", "RollingOut"),
                Some("RollingOut"),
                None,
            ),
            (
                "identity failing",
                Some(Phase::Ready),
                vec![issue_failed],
                Phase::Degraded,
                ("False", "IssueFailed"),
                Some("IssueFailed"),
                None,
            ),
            (
                "name conflict",
                None,
                with(vec![conflict]),
                Phase::Failed,
                ("False", "NameConflict"),
                None,
                Some("NameConflict"),
            ),
            (
                "invalid spec",
                Some(Phase::Ready),
                vec![invalid],
                Phase::Failed,
                ("False", "InvalidSpec"),
                None,
                Some("InvalidSpec"),
            ),
        ]
    }

    #[test]
    fn health_follows_the_reports() {
        for (case, prev, reports, phase, ready, reconciling, stalled) in health_table() {
            let prev = prev.map(previous);
            let s = compute(prev.as_ref(), Some(3), &reports, Facts::default());
            assert_eq!(s.phase, Some(phase), "{case}");
            assert_eq!(get(&s, READY), Some(ready), "{case}");
            assert_eq!(get(&s, RECONCILING).map(|c| c.1), reconciling, "{case}");
            assert_eq!(
                get(&s, RECONCILING).map(|c| c.0),
                reconciling.map(|_| "True"),
                "{case}"
            );
            assert_eq!(get(&s, STALLED).map(|c| c.1), stalled, "{case}");
            assert_eq!(s.observed_generation, Some(3), "{case}");
            assert!(
                s.conditions
                    .iter()
                    .all(|c| c.observed_generation == Some(3)),
                "{case}"
            );
        }
    }

    #[test]
    fn recovery_clears_stalled_and_reconciling_and_keeps_facts() {
        let stalled = compute(
            None,
            Some(1),
            &[Report::stalled(None, reasons::PERMISSION_DENIED, "x")],
            Facts::default(),
        );
        assert_eq!(get(&stalled, STALLED), Some(("True", "PermissionDenied")));
        let reports = issued()
            .into_iter()
            .chain([Report::ok(WORKLOAD_READY, reasons::AVAILABLE, "1/1")])
            .collect::<Vec<_>>();
        let facts = Facts {
            endpoint: Some("a.b.svc:8080".into()),
            ..Default::default()
        };
        let ready = compute(Some(&stalled), Some(2), &reports, facts);
        assert_eq!(get(&ready, STALLED), None);
        assert_eq!(get(&ready, RECONCILING), None);
        assert_eq!(ready.endpoint.as_deref(), Some("a.b.svc:8080"));
        // A later pass without facts keeps them.
        let again = compute(Some(&ready), Some(2), &reports, Facts::default());
        assert_eq!(
            again, ready,
            "an unchanged pass computes an unchanged status"
        );
        // A disabled part's condition goes away.
        let mut with_messaging = reports.clone();
        with_messaging.push(Report::optional(
            MESSAGING_READY,
            Level::Unknown,
            reasons::NOT_IMPLEMENTED,
            "later",
        ));
        let on = compute(Some(&ready), Some(3), &with_messaging, Facts::default());
        assert_eq!(
            get(&on, MESSAGING_READY),
            Some(("Unknown", "NotImplemented"))
        );
        with_messaging.pop();
        with_messaging.push(Report::optional(
            MESSAGING_READY,
            Level::Absent,
            reasons::NOT_IMPLEMENTED,
            "",
        ));
        let off = compute(Some(&on), Some(4), &with_messaging, Facts::default());
        assert_eq!(get(&off, MESSAGING_READY), None);
    }
}
