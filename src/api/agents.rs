//! The agent routes: register, token, an agent's own record and discovery by capability.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::http::header::USER_AGENT;
use kube::ResourceExt;
use serde::Deserialize;

use super::auth::{self, CertCaller, PeerCertificate};
use super::body;
use super::error::ApiError;
use super::model::{
    AgentRecord, AssignedResources, BackupInfo, DiscoveredAgent, DiscoveryResponse,
    RegisterRequest, RegisterResponse, TokenInfo, TokenResponse,
};
use super::state::{ApiState, CachedAgent};
use crate::crd::{Agent, RegistrationStatus, backup_field};
use crate::identity::scopes;
use crate::keys::{ALLOWED_PERMISSIONS_ANNOTATION, DISCOVERABLE_FROM_ANNOTATION};

/// The memory ceiling every answer repeats.
pub const MAX_MEMORY: &str = "512Mi";
/// The most capabilities one discovery query may name.
const MAX_QUERY_CAPABILITIES: usize = 8;
/// The most agents one discovery answer lists.
const MAX_DISCOVERED: usize = 1000;

fn rfc3339_now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string())
}

#[utoipa::path(
    post, path = "/v1/agents/register", tag = "agents",
    request_body = RegisterRequest,
    responses(
        (status = 200, body = RegisterResponse, description = "Registered (repeating it is harmless)"),
        (status = 400, body = super::error::ErrorBody, description = "A field is invalid"),
        (status = 401, body = super::error::ErrorBody, description = "No valid client certificate or token"),
        (status = 403, body = super::error::ErrorBody, description = "Another agent's id, or undeclared capabilities"),
    ),
    security(("mtls" = [], "bearer" = []))
)]
pub async fn register(
    State(state): State<Arc<ApiState>>,
    Extension(peer): Extension<PeerCertificate>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RegisterResponse>, ApiError> {
    let caller = auth::caller(&state, &peer, &headers, None).await?;
    let bytes = body::read_limited(body).await?;
    let req: RegisterRequest = body::parse_json(body::content_type(&headers), &bytes)?;
    let cert = &caller.cert;
    check_id(&req.id, cert)?;
    let capabilities = check_capabilities(&req.capabilities, &cert.agent.spec.capabilities)?;
    if let Some(prefs) = &req.backup_prefs {
        prefs.to_spec().validate().map_err(|(field, message)| {
            ApiError::invalid(Some(backup_field("backup_prefs", field)), message)
        })?;
    }
    let registration =
        record_registration(&state, cert, capabilities, user_agent(&headers)).await?;
    Ok(Json(register_response(&state, cert, &registration)))
}

/// `id` must be the certificate's own agent.
fn check_id(id: &str, cert: &CertCaller) -> Result<(), ApiError> {
    let Some((ns, name)) = id.split_once('/') else {
        return Err(ApiError::invalid(
            Some("id"),
            format!("{id:?} is not namespace/name, e.g. team-a/summarizer"),
        ));
    };
    if ns != cert.namespace() || name != cert.name() {
        return Err(ApiError::forbidden(
            "id",
            format!(
                "the client certificate is for {}, not {id:?}; an agent registers only itself",
                cert.id()
            ),
        ));
    }
    Ok(())
}

/// The registered capabilities must be declared in the Agent's spec (a subset; duplicates
/// collapse). Returns them sorted.
fn check_capabilities(requested: &[String], declared: &[String]) -> Result<Vec<String>, ApiError> {
    if requested.len() > 32 {
        return Err(ApiError::invalid(
            Some("capabilities"),
            format!("{} capabilities given, at most 32", requested.len()),
        ));
    }
    let requested: BTreeSet<&str> = requested.iter().map(String::as_str).collect();
    let undeclared: Vec<&str> = requested
        .iter()
        .copied()
        .filter(|c| !declared.iter().any(|d| d == c))
        .collect();
    if !undeclared.is_empty() {
        let shown: Vec<String> = undeclared
            .iter()
            .take(8)
            .map(|c| format!("{c:?}"))
            .collect();
        return Err(ApiError::forbidden(
            "capabilities",
            format!(
                "{} not declared in the Agent's spec.capabilities; add them there first",
                shown.join(", ")
            ),
        ));
    }
    Ok(requested.into_iter().map(str::to_string).collect())
}

/// The client's User-Agent, printable and at most 128 characters.
fn user_agent(headers: &HeaderMap) -> Option<String> {
    let ua = headers.get(USER_AGENT)?.to_str().ok()?;
    let clean: String = ua
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(128)
        .collect();
    (!clean.is_empty()).then_some(clean)
}

/// At most [`MAX_REGISTRATION_WRITES`] registration writes per Agent in this window: a client
/// that keeps changing what it registers cannot flood the apiserver (and the reconciler).
pub const REGISTRATION_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
pub const MAX_REGISTRATION_WRITES: usize = 5;

/// Writes the registration unless the same one is already recorded (then nothing is written
/// and the first `registeredAt` stands). One write at a time per Agent, at most
/// [`MAX_REGISTRATION_WRITES`] per [`REGISTRATION_WINDOW`].
async fn record_registration(
    state: &ApiState,
    cert: &CertCaller,
    capabilities: Vec<String>,
    client_version: Option<String>,
) -> Result<RegistrationStatus, ApiError> {
    let uid = cert.agent.uid().unwrap_or_default();
    let same = |r: &RegistrationStatus| {
        r.capabilities == capabilities && r.client_version == client_version
    };
    let lock = registration_lock(state, &uid);
    let _one_at_a_time = lock.lock().await;
    let last = state
        .registrations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&uid)
        .cloned();
    // What we wrote last (the watch cache may not have it yet), else what is stored.
    let stored = cert
        .agent
        .status
        .as_ref()
        .and_then(|s| s.registration.clone());
    let current = last
        .as_ref()
        .and_then(|l| l.registration.clone())
        .or(stored);
    if let Some(r) = current.filter(|r| same(r)) {
        return Ok(r);
    }
    let recent = writes_allowed(last.as_ref())?;
    let registration = RegistrationStatus {
        registered_at: rfc3339_now(),
        capabilities,
        client_version,
    };
    state
        .registrar
        .record(cert.namespace(), cert.name(), &registration)
        .await
        .map_err(|e| {
            tracing::warn!(agent = %cert.id(), error = %e, "recording a registration failed");
            ApiError::unavailable("the registration could not be recorded; retry shortly")
        })?;
    if let Some(entry) = state
        .registrations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_mut(&uid)
    {
        entry.registration = Some(registration.clone());
        entry.writes = recent.into_iter().collect();
        entry.writes.push_back(std::time::Instant::now());
    }
    Ok(registration)
}

