//! A2A agent cards (A2A specification 1.0, proto-JSON shape): built from the Agent's spec,
//! signed with the registry's published ES256 key (JWS over the RFC 8785 canonical card
//! without `signatures`), and served to agents that may discover the Agent.

use std::sync::Arc;

use axum::extract::{Extension, Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use kube::ResourceExt;
use serde_json::{Value, json};

use super::agents::may_discover;
use super::auth::{self, PeerCertificate};
use super::error::ApiError;
use super::state::ApiState;
use crate::crd::Agent;

/// The card of `agent`, unsigned, in the A2A 1.0 proto-JSON shape: no empty strings, lists or
/// objects (they would drop out of the canonical form the signature covers).
pub fn card(agent: &Agent, public_url: &str) -> Value {
    let ns = agent.namespace().unwrap_or_default();
    let name = agent.name_any();
    let spec_card = agent.spec.card.clone().unwrap_or_default();
    let description = spec_card
        .description
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| format!("Agent {ns}/{name}, registered with Agentry"));
    let version = spec_card
        .version
        .filter(|v| !v.trim().is_empty())
        .or_else(|| image_tag(&agent.spec.template.image))
        .unwrap_or_else(|| "0.0.0".into());
    let capabilities = &agent.spec.capabilities;
    let mut skills: Vec<Value> = spec_card
        .skills
        .iter()
        .map(|s| {
            let mut tags: Vec<String> = s.tags.clone();
            tags.extend(capabilities.iter().cloned());
            tags.sort();
            tags.dedup();
            if tags.is_empty() {
                tags.push("agent".into());
            }
            let description = if s.description.trim().is_empty() {
                s.name.clone()
            } else {
                s.description.clone()
            };
            let mut skill =
                json!({"id": s.id, "name": s.name, "description": description, "tags": tags});
            if !s.examples.is_empty() {
                skill["examples"] = json!(s.examples);
            }
            skill
        })
        .collect();
    if skills.is_empty() {
        // Without declared skills, each capability is a skill.
        skills = capabilities
            .iter()
            .map(|c| json!({"id": c, "name": c, "description": format!("Offers {c}"), "tags": [c]}))
            .collect();
    }
    if skills.is_empty() {
        skills
            .push(json!({"id": name, "name": name, "description": description, "tags": ["agent"]}));
    }
    let port = agent.spec.template.port;
    json!({
        "name": name,
        "description": description,
        "supportedInterfaces": [{
            "url": format!("https://{name}.{ns}.svc:{port}"),
            "protocolBinding": "JSONRPC",
            "protocolVersion": "1.0",
        }],
        "provider": {"organization": "Agentry", "url": public_url},
        "version": version,
        "capabilities": {"streaming": false, "pushNotifications": false, "extendedAgentCard": false},
        "securitySchemes": {
            "mtls": {"mtlsSecurityScheme": {
                "description": "A client certificate issued by the Agentry CA (the trust bundle is at /v1/ca.crt)"
            }},
            "bearer": {"httpAuthSecurityScheme": {
                "scheme": "Bearer",
                "bearerFormat": "JWT",
                "description": "An Agentry ES256 token bound to the client certificate (cnf.x5t#S256); keys at /.well-known/jwks.json"
            }},
        },
        "securityRequirements": [{"schemes": {"mtls": {"list": []}, "bearer": {"list": []}}}],
        "defaultInputModes": ["text/plain", "application/json"],
        "defaultOutputModes": ["text/plain", "application/json"],
        "skills": skills,
    })
}

fn image_tag(image: &str) -> Option<String> {
    let last = image.rsplit('/').next()?;
    let tag = last.split('@').next()?.split_once(':')?.1;
    (!tag.is_empty()).then(|| tag.to_string())
}

/// RFC 8785 canonical JSON for values without floats: keys sorted (by UTF-16 code units;
/// ours are ASCII, where that is byte order), no whitespace, serde_json's string escaping
/// (which matches ECMAScript's for these strings).
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// What the signature covers: the card with empty strings, lists and objects removed (as
/// the A2A SDKs canonicalise before verifying).
fn signed_form(value: &Value) -> Option<Value> {
    match value {
        Value::Object(map) => {
            let kept: serde_json::Map<String, Value> = map
                .iter()
                .filter(|(k, _)| k.as_str() != "signatures")
                .filter_map(|(k, v)| Some((k.clone(), signed_form(v)?)))
                .collect();
            (!kept.is_empty()).then_some(Value::Object(kept))
        }
        Value::Array(items) => {
            let kept: Vec<Value> = items.iter().filter_map(signed_form).collect();
            (!kept.is_empty()).then_some(Value::Array(kept))
        }
        Value::String(s) if s.is_empty() => None,
        Value::Null => None,
        other => Some(other.clone()),
    }
}

