//! Errors of one reconcile: one variant per step, each carrying the step's own error with its
//! source. `kind` labels metrics, `is_permanent` (decided by the step) chooses between waiting
//! for a change and retrying with backoff, `report` is the condition the failure leaves.

use super::agent::credentials::IdentityError;
use super::agent::report::Report;
use super::agent::rollout::WorkloadError;

/// An object of the Agent's name exists and was not created by it: it is never taken over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{kind} {name} already exists and was not created by this Agent; it is left untouched: \
     rename the Agent, or delete the {kind} if it is no longer needed"
)]
pub struct NameConflict {
    pub kind: String,
    pub name: String,
}

/// The apiserver refused what we sent as invalid (400, 422): retrying the same request cannot
/// help until someone changes the object.
pub fn refused_as_invalid(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 400 || s.code == 422)
}

impl NameConflict {
    pub fn new(kind: &str, name: &str) -> Self {
        Self {
            kind: kind.to_string(),
            name: name.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("workload: {0}")]
    Workload(#[from] WorkloadError),
    #[error("writing the status: {0}")]
    Status(#[source] kube::Error),
    #[error("putting the finalizer and discovery labels on the Agent: {0}")]
    Metadata(#[source] kube::Error),
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("object has no namespace")]
    MissingNamespace,
    #[error("messaging: removing the Agent's Redis user and streams: {0}")]
    Messaging(String),
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Identity(IdentityError::NameConflict(_))
            | Error::Workload(WorkloadError::NameConflict(_)) => "name_conflict",
            Error::Identity(_) => "identity",
            Error::Workload(_) => "workload",
            Error::Status(_) => "status",
            Error::Metadata(_) => "metadata",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.kind(),
                _ => "finalizer",
            },
            Error::MissingNamespace => "missing_namespace",
            Error::Messaging(_) => "messaging",
        }
    }

    /// True when retrying cannot help until someone changes the object (the apiserver refused
    /// what we built as invalid). A name conflict is retried with backoff: the conflicting
    /// object may go away, and its deletion does not trigger the Agent.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Identity(e) => e.is_permanent(),
            Error::Workload(e) => e.is_permanent(),
            Error::Status(e) | Error::Metadata(e) => refused_as_invalid(e),
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.is_permanent(),
                _ => false,
            },
            Error::MissingNamespace => true,
            Error::Messaging(_) => false,
        }
    }

    /// The condition a failed step leaves on the Agent (None: not a step's failure).
    pub fn report(&self) -> Option<Report> {
        match self {
            Error::Identity(e) => Some(e.report()),
            Error::Workload(e) => Some(e.report()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::reasons;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("x", "Invalid")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn api_validation_errors_are_permanent_others_transient() {
        for (code, permanent) in [
            (422, true),
            (400, true),
            (409, false),
            (500, false),
            (429, false),
        ] {
            assert_eq!(
                Error::from(WorkloadError::Kube(api(code))).is_permanent(),
                permanent
            );
            assert_eq!(
                Error::from(IdentityError::Kube(api(code))).is_permanent(),
                permanent
            );
        }
        let conflict = Error::from(WorkloadError::NameConflict(NameConflict::new(
            "Service", "foo",
        )));
        assert!(!conflict.is_permanent());
        assert_eq!(conflict.kind(), "name_conflict");
    }

    #[test]
    fn every_failing_step_writes_its_own_condition() {
        let cases = [
            (
                Error::from(WorkloadError::Kube(api(500))),
                "WorkloadReady",
                reasons::APPLY_FAILED,
                false,
            ),
            (
                Error::from(WorkloadError::NameConflict(NameConflict::new(
                    "Service", "foo",
                ))),
                "WorkloadReady",
                reasons::NAME_CONFLICT,
                true,
            ),
            (
                Error::from(IdentityError::Kube(api(500))),
                "CertificateIssued",
                reasons::ISSUE_FAILED,
                false,
            ),
            (
                Error::from(IdentityError::NameConflict(NameConflict::new(
                    "Secret",
                    "a-identity",
                ))),
                "CertificateIssued",
                reasons::NAME_CONFLICT,
                true,
            ),
        ];
        for (error, condition, reason, stalled) in cases {
            let report = error.report().unwrap();
            assert_eq!(report.condition, Some(condition));
            assert_eq!(report.reason, reason);
            assert_eq!(report.stalled, stalled);
            assert!(
                report.message.contains(
                    &error
                        .to_string()
                        .replace("identity: ", "")
                        .replace("workload: ", "")
                )
            );
        }
        assert!(Error::MissingNamespace.report().is_none());
    }
}
