//! The backup step. `spec.backup` is accepted and validated, but this version does not run
//! backups yet: say so on the object instead of pretending. It does not hold Ready back.

use super::report::{Level, Report};
use crate::crd::Agent;
use crate::keys::{conditions::BACKUP_HEALTHY, reasons};

pub fn step(agent: &Agent) -> Report {
    let level = match &agent.spec.backup {
        Some(_) => Level::Unknown,
        None => Level::Absent,
    };
    Report::optional(
        BACKUP_HEALTHY,
        level,
        reasons::NOT_IMPLEMENTED,
        super::NOT_YET,
    )
}