/// The lock serialising one Agent's registration writes (entries of Agents long gone are
/// dropped now and then).
fn registration_lock(state: &ApiState, uid: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    let mut known = state
        .registrations
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if known.len() > state.agents.len() + 1024 {
        known.retain(|_, r| {
            std::sync::Arc::strong_count(&r.lock) > 1
                || r.writes
                    .back()
                    .is_some_and(|t| t.elapsed() < REGISTRATION_WINDOW)
        });
    }
    known.entry(uid.to_string()).or_default().lock.clone()
}

/// The writes within the rate window, or 429 when there are already
/// [`MAX_REGISTRATION_WRITES`] of them.
fn writes_allowed(
    last: Option<&super::state::Registered>,
) -> Result<Vec<std::time::Instant>, ApiError> {
    let recent: Vec<std::time::Instant> = last
        .map(|l| {
            l.writes
                .iter()
                .copied()
                .filter(|t| t.elapsed() < REGISTRATION_WINDOW)
                .collect()
        })
        .unwrap_or_default();
    if recent.len() >= MAX_REGISTRATION_WRITES {
        let wait = REGISTRATION_WINDOW.saturating_sub(recent[0].elapsed());
        return Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests",
            Some("capabilities"),
            format!(
                "the registration changed {MAX_REGISTRATION_WRITES} times in the last {}s; retry in {}s",
                REGISTRATION_WINDOW.as_secs(),
                wait.as_secs().max(1)
            ),
        ));
    }
    Ok(recent)
}

fn assigned(agent: &Agent) -> Option<AssignedResources> {
    let a = agent.status.as_ref()?.assigned_resources.as_ref()?;
    Some(AssignedResources {
        memory: a.memory.clone(),
        cpu: a.cpu.clone(),
        max_memory: MAX_MEMORY.into(),
    })
}

fn register_response(
    state: &ApiState,
    cert: &CertCaller,
    registration: &RegistrationStatus,
) -> RegisterResponse {
    let agent = &cert.agent;
    let status = agent.status.as_ref();
    RegisterResponse {
        id: cert.id(),
        spiffe_id: cert.record.spiffe_id.clone(),
        assigned_resources: assigned(agent).unwrap_or_else(|| AssignedResources {
            memory: agent.spec.resources.memory.clone(),
            cpu: agent.spec.resources.cpu.clone(),
            max_memory: MAX_MEMORY.into(),
        }),
        token: TokenInfo {
            expires_at: status
                .and_then(|s| s.identity.as_ref())
                .and_then(|i| i.token_expires_at.clone()),
        },
        inbox: status
            .and_then(|s| s.messaging.as_ref())
            .map(|m| m.inbox.clone()),
        backup: agent.spec.backup.as_ref().map(|b| BackupInfo {
            location: b.location.clone(),
            next_scheduled: status
                .and_then(|s| s.backup.as_ref())
                .and_then(|b| b.next_scheduled_time.clone()),
        }),
        agent_card_url: state.card_url(cert.namespace(), cert.name()),
        registered_at: registration.registered_at.clone(),
    }
}

