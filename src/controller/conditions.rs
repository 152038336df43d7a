//! Status conditions: one entry per type, with reason and message, whose lastTransitionTime only
//! moves when the status flips (so an unchanged reconcile writes an unchanged status).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const CERTIFICATE_ISSUED: &str = "CertificateIssued";
pub const TOKEN_ISSUED: &str = "TokenIssued";
pub const WORKLOAD_READY: &str = "WorkloadReady";
pub const MESSAGING_READY: &str = "MessagingReady";
pub const BACKUP_HEALTHY: &str = "BackupHealthy";

/// Sets (or adds) the condition of `type_`, keeping its transition time when the status is unchanged.
pub fn upsert(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" };
    set(
        conditions,
        type_,
        status,
        reason,
        message.into(),
        generation,
    );
}

/// Sets the condition of `type_` to Unknown: the controller cannot tell (yet).
pub fn unknown(
    conditions: &mut Vec<Condition>,
    type_: &str,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    set(
        conditions,
        type_,
        "Unknown",
        reason,
        message.into(),
        generation,
    );
}

/// Drops the condition of `type_` (the part it describes is not enabled).
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
) {
    let status = status.to_string();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(Timestamp::now());
            }
            c.status = status;
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: Time(Timestamp::now()),
        }),
    }
}

/// Whether the condition of `type_` is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_flip() {
        let mut c = Vec::new();
        upsert(&mut c, READY, false, "Provisioning", "waiting", Some(1));
        let first = c[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        upsert(
            &mut c,
            READY,
            false,
            "Provisioning",
            "still waiting",
            Some(2),
        );
        assert_eq!(c[0].last_transition_time, first);
        assert_eq!(c[0].message, "still waiting");
        assert_eq!(c[0].observed_generation, Some(2));
        upsert(&mut c, READY, true, "Ready", "ok", Some(2));
        assert_ne!(c[0].last_transition_time, first);
        assert_eq!(c.len(), 1);
        assert!(is_true(&c, READY));
        assert!(!is_true(&c, WORKLOAD_READY));
    }
}
