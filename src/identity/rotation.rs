//! CA rotation in three steps, like SPIRE's prepare/activate/retire, driven by the CA Secret:
//!
//! 1. `agentry ca rotate` annotates the Secret `agentry.dev/rotate=requested`.
//! 2. prepare: the leader generates the next CA (`next.crt`/`next.key`); `ca.crt` holds both,
//!    and every agent's Secret gets the two-CA bundle.
//! 3. activate, one overlap later: the next CA signs (`tls.crt`/`tls.key`), the old one moves
//!    to `previous.*` and stays trusted; every leaf is re-issued by the new CA.
//! 4. retire, once no active leaf of the old CA remains and an overlap has passed: the old CA
//!    leaves the bundle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::ca::{CaError, CertificateAuthority};

pub const ROTATE_ANNOTATION: &str = "agentry.dev/rotate";
pub const PHASE_ANNOTATION: &str = "agentry.dev/rotation-phase";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// The next CA exists and is trusted; the current one still signs. Since (unix seconds).
    Prepared(i64),
    /// The new CA signs; the previous one is still trusted. Since (unix seconds).
    Activated(i64),
}

impl Phase {
    pub fn parse(s: Option<&str>) -> Self {
        let Some((name, at)) = s.and_then(|s| s.split_once(':')) else {
            return Phase::Idle;
        };
        let at = at.parse().unwrap_or(0);
        match name {
            "prepared" => Phase::Prepared(at),
            "activated" => Phase::Activated(at),
            _ => Phase::Idle,
        }
    }
    /// The phase recorded on the CA Secret.
    pub fn of(secret: &Secret) -> Self {
        Self::parse(
            secret
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PHASE_ANNOTATION))
                .map(String::as_str),
        )
    }

    pub fn render(self) -> Option<String> {
        match self {
            Phase::Idle => None,
            Phase::Prepared(at) => Some(format!("prepared:{at}")),
            Phase::Activated(at) => Some(format!("activated:{at}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Prepare,
    Activate,
    Retire,
}

/// What to do next (pure): `old_leaves` is how many active certificates the previous CA signed.
pub fn next_step(
    phase: Phase,
    requested: bool,
    now: i64,
    overlap: Duration,
    old_leaves: usize,
) -> Option<Step> {
    let overlap = overlap.as_secs() as i64;
    match phase {
        Phase::Idle if requested => Some(Step::Prepare),
        Phase::Prepared(at) if now - at >= overlap => Some(Step::Activate),
        Phase::Activated(at) if now - at >= overlap && old_leaves == 0 => Some(Step::Retire),
        _ => None,
    }
}

/// The CAs in play: the one that signs, and those trusted beside it during a rotation.
#[derive(Clone)]
pub struct CaSet {
    pub active: Arc<CertificateAuthority>,
    pub next: Option<Arc<CertificateAuthority>>,
    pub previous: Option<Arc<CertificateAuthority>>,
    pub phase: Phase,
}

impl CaSet {
    /// `ca.crt` for agents: the active CA first, then the others trusted during a rotation.
    pub fn bundle(&self) -> String {
        let mut out = self.active.cert_pem().to_string();
        for other in self.next.iter().chain(self.previous.iter()) {
            out.push_str(other.cert_pem());
        }
        out
    }

    /// Reads the set from the CA Secret's data and annotations.
    pub fn from_secret(secret: &Secret) -> Result<Self, CaSetError> {
        let get = |k: &'static str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(k))
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        let pair = |crt: &'static str,
                    key: &'static str|
         -> Result<Option<Arc<CertificateAuthority>>, CaSetError> {
            match (get(crt), get(key)) {
                (Some(c), Some(k)) => Ok(Some(Arc::new(
                    CertificateAuthority::from_pem(&c, &k)
                        .map_err(|e| CaSetError::Invalid(crt, e))?,
                ))),
                _ => Ok(None),
            }
        };
        let active = pair("tls.crt", "tls.key")?.ok_or(CaSetError::Missing)?;
        let phase = Phase::of(secret);
        Ok(Self {
            active,
            next: pair("next.crt", "next.key")?,
            previous: pair("previous.crt", "previous.key")?,
            phase,
        })
    }

    /// The Secret data for this set.
    pub fn secret_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
        };
        put("tls.crt", self.active.cert_pem());
        put("tls.key", self.active.key_pem());
        put("ca.crt", &self.bundle());
        if let Some(n) = &self.next {
            put("next.crt", n.cert_pem());
            put("next.key", n.key_pem());
        }
        if let Some(p) = &self.previous {
            put("previous.crt", p.cert_pem());
            put("previous.key", p.key_pem());
        }
        data
    }

    /// Applies one step (pure apart from key generation for `Prepare`).
    pub fn apply(
        &self,
        step: Step,
        now: i64,
        new_ca: impl FnOnce() -> Result<CertificateAuthority, CaError>,
    ) -> Result<Self, CaError> {
        Ok(match step {
            Step::Prepare => Self {
                active: self.active.clone(),
                next: Some(Arc::new(new_ca()?)),
                previous: None,
                phase: Phase::Prepared(now),
            },
            Step::Activate => Self {
                active: self.next.clone().unwrap_or_else(|| self.active.clone()),
                next: None,
                previous: Some(self.active.clone()),
                phase: Phase::Activated(now),
            },
            Step::Retire => Self {
                active: self.active.clone(),
                next: None,
                previous: None,
                phase: Phase::Idle,
            },
        })
    }
}

/// `agentry ca rotate`: asks the leader to start a rotation. Returns a line for the user.
pub async fn request(
    client: &kube::Client,
    namespace: &str,
    secret: &str,
) -> Result<String, kube::Error> {
    use kube::api::{Patch, PatchParams};
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    let current = api.get(secret).await?;
    let phase = Phase::of(&current);
    if phase != Phase::Idle {
        return Ok(format!(
            "a rotation is already under way ({}); nothing to do",
            phase.render().unwrap_or_default()
        ));
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {ROTATE_ANNOTATION: now}}});
    api.patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(format!(
        "rotation requested on Secret {namespace}/{secret}: the leader prepares the next CA, activates it one \
         overlap later (--ca-rotation-overlap), re-issues every certificate, then retires the old CA"
    ))
}

