//! The backup step, for a controller run without the backup manager (no agent API): `spec.backup`
//! is accepted and validated, but nothing can carry the data, so say so on the object instead
//! of pretending. With the API, the backup manager (`controller::backups`) owns `status.backup`
//! and `BackupHealthy`. It does not hold Ready back.

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
        "backups are carried by the agent API; this controller runs without it (--api-addr \"\")",
    )
}
