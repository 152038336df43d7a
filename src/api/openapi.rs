//! The OpenAPI 3.1 document, generated from the handlers and body types. `agentry openapi`
//! prints it; the committed copy (`openapi/agentry-api.json`) is drift-tested.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;
use super::model::*;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Agentry registry API",
        description = "Registration, tokens, discovery, A2A agent cards, CSR bootstrap and backups for agents. Agent routes need a client certificate issued by the Agentry CA; most also need the agent's Bearer JWT, bound to that certificate (cnf.x5t#S256).",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    paths(
        super::agents::register,
        super::agents::token,
        super::agents::get_own,
        super::agents::discover,
        super::csr::sign_csr,
        super::card::get_card,
        super::public::jwks,
        super::public::crl,
        super::public::ca_bundle,
        super::backups::work,
        super::backups::put_backup,
        super::backups::get_backup,
        super::backups::report_restore,
    ),
    components(schemas(
        ErrorBody, RegisterRequest, BackupPrefs, RetentionPrefs, RegisterResponse, AssignedResources,
        TokenInfo, BackupInfo, TokenResponse, AgentRecord, DiscoveryResponse, DiscoveredAgent,
        CsrRequest, CsrResponse, super::backups::Work, super::backups::RestoreWork,
        super::backups::BackupResult, super::backups::RestoreReport
    )),
    modifiers(&Security),
    tags(
        (name = "agents", description = "What an agent does with its certificate and token"),
        (name = "discovery", description = "Agent cards"),
        (name = "bootstrap", description = "Certificates for agents outside Agentry's Deployments"),
        (name = "trust", description = "Unauthenticated: keys, CRL and trust bundle"),
        (name = "backups", description = "What the sidecar does to back up and restore its agent"),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "mtls",
            SecurityScheme::MutualTls {
                description: Some("A client certificate issued by the Agentry CA".into()),
                extensions: None,
            },
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                utoipa::openapi::security::HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "The agent's ES256 token, bound to its client certificate",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "serviceAccountToken",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document, pretty-printed with a trailing newline.
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let mut out = doc.to_pretty_json().unwrap_or_default();
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    /// The committed document is what the types generate (`make crds` refreshes it).
    #[test]
    fn committed_openapi_does_not_drift() {
        let committed = include_str!("../../openapi/agentry-api.json");
        assert!(
            committed == super::document(),
            "openapi/agentry-api.json is stale: run `make crds` and commit the result"
        );
    }

    #[test]
    fn it_is_openapi_3_1_with_every_route_and_scheme() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        for path in [
            "/v1/agents/register",
            "/v1/token",
            "/v1/agents",
            "/v1/agents/{namespace}/{name}",
            "/v1/agents/{namespace}/{name}/csr",
            "/a2a/{namespace}/{name}/.well-known/agent-card.json",
            "/.well-known/jwks.json",
            "/v1/crl",
            "/v1/ca.crt",
        ] {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
        for scheme in ["mtls", "bearer", "serviceAccountToken"] {
            assert!(
                doc["components"]["securitySchemes"][scheme].is_object(),
                "{scheme}"
            );
        }
    }
}
