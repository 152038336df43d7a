//! Who may message whom. A message from S to R is delivered only when S's `allowTo` admits R
//! and R's `allowFrom` admits S. Unset lists mean "the Agents of my own namespace"; an empty
//! list means nobody. So crossing namespaces takes the consent of both sides.

use crate::crd::{MessagingSpec, PeerSelector};

/// What the policy needs to know of one Agent.
#[derive(Clone, Debug)]
pub struct Peer {
    pub namespace: String,
    pub name: String,
    pub spiffe_id: String,
    pub capabilities: Vec<String>,
    pub messaging: MessagingSpec,
}

impl Peer {
    pub fn reference(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn admits(own_namespace: &str, selectors: Option<&[PeerSelector]>, other: &Peer) -> bool {
    let Some(selectors) = selectors else {
        return other.namespace == own_namespace;
    };
    selectors.iter().any(|s| {
        let namespace = if s.namespaces.is_empty() {
            other.namespace == own_namespace
        } else {
            s.namespaces
                .iter()
                .any(|n| n == "*" || *n == other.namespace)
        };
        let capability = s.capabilities.is_empty()
            || s.capabilities
                .iter()
                .any(|c| other.capabilities.contains(c));
        namespace && capability
    })
}

/// Ok when `from` may send to `to`; otherwise which side refuses, and how to allow it.
pub fn check(from: &Peer, to: &Peer) -> Result<(), String> {
    if !admits(&from.namespace, from.messaging.allow_to.as_deref(), to) {
        return Err(format!(
            "{} may not send to {} (its spec.messaging.allowTo does not include it{})",
            from.reference(),
            to.reference(),
            if from.messaging.allow_to.is_none() {
                "; by default only its own namespace"
            } else {
                ""
            }
        ));
    }
    if !admits(&to.namespace, to.messaging.allow_from.as_deref(), from) {
        return Err(format!(
            "{} does not accept messages from {} (its spec.messaging.allowFrom does not include it{})",
            to.reference(),
            from.reference(),
            if to.messaging.allow_from.is_none() {
                "; by default only its own namespace"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ns: &str, name: &str, caps: &[&str]) -> Peer {
        Peer {
            namespace: ns.into(),
            name: name.into(),
            spiffe_id: format!("spiffe://t/ns/{ns}/agent/{name}"),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            messaging: MessagingSpec {
                enabled: true,
                max_len: 10,
                allow_to: None,
                allow_from: None,
            },
        }
    }

    fn sel(namespaces: &[&str], caps: &[&str]) -> PeerSelector {
        PeerSelector {
            namespaces: namespaces.iter().map(|c| c.to_string()).collect(),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn same_namespace_by_default_and_both_sides_must_agree_across() {
        let a = peer("team-a", "a", &["plan"]);
        let a2 = peer("team-a", "a2", &[]);
        let mut b = peer("team-b", "b", &["summarize"]);
        assert!(check(&a, &a2).is_ok());
        assert!(check(&a, &a).is_ok(), "an agent may message itself");
        let e = check(&a, &b).unwrap_err();
        assert!(e.contains("allowTo") && e.contains("by default"), "{e}");
        let mut a_open = a.clone();
        a_open.messaging.allow_to = Some(vec![sel(&["team-b"], &[])]);
        let e = check(&a_open, &b).unwrap_err();
        assert!(
            e.contains("team-b/b does not accept") && e.contains("allowFrom"),
            "{e}"
        );
        b.messaging.allow_from = Some(vec![sel(&["*"], &["plan"])]);
        assert!(check(&a_open, &b).is_ok());
        // The capability selector narrows: a2 has no "plan".
        let mut a2_open = a2.clone();
        a2_open.messaging.allow_to = Some(vec![sel(&["*"], &[])]);
        assert!(check(&a2_open, &b).is_err());
        // allowFrom narrowing b's own namespace: b accepts only "plan" agents, even at home.
        let b2 = peer("team-b", "b2", &[]);
        assert!(check(&b2, &b).is_err());
        // An empty list: nobody.
        let mut closed = a2.clone();
        closed.messaging.allow_from = Some(vec![]);
        assert!(check(&a, &closed).is_err());
        // A selector with no namespaces means the owner's namespace.
        let mut home_planners = a2.clone();
        home_planners.messaging.allow_from = Some(vec![sel(&[], &["plan"])]);
        assert!(check(&a, &home_planners).is_ok());
        assert!(check(&peer("team-a", "x", &[]), &home_planners).is_err());
    }
}