/// `agentry ca status`: the rotation phase and the CAs' fingerprints.
pub async fn status(
    client: &kube::Client,
    namespace: &str,
    secret: &str,
) -> Result<String, String> {
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    let s = api
        .get(secret)
        .await
        .map_err(|e| format!("reading Secret {namespace}/{secret}: {e}"))?;
    let set = CaSet::from_secret(&s).map_err(|e| e.to_string())?;
    let mut out = format!(
        "phase: {}\nsigning CA: sha256:{} (expires {})\n",
        set.phase.render().unwrap_or_else(|| "idle".into()),
        set.active.fingerprint(),
        set.active.not_after()
    );
    if let Some(n) = &set.next {
        out.push_str(&format!(
            "next CA (trusted, not yet signing): sha256:{}\n",
            n.fingerprint()
        ));
    }
    if let Some(p) = &set.previous {
        out.push_str(&format!(
            "previous CA (trusted until retired): sha256:{}\n",
            p.fingerprint()
        ));
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
pub enum CaSetError {
    #[error("the CA Secret has no tls.crt/tls.key")]
    Missing,
    #[error("{0} in the CA Secret: {1}")]
    Invalid(&'static str, #[source] CaError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_follow_the_overlap_and_the_old_leaves() {
        let o = Duration::from_secs(100);
        assert_eq!(next_step(Phase::Idle, false, 0, o, 0), None);
        assert_eq!(next_step(Phase::Idle, true, 0, o, 0), Some(Step::Prepare));
        assert_eq!(next_step(Phase::Prepared(1000), true, 1099, o, 5), None);
        assert_eq!(
            next_step(Phase::Prepared(1000), false, 1100, o, 5),
            Some(Step::Activate)
        );
        assert_eq!(
            next_step(Phase::Activated(1000), false, 1200, o, 1),
            None,
            "old leaves remain"
        );
        assert_eq!(
            next_step(Phase::Activated(1000), false, 1050, o, 0),
            None,
            "overlap not over"
        );
        assert_eq!(
            next_step(Phase::Activated(1000), false, 1100, o, 0),
            Some(Step::Retire)
        );
        for p in [Phase::Idle, Phase::Prepared(7), Phase::Activated(9)] {
            assert_eq!(Phase::parse(p.render().as_deref()), p);
        }
    }

    #[test]
    fn a_rotation_keeps_both_cas_trusted_until_retirement() {
        let gen_ca = || CertificateAuthority::generate("ca", Duration::from_secs(3600));
        let start = CaSet {
            active: Arc::new(gen_ca().unwrap()),
            next: None,
            previous: None,
            phase: Phase::Idle,
        };
        let old = start.active.fingerprint().to_string();
        let prepared = start.apply(Step::Prepare, 10, gen_ca).unwrap();
        assert_eq!(prepared.active.fingerprint(), old);
        assert_eq!(prepared.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        let new = prepared.next.as_ref().unwrap().fingerprint().to_string();
        let activated = prepared.apply(Step::Activate, 20, gen_ca).unwrap();
        assert_eq!(activated.active.fingerprint(), new);
        assert_eq!(activated.previous.as_ref().unwrap().fingerprint(), old);
        assert_eq!(activated.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        let retired = activated.apply(Step::Retire, 30, gen_ca).unwrap();
        assert_eq!(retired.active.fingerprint(), new);
        assert_eq!(retired.bundle().matches("BEGIN CERTIFICATE").count(), 1);
        assert_eq!(retired.phase, Phase::Idle);
        // Round trip through the Secret.
        let secret = Secret {
            data: Some(activated.secret_data()),
            metadata: kube::api::ObjectMeta {
                annotations: Some(
                    [(
                        PHASE_ANNOTATION.to_string(),
                        activated.phase.render().unwrap(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let back = CaSet::from_secret(&secret).unwrap();
        assert_eq!(back.active.fingerprint(), new);
        assert_eq!(back.previous.unwrap().fingerprint(), old);
        assert_eq!(back.phase, Phase::Activated(20));
    }
}
