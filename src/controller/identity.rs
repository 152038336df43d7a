//! The identity step of the Agent reconcile: keep a valid certificate and token in the Agent's
//! `<name>-identity` Secret (cert-manager's layout: `tls.crt`, `tls.key`, `ca.crt`, plus `token`),
//! renewing at 2/3 of the certificate's life and 80% of the token's, revoking on request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};

use super::{Context, Error, MANAGER};
use crate::crd::{Agent, IdentityStatus, ValidatedSpec};
use crate::identity::authority::{Authority, MANAGED_BY};
use crate::identity::ca::{self, BACKDATE, LeafRequest};
use crate::identity::jwt;
use crate::identity::store::RevocationReason;

/// Annotate an Agent with this (value: an RFC 5280 reason such as `keyCompromise`) to revoke its
/// certificate; a new one is issued and the annotation removed.
pub const REVOKE_ANNOTATION: &str = "agentry.dev/revoke";

pub fn secret_name(agent: &Agent) -> String {
    format!("{}-identity", agent.name_any())
}

/// What the identity step decided and wrote.
pub struct IdentityOutcome {
    pub status: IdentityStatus,
    /// When the next renewal or refresh is due.
    pub next_due: Duration,
    /// (reason, note) pairs for Events.
    pub events: Vec<(&'static str, String)>,
    pub token_expires_at: i64,
}

/// The stored identity, as read from the Secret.
struct Stored {
    cert_pem: String,
    /// Empty when the Secret has no usable key.
    key_pem: String,
    token: Option<String>,
}

fn read_stored(secret: &Secret) -> Option<Stored> {
    let data = secret.data.as_ref()?;
    let get = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(Stored {
        cert_pem: get("tls.crt")?,
        key_pem: get("tls.key").unwrap_or_default(),
        token: get("token"),
    })
}

/// What the Agent's certificate must look like now.
pub struct WantedLeaf<'a> {
    pub ca_key_id: Option<&'a str>,
    pub uri: &'a str,
    pub dns: &'a [String],
    pub ttl: Duration,
}

/// Why an existing certificate cannot be kept, or None to keep it.
pub fn reissue_reason(
    facts: Option<&ca::LeafFacts>,
    key_present: bool,
    in_ledger_active: bool,
    want: &WantedLeaf<'_>,
    now: i64,
) -> Option<String> {
    let WantedLeaf {
        ca_key_id,
        uri: want_uri,
        dns: want_dns,
        ttl,
    } = *want;
    let Some(f) = facts else {
        return Some("no certificate yet".into());
    };
    if !key_present {
        return Some("private key missing".into());
    }
    if !in_ledger_active {
        return Some(format!(
            "certificate {} is not active in the ledger",
            f.serial
        ));
    }
    if f.authority_key_id.as_deref() != ca_key_id {
        return Some("issued by a different CA".into());
    }
    if f.uris != [want_uri] || f.dns_names != want_dns {
        return Some("subject alternative names changed".into());
    }
    if f.not_after - f.not_before != ttl.as_secs() as i64 + BACKDATE.as_secs() as i64 {
        return Some("certificate TTL changed".into());
    }
    if now >= renewal_time(f) {
        return Some("renewal due (2/3 of lifetime)".into());
    }
    None
}

/// 2/3 of the way from issuance (notBefore + backdate) to notAfter.
pub fn renewal_time(f: &ca::LeafFacts) -> i64 {
    let issued = f.not_before + BACKDATE.as_secs() as i64;
    issued + (f.not_after - issued) * 2 / 3
}

/// 80% of the way from iat to exp.
pub fn token_refresh_time(c: &jwt::Claims) -> i64 {
    (c.iat + (c.exp.saturating_sub(c.iat)) * 4 / 5) as i64
}

