//! Which permissions (JWT scopes) the Agents of a namespace may request: the namespace's
//! `agentry.dev/allowed-permissions` annotation. Tenants who may write Agents usually may not
//! edit their Namespace, so the cluster operator decides what each tenant's agents can hold.
//!
//! Without the annotation a namespace gets [`DEFAULT_ALLOWED`] (`backup:write`, `memory:read`).
//! The annotation lists permissions separated by commas or spaces, or `*` for every permission.
//! An annotation that does not parse allows nothing (fail closed) and says why.

use std::collections::BTreeSet;

use crate::crd::Permission;

pub use crate::keys::ALLOWED_PERMISSIONS_ANNOTATION;

/// What a namespace without the annotation allows.
pub const DEFAULT_ALLOWED: [Permission; 2] = [Permission::BackupWrite, Permission::MemoryRead];

/// Why an Agent's permissions are refused. The message names the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "spec.permissions: {} not allowed in namespace {namespace} (allowed: [{}]); remove them, or \
         have a cluster operator add them to the namespace annotation {ALLOWED_PERMISSIONS_ANNOTATION}",
        join(.refused), join(.allowed)
    )]
    Refused {
        namespace: String,
        refused: Vec<Permission>,
        allowed: Vec<Permission>,
    },
    #[error(
        "namespace {namespace} annotation {ALLOWED_PERMISSIONS_ANNOTATION}: {entry:?} is not a \
         permission (one of: {}; or *); no permission is allowed until it is fixed",
        join(&ALL)
    )]
    BadAnnotation { namespace: String, entry: String },
}

const ALL: [Permission; 7] = [
    Permission::BackupWrite,
    Permission::BackupRead,
    Permission::MemoryRead,
    Permission::MemoryWrite,
    Permission::MessagesSend,
    Permission::MessagesRead,
    Permission::AgentsDiscover,
];

fn join(p: &[Permission]) -> String {
    p.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
}

fn parse_permission(s: &str) -> Option<Permission> {
    ALL.into_iter().find(|p| p.as_str() == s)
}

/// The permissions a namespace allows, from its annotation (None: the default).
pub fn allowed(
    namespace: &str,
    annotation: Option<&str>,
) -> Result<BTreeSet<Permission>, PolicyError> {
    let Some(value) = annotation else {
        return Ok(DEFAULT_ALLOWED.into_iter().collect());
    };
    let mut out = BTreeSet::new();
    for entry in value
        .split([',', ' ', '\n', '\t'])
        .filter(|e| !e.is_empty())
    {
        if entry == "*" {
            out.extend(ALL);
            continue;
        }
        let p = parse_permission(entry).ok_or_else(|| PolicyError::BadAnnotation {
            namespace: namespace.to_string(),
            entry: entry.chars().take(64).collect(),
        })?;
        out.insert(p);
    }
    Ok(out)
}

/// Checks an Agent's requested permissions against its namespace's policy.
pub fn check(
    namespace: &str,
    annotation: Option<&str>,
    requested: &[Permission],
) -> Result<(), PolicyError> {
    let allowed = allowed(namespace, annotation)?;
    let refused: BTreeSet<Permission> = requested
        .iter()
        .copied()
        .filter(|p| !allowed.contains(p))
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(PolicyError::Refused {
        namespace: namespace.to_string(),
        refused: refused.into_iter().collect(),
        allowed: allowed.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Permission::*;

    #[test]
    fn the_default_allows_backup_write_and_memory_read_only() {
        assert_eq!(check("t", None, &[BackupWrite, MemoryRead]), Ok(()));
        let err = check("t", None, &[MemoryRead, MemoryWrite, AgentsDiscover]).unwrap_err();
        assert_eq!(
            err,
            PolicyError::Refused {
                namespace: "t".into(),
                refused: vec![MemoryWrite, AgentsDiscover],
                allowed: vec![BackupWrite, MemoryRead],
            }
        );
        let message = err.to_string();
        assert!(message.starts_with(
            "spec.permissions: memory:write, agents:discover not allowed in namespace t"
        ));
        assert!(message.contains(ALLOWED_PERMISSIONS_ANNOTATION));
    }

    #[test]
    fn the_annotation_widens_narrows_or_opens_everything() {
        let a = Some("agents:discover, messages:send messages:read");
        assert_eq!(check("t", a, &[AgentsDiscover, MessagesRead]), Ok(()));
        assert!(check("t", a, &[BackupWrite]).is_err(), "narrowed");
        assert_eq!(check("t", Some(""), &[]), Ok(()));
        assert!(
            check("t", Some(""), &[MemoryRead]).is_err(),
            "empty allows nothing"
        );
        assert_eq!(check("t", Some("*"), &ALL), Ok(()));
    }

    #[test]
    fn a_bad_annotation_allows_nothing_and_names_the_entry() {
        let err = check("t", Some("memory:read, root:all"), &[MemoryRead]).unwrap_err();
        assert_eq!(
            err,
            PolicyError::BadAnnotation {
                namespace: "t".into(),
                entry: "root:all".into()
            }
        );
        assert!(err.to_string().contains("\"root:all\" is not a permission"));
    }
}
