//! CSR bootstrap for agents that run outside the Deployments Agentry makes (like SPIRE's
//! Kubernetes workload attestor): the agent proves who it is with a Kubernetes
//! ServiceAccount token (checked by TokenReview, audience-bound), sends a PKCS#10 request for
//! a P-256 key it keeps, and gets a certificate and a bound token.
//!
//! Binding rule: the token must belong to the Agent's own ServiceAccount,
//! `system:serviceaccount:<namespace>:<agent name>` (the one Agentry creates for it).
//!
//! The CA decides subject, SANs, key usages, EKU and lifetime and copies nothing from the
//! request but its public key. A request with a bad signature, a key other than P-256,
//! SANs other than the ones we would issue, CA:true or an oversized body is refused before
//! anything is recorded.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use super::auth::{self, CSR_UID_SUFFIX};
use super::body;
use super::error::ApiError;
use super::model::{CsrRequest, CsrResponse};
use super::state::ApiState;
use kube::ResourceExt;

use crate::crd::Agent;
use crate::identity::ca::{self, IssuedLeaf, LeafRequest};

/// The largest CSR (PEM) accepted.
pub const MAX_CSR_PEM: usize = 8 * 1024;

const EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const P256: &str = "1.2.840.10045.3.1.7";

/// Checks a PEM CSR against what we would issue for (`allowed_sans`: the SPIFFE ID and the
/// Service DNS names) and returns its SubjectPublicKeyInfo (DER).
pub fn check_csr(pem: &str, allowed_sans: &[String]) -> Result<Vec<u8>, ApiError> {
    let bad = |m: &str| ApiError::invalid(Some("csr"), m.to_string());
    if pem.len() > MAX_CSR_PEM {
        return Err(bad("the CSR is larger than 8 KiB"));
    }
    let der = ca::pem_blocks(pem, "CERTIFICATE REQUEST");
    let [der] = der.as_slice() else {
        return Err(bad(
            "send exactly one PEM block: -----BEGIN CERTIFICATE REQUEST-----",
        ));
    };
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|_| bad("the CSR is not a PKCS#10 certification request"))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the CSR"));
    }
    csr.verify_signature()
        .map_err(|_| bad("the CSR's signature does not verify with its own key"))?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    if spki.algorithm.algorithm.to_id_string() != EC_PUBLIC_KEY || curve.as_deref() != Some(P256) {
        return Err(bad("the key must be ECDSA P-256"));
    }
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return Err(bad(
                    "the CSR asks for CA:true; agents get leaf certificates only",
                ));
            }
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    let value = match name {
                        GeneralName::URI(u) => u.to_string(),
                        GeneralName::DNSName(d) => d.to_string(),
                        other => return Err(bad(&format!("SAN {other:?} is not allowed"))),
                    };
                    if !allowed_sans.contains(&value) {
                        return Err(bad(&format!(
                            "SAN {value:?} is not the agent's; leave SANs out (the CA sets them)"
                        )));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(spki.raw.to_vec())
}

/// Refuses, without asking the apiserver, what cannot be a valid ServiceAccount token for
/// `audience`: not a JWT, another audience, or expired.
fn precheck(token: &str, audience: &str) -> Result<(), ApiError> {
    let refuse = |m: &str| ApiError::unauthenticated("authorization", m.to_string());
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(token)
        .map_err(|_| refuse("the ServiceAccount token is not a JWT"))?
        .claims;
    let aud_ok = match &claims["aud"] {
        serde_json::Value::String(a) => a == audience,
        serde_json::Value::Array(list) => list.iter().any(|a| a == audience),
        _ => false,
    };
    if !aud_ok {
        return Err(refuse(&format!(
            "the ServiceAccount token is not for audience {audience:?}; request one with `kubectl create token <agent> --audience {audience}`"
        )));
    }
    let now = jsonwebtoken::get_current_timestamp();
    if claims["exp"].as_u64().is_none_or(|exp| exp <= now) {
        return Err(refuse("the ServiceAccount token has expired"));
    }
    Ok(())
}

/// The ServiceAccount token belongs to the Agent's own ServiceAccount (TokenReview, with the
/// audience), or the request is refused.
async fn check_service_account(
    state: &ApiState,
    token: &str,
    namespace: &str,
    name: &str,
) -> Result<(), ApiError> {
    let audience = &state.settings.csr_audience;
    // A cheap look before asking the apiserver: a JWT for our audience, not expired.
    precheck(token, audience)?;
    let _review_slot = state
        .reviews
        .acquire()
        .await
        .map_err(|_| ApiError::unavailable("shutting down"))?;
    let user = state
        .reviewer
        .review(token, audience)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "TokenReview failed");
            ApiError::unavailable("the ServiceAccount token could not be checked; retry shortly")
        })?
        .ok_or_else(|| {
            ApiError::unauthenticated(
                "authorization",
                format!("the ServiceAccount token is not valid for audience {audience:?}"),
            )
        })?;
    let expected = format!("system:serviceaccount:{namespace}:{name}");
    if user != expected {
        return Err(ApiError::forbidden(
            "authorization",
            format!(
                "the token is for {user}; an Agent's CSR needs a token of its own ServiceAccount {expected}"
            ),
        ));
    }
    Ok(())
}