/// `POST /v1/token` takes no parameters: the scopes come from the Agent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

#[utoipa::path(
    post, path = "/v1/token", tag = "agents",
    responses(
        (status = 200, body = TokenResponse, description = "A new token bound to the presented certificate"),
        (status = 400, body = super::error::ErrorBody, description = "The body is not empty or {}"),
        (status = 401, body = super::error::ErrorBody, description = "No valid client certificate"),
        (status = 403, body = super::error::ErrorBody, description = "The namespace no longer allows the Agent's permissions"),
    ),
    security(("mtls" = []))
)]
pub async fn token(
    State(state): State<Arc<ApiState>>,
    Extension(peer): Extension<PeerCertificate>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<TokenResponse>, ApiError> {
    let cert = auth::certificate(&state, &peer).await?;
    let bytes = body::read_limited(body).await?;
    if !bytes.iter().all(u8::is_ascii_whitespace) {
        body::parse_json::<NoFields>(body::content_type(&headers), &bytes).map_err(|mut e| {
            e.body.message = format!(
                "{}; send no body: the token's scopes come from the Agent's spec.permissions",
                e.body.message
            );
            e
        })?;
    }
    let grant = Grant::of(&state, &cert.agent)?;
    let (token, claims) = grant.mint(&state, &cert.record.spiffe_id, &cert.cert_der)?;
    Ok(Json(TokenResponse {
        token,
        token_type: "Bearer".into(),
        expires_at: super::rfc3339(claims.exp as i64),
        scope: grant.scope,
    }))
}

/// What an Agent may be issued now: its scopes, checked against its namespace's policy, and
/// its lifetimes, scaled by the testing divisor. Shared by `/v1/token` and CSR bootstrap.
pub struct Grant {
    pub scope: String,
    pub token_ttl: std::time::Duration,
    pub certificate_ttl: std::time::Duration,
}

impl Grant {
    pub fn of(state: &ApiState, agent: &Agent) -> Result<Self, ApiError> {
        let ns = agent.namespace().unwrap_or_default();
        let policy = state.namespace_annotation(&ns, ALLOWED_PERMISSIONS_ANNOTATION);
        scopes::check(&ns, policy.as_deref(), &agent.spec.permissions)
            .map_err(|e| ApiError::forbidden("spec.permissions", e.to_string()))?;
        let validated = agent
            .spec
            .validate()
            .map_err(|e| ApiError::forbidden(e.field, e.to_string()))?;
        Ok(Self {
            scope: agent.spec.scope(),
            token_ttl: state.authority.scaled(validated.token_ttl),
            certificate_ttl: state.authority.scaled(validated.certificate_ttl),
        })
    }

    /// A token for `spiffe_id`, bound to `cert_der`.
    pub fn mint(
        &self,
        state: &ApiState,
        spiffe_id: &str,
        cert_der: &[u8],
    ) -> Result<(String, crate::identity::jwt::Claims), ApiError> {
        let now = jsonwebtoken::get_current_timestamp();
        state
            .authority
            .tokens()
            .mint(spiffe_id, &self.scope, self.token_ttl, cert_der, now)
            .map_err(ApiError::internal)
    }
}

#[utoipa::path(
    get, path = "/v1/agents/{namespace}/{name}", tag = "agents",
    params(("namespace" = String, Path), ("name" = String, Path)),
    responses(
        (status = 200, body = AgentRecord, description = "The caller's own record"),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody, description = "Not the caller's own record"),
    ),
    security(("mtls" = [], "bearer" = []))
)]
pub async fn get_own(
    State(state): State<Arc<ApiState>>,
    Extension(peer): Extension<PeerCertificate>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<AgentRecord>, ApiError> {
    let caller = auth::caller(&state, &peer, &headers, None).await?;
    let cert = &caller.cert;
    if namespace != cert.namespace() || name != cert.name() {
        return Err(ApiError::forbidden(
            "path",
            format!("an agent reads only its own record ({})", cert.id()),
        ));
    }
    let agent = &cert.agent;
    let status = agent.status.as_ref();
    let registration = status.and_then(|s| s.registration.as_ref());
    Ok(Json(AgentRecord {
        id: cert.id(),
        spiffe_id: cert.record.spiffe_id.clone(),
        phase: status
            .and_then(|s| s.phase.as_ref())
            .and_then(|p| serde_json::to_value(p).ok())
            .and_then(|v| v.as_str().map(str::to_string)),
        capabilities: agent.spec.capabilities.clone(),
        permissions: agent
            .spec
            .permissions
            .iter()
            .map(|p| p.as_str().to_string())
            .collect(),
        assigned_resources: assigned(agent),
        endpoint: status.and_then(|s| s.endpoint.clone()),
        certificate_serial: cert.record.serial.clone(),
        token_expires_at: status
            .and_then(|s| s.identity.as_ref())
            .and_then(|i| i.token_expires_at.clone()),
        registered_at: registration.map(|r| r.registered_at.clone()),
        registered_capabilities: registration
            .map(|r| r.capabilities.clone())
            .unwrap_or_default(),
        agent_card_url: state.card_url(cert.namespace(), cert.name()),
    }))
}

/// Whether agents of `caller_ns` may discover (and read the cards of) Agents in `target_ns`:
/// always their own namespace; another only when its `agentry.dev/discoverable-from`
/// annotation lists `caller_ns` or `*`.
pub fn may_discover(state: &ApiState, caller_ns: &str, target_ns: &str) -> bool {
    caller_ns == target_ns
        || state
            .namespace_annotation(target_ns, DISCOVERABLE_FROM_ANNOTATION)
            .is_some_and(|list| {
                list.split([',', ' '])
                    .map(str::trim)
                    .any(|n| n == "*" || n == caller_ns)
            })
}

/// The capabilities a discovery query names (`capability=a&capability=b`). Anything else is
/// refused, naming the parameter.
pub fn parse_discovery_query(query: Option<&str>) -> Result<Vec<String>, ApiError> {
    let mut wanted = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "capability" {
            return Err(ApiError::invalid(
                Some(key),
                "unknown query parameter; the only one is capability (repeatable)",
            ));
        }
        let ok = !value.is_empty()
            && value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(ApiError::invalid(
                Some("capability"),
                "each capability is a lowercase DNS label (a-z, 0-9, '-'), e.g. capability=summarize",
            ));
        }
        wanted.push(value.to_string());
    }
    if wanted.len() > MAX_QUERY_CAPABILITIES {
        return Err(ApiError::invalid(
            Some("capability"),
            format!("at most {MAX_QUERY_CAPABILITIES} capabilities per query"),
        ));
    }
    Ok(wanted)
}