pub async fn reconcile(
    agent: &Agent,
    spec: &ValidatedSpec,
    ctx: &Context,
    authority: &Arc<Authority>,
) -> Result<IdentityOutcome, Error> {
    let ns = agent.namespace().ok_or(Error::MissingNamespace)?;
    let name = agent.name_any();
    let uid = agent
        .uid()
        .ok_or_else(|| Error::identity("the Agent has no uid yet"))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret_name = secret_name(agent);
    let existing = secrets.get_opt(&secret_name).await?;
    let stored = existing.as_ref().and_then(read_stored);
    let mut events = Vec::new();
    let now = Timestamp::now().as_second();

    let ca = authority.ca();
    let spiffe = ca::spiffe_id(&authority.config.trust_domain, &ns, &name);
    let dns = ca::service_dns_names(&ns, &name);
    let cert_ttl = authority.scaled(spec.certificate_ttl);
    let facts = stored.as_ref().and_then(|s| ca::leaf_facts(&s.cert_pem));
    let ledger_active = match &facts {
        Some(f) => authority
            .ledger
            .get(&f.serial)?
            .is_some_and(|r| r.state.is_active()),
        None => false,
    };

    // Revocation on request.
    let revoke = agent.annotations().get(REVOKE_ANNOTATION).cloned();
    let mut revoked = false;
    if let (Some(reason), Some(f)) = (&revoke, &facts)
        && ledger_active
    {
        authority
            .ledger
            .revoke(&f.serial, RevocationReason::parse(reason), now)?;
        authority.publish_trust(&ctx.client).await?;
        ctx.metrics.certificates_revoked.inc();
        events.push((
            "Revoked",
            format!("certificate {} revoked ({reason}) on request", f.serial),
        ));
        revoked = true;
    }

    let reason = if revoked {
        Some("previous certificate revoked".to_string())
    } else {
        reissue_reason(
            facts.as_ref(),
            stored.as_ref().is_some_and(|s| !s.key_pem.is_empty()),
            ledger_active,
            &WantedLeaf {
                ca_key_id: ca.subject_key_id(),
                uri: &spiffe,
                dns: &dns,
                ttl: cert_ttl,
            },
            now,
        )
    };

    // Certificate: reuse, or issue (ledger commit happens inside `issue`, before anything else).
    let (cert_pem, key_pem, cert_der, cert_facts, cert_changed) = match reason {
        None => {
            let s = stored
                .as_ref()
                .ok_or_else(|| Error::identity("kept certificate vanished"))?;
            let key = s.key_pem.clone();
            let der = ca::pem_to_der(&s.cert_pem).unwrap_or_default();
            let f = facts
                .clone()
                .ok_or_else(|| Error::identity("kept certificate does not parse"))?;
            (s.cert_pem.clone(), key, der, f, false)
        }
        Some(why) => {
            let req = LeafRequest {
                agent_uid: uid.clone(),
                namespace: ns.clone(),
                name: name.clone(),
                trust_domain: authority.config.trust_domain.clone(),
                dns_names: dns.clone(),
                ttl: cert_ttl,
            };
            // Key generation, signing and the durable ledger commit block: keep them off the
            // async workers.
            let issuer = authority.clone();
            let signing_ca = ca.clone();
            let leaf = tokio::task::spawn_blocking(move || signing_ca.issue(&issuer.ledger, &req))
                .await
                .map_err(Error::identity)?
                .map_err(Error::identity)?;
            ctx.metrics.certificates_issued.inc();
            let verb = if facts.is_some() { "Renewed" } else { "Issued" };
            events.push((
                verb,
                format!(
                    "certificate {} issued for {spiffe} ({why}), valid until {}",
                    leaf.record.serial,
                    rfc3339(leaf.record.not_after)
                ),
            ));
            tracing::info!(agent = %format!("{ns}/{name}"), serial = %leaf.record.serial, reason = %why, "certificate issued");
            let f = ca::leaf_facts(&leaf.cert_pem)
                .ok_or_else(|| Error::identity("issued certificate does not parse"))?;
            (leaf.cert_pem, leaf.key_pem, leaf.cert_der, f, true)
        }
    };

    // Token: refresh at 80% of its life, or when what it carries changed.
    let tokens = authority.tokens();
    let token_ttl = authority.scaled(spec.token_ttl).max(Duration::from_secs(1));
    let scope = agent.spec.scope();
    let current = stored
        .as_ref()
        .and_then(|s| s.token.as_deref())
        .and_then(jwt::peek_claims);
    let token_ok = !cert_changed
        && current.as_ref().is_some_and(|c| {
            c.scope == scope
                && c.sub == spiffe
                && c.iss == tokens.issuer
                && c.aud == tokens.audience
                && c.exp - c.iat == token_ttl.as_secs()
                && c.cnf.as_ref().map(|x| x.x5t_s256.as_str())
                    == Some(jwt::thumbprint(&cert_der).as_str())
                && now < token_refresh_time(c)
        })
        && stored
            .as_ref()
            .and_then(|s| s.token.as_deref())
            .and_then(|t| jsonwebtoken::decode_header(t).ok()?.kid)
            .is_some_and(|kid| kid == tokens.active_key().kid);
    let (token, claims) = if token_ok {
        let token = stored
            .as_ref()
            .and_then(|s| s.token.clone())
            .unwrap_or_default();
        (
            token,
            current.ok_or_else(|| Error::identity("kept token does not parse"))?,
        )
    } else {
        let (token, claims) = tokens
            .mint(&spiffe, &scope, token_ttl, &cert_der, now as u64)
            .map_err(Error::identity)?;
        ctx.metrics.tokens_minted.inc();
        (token, claims)
    };

    let desired = identity_secret(
        agent,
        &secret_name,
        &cert_pem,
        &key_pem,
        &authority.bundle(),
        &token,
    );
    if existing.as_ref().map(|e| &e.data) != Some(&desired.data)
        || existing.as_ref().map(|e| e.type_.as_deref()) != Some(Some("kubernetes.io/tls"))
    {
        secrets
            .patch(
                &secret_name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await?;
    }

    if revoke.is_some() {
        // Done: clear the request so it is not repeated.
        let agents: Api<Agent> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = serde_json::json!({"metadata": {"annotations": {REVOKE_ANNOTATION: null}}});
        agents
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }

    if let Ok(Some(nearest)) = authority.ledger.nearest_active_expiry() {
        ctx.metrics
            .nearest_certificate_expiry
            .set((nearest - now) as f64);
    }

    let renew_at = renewal_time(&cert_facts);
    let refresh_at = token_refresh_time(&claims);
    let next = renew_at.min(refresh_at).saturating_sub(now).max(1);
    Ok(IdentityOutcome {
        status: IdentityStatus {
            spiffe_id: spiffe,
            serial: cert_facts.serial.clone(),
            not_after: rfc3339(cert_facts.not_after),
            renewal_time: Some(rfc3339(renew_at)),
            token_expires_at: Some(rfc3339(claims.exp as i64)),
            secret_name,
        },
        next_due: Duration::from_secs(next as u64),
        events,
        token_expires_at: claims.exp as i64,
    })
}

/// On deletion: revoke every unexpired certificate of the Agent and re-publish the CRL.
pub async fn cleanup(agent: &Agent, ctx: &Context, authority: &Authority) -> Result<usize, Error> {
    let Some(uid) = agent.uid() else { return Ok(0) };
    let now = Timestamp::now().as_second();
    let n = authority
        .ledger
        .revoke_agent(&uid, RevocationReason::CessationOfOperation, now)?;
    if n > 0 {
        authority.publish_trust(&ctx.client).await?;
        for _ in 0..n {
            ctx.metrics.certificates_revoked.inc();
        }
    }
    Ok(n)
}

pub fn rfc3339(unix: i64) -> String {
    Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The identity Secret (pure): owned by the Agent, labelled for discovery and for our watch.
pub fn identity_secret(
    agent: &Agent,
    name: &str,
    cert: &str,
    key: &str,
    bundle: &str,
    token: &str,
) -> Secret {
    let data: BTreeMap<String, ByteString> = [
        ("tls.crt", cert),
        ("tls.key", key),
        ("ca.crt", bundle),
        ("token", token),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: agent.namespace(),
            labels: Some(
                [
                    (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                    ("agentry.dev/agent".to_string(), agent.name_any()),
                ]
                .into(),
            ),
            owner_references: agent.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(not_before: i64, not_after: i64) -> ca::LeafFacts {
        ca::LeafFacts {
            serial: "ab".into(),
            not_before,
            not_after,
            uris: vec!["spiffe://td/ns/a/agent/b".into()],
            dns_names: vec!["b.a.svc".into()],
            authority_key_id: Some("k1".into()),
        }
    }

    #[test]
    fn keeps_a_good_certificate_and_renews_at_two_thirds() {
        let ttl = Duration::from_secs(3000);
        let issued = 10_000;
        let f = facts(issued - BACKDATE.as_secs() as i64, issued + 3000);
        let dns = vec!["b.a.svc".to_string()];
        let want = |ca: &'static str, uri: &'static str, ttl| WantedLeaf {
            ca_key_id: Some(ca),
            uri,
            dns: &dns,
            ttl,
        };
        let good = want("k1", "spiffe://td/ns/a/agent/b", ttl);
        let check = |now| reissue_reason(Some(&f), true, true, &good, now);
        assert_eq!(renewal_time(&f), issued + 2000);
        assert_eq!(check(issued + 1999), None);
        assert!(check(issued + 2000).unwrap().contains("renewal"));
        // Each change forces a new certificate.
        assert!(reissue_reason(None, true, true, &good, issued).is_some());
        assert!(
            reissue_reason(Some(&f), false, true, &good, issued)
                .unwrap()
                .contains("key")
        );
        assert!(
            reissue_reason(Some(&f), true, false, &good, issued)
                .unwrap()
                .contains("ledger")
        );
        let other_ca = want("k2", "spiffe://td/ns/a/agent/b", ttl);
        assert!(
            reissue_reason(Some(&f), true, true, &other_ca, issued)
                .unwrap()
                .contains("CA")
        );
        let other_name = want("k1", "spiffe://td/ns/a/agent/c", ttl);
        assert!(
            reissue_reason(Some(&f), true, true, &other_name, issued)
                .unwrap()
                .contains("names")
        );
        let other_ttl = want("k1", "spiffe://td/ns/a/agent/b", ttl * 2);
        assert!(
            reissue_reason(Some(&f), true, true, &other_ttl, issued)
                .unwrap()
                .contains("TTL")
        );
    }

    #[test]
    fn token_refreshes_at_eighty_percent() {
        let c = jwt::Claims {
            iss: "i".into(),
            sub: "s".into(),
            aud: "a".into(),
            iat: 1000,
            nbf: 1000,
            exp: 4600,
            jti: "j".into(),
            scope: "".into(),
            cnf: None,
        };
        assert_eq!(token_refresh_time(&c), 1000 + 2880);
    }
}
