//! The messaging step. `spec.messaging` is accepted and validated, but this version does not
//! create inboxes yet: say so on the object instead of pretending. It does not hold Ready back.

use super::report::{Level, Report};
use crate::crd::Agent;
use crate::keys::{conditions::MESSAGING_READY, reasons};

pub fn step(agent: &Agent) -> Report {
    let level = match &agent.spec.messaging {
        Some(m) if m.enabled => Level::Unknown,
        _ => Level::Absent,
    };
    Report::optional(
        MESSAGING_READY,
        level,
        reasons::NOT_IMPLEMENTED,
        super::NOT_YET,
    )
}