/// Adds a `signatures` entry signed with the registry's active token key.
pub fn sign(
    mut card: Value,
    tokens: &crate::identity::jwt::TokenIssuer,
    jku: &str,
) -> Result<Value, ApiError> {
    let payload = canonical(&signed_form(&card).unwrap_or(Value::Null));
    let (protected, signature) = tokens
        .sign_detached(payload.as_bytes(), &[("jku", jku)])
        .map_err(ApiError::internal)?;
    card["signatures"] = json!([{"protected": protected, "signature": signature}]);
    Ok(card)
}

/// The payload a card signature covers, base64url (for checks in tests).
pub fn signed_payload(card: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(canonical(&signed_form(card).unwrap_or(Value::Null)))
}

#[utoipa::path(
    get, path = "/a2a/{namespace}/{name}/.well-known/agent-card.json", tag = "discovery",
    params(("namespace" = String, Path), ("name" = String, Path)),
    responses(
        (status = 200, content_type = "application/json", description = "The agent's signed A2A card"),
        (status = 401, body = super::error::ErrorBody, description = "No valid client certificate"),
        (status = 403, body = super::error::ErrorBody, description = "The caller's namespace may not discover this one"),
        (status = 404, body = super::error::ErrorBody),
    ),
    security(("mtls" = []))
)]
pub async fn get_card(
    State(state): State<Arc<ApiState>>,
    Extension(peer): Extension<PeerCertificate>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let caller = auth::certificate(&state, &peer).await?;
    if !may_discover(&state, caller.namespace(), &namespace) {
        return Err(ApiError::forbidden(
            "namespace",
            format!(
                "agents in {} may not discover agents in {namespace}; a cluster operator can list {} in that namespace's agentry.dev/discoverable-from annotation",
                caller.namespace(),
                caller.namespace()
            ),
        ));
    }
    let agent = state
        .agent(&namespace, &name)
        .ok_or_else(|| ApiError::not_found(format!("no Agent {namespace}/{name}")))?;
    let tokens = state.authority.tokens();
    // One entry per Agent (bounded by the fleet), replaced when its spec or the key changes.
    let uid = agent.uid().unwrap_or_default();
    let version = format!(
        "{}:{}",
        agent.metadata.generation.unwrap_or_default(),
        tokens.active_key().kid
    );
    let cached = state
        .cards
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&uid)
        .filter(|(v, _)| *v == version)
        .map(|(_, body)| body.clone());
    let body = match cached {
        Some(body) => body,
        None => {
            let public = state.settings.public_url.trim_end_matches('/');
            let jku = format!("{public}/.well-known/jwks.json");
            let signed = sign(card(&agent, public), &tokens, &jku)?;
            let body: Arc<[u8]> = serde_json::to_vec(&signed)
                .map_err(ApiError::internal)?
                .into();
            let mut cards = state.cards.lock().unwrap_or_else(|p| p.into_inner());
            // Agents deleted since are dropped now and then.
            if cards.len() > state.agents.len() + 1024 {
                let live: std::collections::HashSet<String> = state
                    .agents
                    .state()
                    .iter()
                    .filter_map(|g| super::state::CachedAgent::new(g.clone()))
                    .filter_map(|a| a.uid())
                    .collect();
                cards.retain(|k, _| live.contains(k));
            }
            cards.insert(uid, (version, body.clone()));
            body
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "private, max-age=60"),
        ],
        body.to_vec(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sorts_keys_and_drops_whitespace() {
        let v = json!({"b": [1, {"z": "é\n", "a": true}], "a": "x"});
        assert_eq!(canonical(&v), r#"{"a":"x","b":[1,{"a":true,"z":"é\n"}]}"#);
    }

    #[test]
    fn signed_form_drops_empties_and_signatures() {
        let v = json!({"a": "", "b": [], "c": {"d": {"list": []}}, "e": false, "signatures": [1]});
        assert_eq!(signed_form(&v), Some(json!({"e": false})));
    }

    #[test]
    fn image_tags() {
        assert_eq!(image_tag("ghcr.io/x/y:1.2.3").as_deref(), Some("1.2.3"));
        assert_eq!(image_tag("localhost:5000/y").as_deref(), None);
        assert_eq!(image_tag("y@sha256:abc").as_deref(), None);
    }
}