fn is_ready(agent: &Agent) -> bool {
    agent.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

#[utoipa::path(
    get, path = "/v1/agents", tag = "agents",
    params(("capability" = Vec<String>, Query, description = "Repeatable; an agent must offer all of them")),
    responses(
        (status = 200, body = DiscoveryResponse, description = "Ready agents offering every capability asked for, in namespaces the caller may discover"),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody, description = "The token lacks agents:discover"),
    ),
    security(("mtls" = [], "bearer" = ["agents:discover"]))
)]
pub async fn discover(
    State(state): State<Arc<ApiState>>,
    Extension(peer): Extension<PeerCertificate>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Json<DiscoveryResponse>, ApiError> {
    let caller = auth::caller(&state, &peer, &headers, Some("agents:discover")).await?;
    let wanted = parse_discovery_query(query.as_deref())?;
    Ok(Json(DiscoveryResponse {
        agents: discover_in(&state, caller.cert.namespace(), &wanted),
    }))
}

/// Discovery over the watch cache.
pub fn discover_in(state: &ApiState, caller_ns: &str, wanted: &[String]) -> Vec<DiscoveredAgent> {
    let mut found: Vec<CachedAgent> = state
        .agents
        .state()
        .into_iter()
        .filter_map(CachedAgent::new)
        .filter(|a| {
            wanted.iter().all(|w| a.spec.capabilities.contains(w))
                && is_ready(a)
                && a.metadata
                    .namespace
                    .as_deref()
                    .is_some_and(|ns| may_discover(state, caller_ns, ns))
        })
        .collect();
    // Order and cut before building the answers.
    let key = |a: &CachedAgent| (a.metadata.namespace.clone(), a.metadata.name.clone());
    if found.len() > MAX_DISCOVERED {
        found.select_nth_unstable_by_key(MAX_DISCOVERED, key);
        found.truncate(MAX_DISCOVERED);
    }
    found.sort_by_key(key);
    found
        .into_iter()
        .map(|a| {
            let ns = a.namespace().unwrap_or_default();
            let name = a.name_any();
            DiscoveredAgent {
                id: format!("{ns}/{name}"),
                spiffe_id: a
                    .status
                    .as_ref()
                    .and_then(|s| s.identity.as_ref())
                    .map(|i| i.spiffe_id.clone())
                    .unwrap_or_default(),
                endpoint: a.status.as_ref().and_then(|s| s.endpoint.clone()),
                agent_card_url: state.card_url(&ns, &name),
                capabilities: a.spec.capabilities.clone(),
            }
        })
        .collect()
}