/// Issues a certificate for the CSR's key (recorded under `<uid>/csr`) and revokes the
/// Agent's previous CSR certificate: one bootstrapped key at a time.
async fn issue_replacing_previous(
    state: &ApiState,
    agent: &Agent,
    spki: &[u8],
    dns_names: Vec<String>,
    ttl: std::time::Duration,
) -> Result<IssuedLeaf, ApiError> {
    let authority = state.authority.clone();
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|_| ApiError::invalid(Some("csr"), "the CSR's public key does not parse"))?;
    let request = LeafRequest {
        agent_uid: format!(
            "{}{CSR_UID_SUFFIX}",
            agent.metadata.uid.clone().unwrap_or_default()
        ),
        agent_created: crate::identity::store::created(&agent.metadata),
        namespace: agent.namespace().unwrap_or_default(),
        name: agent.name_any(),
        trust_domain: authority.config.trust_domain.clone(),
        dns_names,
        ttl,
    };
    let signer = authority.clone();
    let leaf = tokio::task::spawn_blocking(move || {
        signer
            .ca()
            .issue_for_key(&signer.ledger, &request, &public_key)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    // The previous CSR certificate's key is cut off: one bootstrapped key at a time.
    let (ledger, key, serial) = (
        authority.ledger.clone(),
        crate::identity::store::AgentKey::new(
            leaf.record.agent_uid.clone(),
            leaf.record.agent_created,
        ),
        leaf.record.serial.clone(),
    );
    let revoked = tokio::task::spawn_blocking(move || {
        ledger.revoke_others(
            &key,
            &serial,
            crate::identity::store::RevocationReason::Superseded,
            time::OffsetDateTime::now_utc().unix_timestamp(),
        )
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    if !revoked.is_empty()
        && let Err(e) = state.registrar.publish_crl(&authority).await
    {
        tracing::warn!(error = %e, "publishing the CRL after a CSR failed; the next upkeep will");
    }
    Ok(leaf)
}

#[utoipa::path(
    post, path = "/v1/agents/{namespace}/{name}/csr", tag = "bootstrap",
    params(("namespace" = String, Path), ("name" = String, Path)),
    request_body = CsrRequest,
    responses(
        (status = 200, body = CsrResponse, description = "A certificate for the CSR's key and a token bound to it"),
        (status = 400, body = super::error::ErrorBody, description = "The CSR is refused"),
        (status = 401, body = super::error::ErrorBody, description = "The ServiceAccount token is not valid for this audience"),
        (status = 403, body = super::error::ErrorBody, description = "The token is not the Agent's ServiceAccount"),
    ),
    security(("serviceAccountToken" = []))
)]
pub async fn sign_csr(
    State(state): State<Arc<ApiState>>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<CsrResponse>, ApiError> {
    let token = auth::bearer(&headers)?;
    check_service_account(&state, token, &namespace, &name).await?;
    let agent = state
        .agent(&namespace, &name)
        .ok_or_else(|| ApiError::not_found(format!("no Agent {namespace}/{name}")))?;
    if agent.metadata.deletion_timestamp.is_some() {
        return Err(ApiError::forbidden(
            "path",
            format!("Agent {namespace}/{name} is being deleted"),
        ));
    }
    let bytes = body::read_limited(body).await?;
    let req: CsrRequest = body::parse_json(body::content_type(&headers), &bytes)?;
    let spiffe = ca::spiffe_id(&state.authority.config.trust_domain, &namespace, &name);
    let dns_names = ca::service_dns_names(&namespace, &name);
    let allowed: Vec<String> = std::iter::once(spiffe.clone())
        .chain(dns_names.clone())
        .collect();
    let spki = check_csr(&req.csr, &allowed)?;
    let grant = super::agents::Grant::of(&state, &agent)?;
    let leaf =
        issue_replacing_previous(&state, &agent, &spki, dns_names, grant.certificate_ttl).await?;
    let (token, claims) = grant.mint(&state, &spiffe, &leaf.cert_der)?;
    tracing::info!(agent = %format!("{namespace}/{name}"), serial = %leaf.record.serial, "issued a certificate for a CSR");
    Ok(Json(CsrResponse {
        certificate: leaf.cert_pem,
        ca_bundle: state.authority.bundle(),
        serial: leaf.record.serial,
        spiffe_id: spiffe,
        not_after: super::rfc3339(leaf.record.not_after),
        token,
        token_expires_at: super::rfc3339(claims.exp as i64),
    }))
}
