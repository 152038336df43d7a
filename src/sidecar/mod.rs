//! What runs beside an agent: `agentry register` (one registration from a shell) and
//! `agentry sidecar` (registers at start and whenever the mounted identity changes, keeps a
//! fresh token, and serves the agent on localhost: its token, its card and discovery).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::RwLock;

pub mod backup;
pub mod messages;

/// The client's User-Agent (recorded as the registration's clientVersion).
pub const USER_AGENT: &str = concat!("agentry-sidecar/", env!("CARGO_PKG_VERSION"));

/// An agent's credentials, as files (the mounted identity Secret, or given one by one).
#[derive(Clone, Debug)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// None: ask `POST /v1/token` for one.
    pub token: Option<PathBuf>,
}

impl IdentityFiles {
    /// `tls.crt`, `tls.key`, `ca.crt` and `token` in `dir` (the kubelet's Secret volume).
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
            token: Some(dir.join("token")),
        }
    }

    fn read(path: &Path) -> Result<String, String> {
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
    }

    /// The files' contents now.
    pub fn load(&self) -> Result<Loaded, String> {
        Ok(Loaded {
            cert: Self::read(&self.cert)?,
            key: Self::read(&self.key)?,
            ca: Self::read(&self.ca)?,
            token: match &self.token {
                Some(p) if p.exists() => Some(Self::read(p)?.trim().to_string()),
                _ => None,
            },
        })
    }
}

/// Credentials read from disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub cert: String,
    pub key: String,
    pub ca: String,
    pub token: Option<String>,
}

/// Why a call failed: the API's `{error, field, message}` or a transport problem.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the API refused ({status}): {body}")]
    Refused { status: u16, body: Value },
    #[error("{0}")]
    Transport(String),
}

/// An mTLS client for the agent API.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
    /// For backup and restore transfers: no overall deadline, but a stalled read fails.
    bulk: reqwest::Client,
}

impl ApiClient {
    pub fn new(base: &str, creds: &Loaded) -> Result<Self, String> {
        let roots = reqwest::Certificate::from_pem_bundle(creds.ca.as_bytes())
            .map_err(|e| format!("the CA bundle does not parse: {e}"))?;
        let identity =
            reqwest::Identity::from_pem(format!("{}\n{}", creds.cert, creds.key).as_bytes())
                .map_err(|e| format!("the certificate and key do not parse: {e}"))?;
        let builder = || {
            reqwest::Client::builder()
                .tls_certs_only(roots.clone())
                .identity(identity.clone())
                .user_agent(USER_AGENT)
                // The token never travels in clear.
                .https_only(true)
                .connect_timeout(Duration::from_secs(15))
        };
        let http = builder()
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| e.to_string())?;
        // A response can wait while the controller re-reads both copies of a large backup.
        let bulk = builder()
            .read_timeout(Duration::from_secs(30 * 60))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http,
            bulk,
        })
    }

    /// Streams `body` to `PUT path` (a backup); the API's JSON answer.
    pub async fn put_stream(
        &self,
        path: &str,
        token: &str,
        body: reqwest::Body,
    ) -> Result<Value, ClientError> {
        Self::answer(
            self.bulk
                .put(format!("{}{path}", self.base))
                .bearer_auth(token)
                .header(reqwest::header::CONTENT_TYPE, "application/zstd")
                .body(body)
                .send()
                .await,
        )
        .await
    }

    /// `GET path` as a stream (a restore's archive); a refusal is the API's error.
    pub async fn get_stream(
        &self,
        path: &str,
        token: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let r = self
            .bulk
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if r.status().is_success() {
            return Ok(r);
        }
        let status = r.status().as_u16();
        Err(ClientError::Refused {
            status,
            body: r.json().await.unwrap_or(Value::Null),
        })
    }

    /// A POST of JSON with the token; any 2xx is success.
    pub async fn post_json(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> Result<(), ClientError> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if r.status().is_success() {
            return Ok(());
        }
        let status = r.status().as_u16();
        Err(ClientError::Refused {
            status,
            body: r.json().await.unwrap_or(Value::Null),
        })
    }

    async fn answer(r: Result<reqwest::Response, reqwest::Error>) -> Result<Value, ClientError> {
        let r = r.map_err(|e| {
            ClientError::Transport(format!("{e}: {:?}", std::error::Error::source(&e)))
        })?;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if status == 200 {
            Ok(body)
        } else {
            Err(ClientError::Refused { status, body })
        }
    }

    pub async fn register(&self, token: &str, request: &Value) -> Result<Value, ClientError> {
        Self::answer(
            self.http
                .post(format!("{}/v1/agents/register", self.base))
                .bearer_auth(token)
                .json(request)
                .send()
                .await,
        )
        .await
    }

    /// A fresh token bound to this client's certificate.
    pub async fn token(&self) -> Result<Value, ClientError> {
        Self::answer(
            self.http
                .post(format!("{}/v1/token", self.base))
                .send()
                .await,
        )
        .await
    }

    /// A GET with the token (discovery, cards, the agent's own record).
    pub async fn get(&self, path_and_query: &str, token: &str) -> Result<Value, ClientError> {
        Self::answer(
            self.http
                .get(format!("{}{path_and_query}", self.base))
                .bearer_auth(token)
                .send()
                .await,
        )
        .await
    }
}

/// The registration request body.
pub fn register_request(id: &str, capabilities: &[String], backup_prefs: Option<Value>) -> Value {
    let mut body = serde_json::json!({"id": id, "capabilities": capabilities});
    if let Some(prefs) = backup_prefs {
        body["backup_prefs"] = prefs;
    }
    body
}

/// What the sidecar knows, served on localhost.
#[derive(Default, Clone, serde::Serialize)]
pub struct SidecarState {
    pub token: Option<String>,
    pub token_expires_at: Option<String>,
    /// The last registration's answer.
    pub registration: Option<Value>,
    /// The serial of the certificate last registered with (changes on rotation).
    pub certificate_serial: Option<String>,
    pub registrations: u64,
    pub last_error: Option<String>,
    /// The credentials `token` is bound to (what the local proxy presents with it).
    #[serde(skip)]
    pub creds: Option<Loaded>,
}

pub struct Sidecar {
    pub api: String,
    pub files: IdentityFiles,
    pub id: String,
    pub capabilities: Vec<String>,
    pub backup_prefs: Option<Value>,
    pub poll: Duration,
    /// How often to ask for backup and restore work (zero: never).
    pub backup_poll: Duration,
    /// Where restores are staged and verified.
    pub scratch_dir: PathBuf,
    /// `spec.backup.paths` are read and restored below this directory (None: as they are).
    pub path_root: Option<PathBuf>,
}

fn serial_of(cert_pem: &str) -> Option<String> {
    crate::identity::ca::leaf_facts(cert_pem).map(|f| f.serial)
}

/// Seconds until `token` should be refreshed (80% of its life), from its unverified claims.
fn refresh_in(token: &str) -> Option<u64> {
    let c = crate::identity::jwt::peek_claims(token)?;
    let now = jsonwebtoken::get_current_timestamp();
    // The mounted token is tenant-writable: no arithmetic on it may overflow.
    let life = u128::from(c.exp.saturating_sub(c.iat));
    let due = u64::try_from(u128::from(c.iat) + life * 4 / 5).unwrap_or(u64::MAX);
    Some(due.saturating_sub(now))
}

impl Sidecar {
    /// Runs until `stop`: watches the identity files (the kubelet swaps them atomically through
    /// a symlink; reading them whole each poll sees either the old or the new set), registers
    /// when they change, refreshes the token at 80% of its life.
    pub async fn run(
        self,
        state: Arc<RwLock<SidecarState>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut current: Option<(Loaded, ApiClient)> = None;
        // The files the last successful registration was made with: a failed registration
        // (API not up yet, a leader change) is retried at the next tick.
        let mut registered_for: Option<Loaded> = None;
        let mut tick = tokio::time::interval(self.poll);
        let mut last_work: Option<std::time::Instant> = None;
        // Backup work runs in its own task, so a long transfer does not stop registration and
        // token refreshes; one round at a time.
        let mut working: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {},
            }
            let loaded = match self.files.load() {
                Ok(l) => l,
                Err(e) => {
                    state.write().await.last_error = Some(e);
                    continue;
                }
            };
            let changed = current.as_ref().is_none_or(|(l, _)| *l != loaded);
            if changed {
                match ApiClient::new(&self.api, &loaded) {
                    Ok(client) => current = Some((loaded.clone(), client)),
                    Err(e) => {
                        state.write().await.last_error = Some(e);
                        continue;
                    }
                }
            }
            let Some((loaded, client)) = &current else {
                continue;
            };
            let register = registered_for.as_ref() != Some(loaded);
            match self.step(client, loaded, changed, register, &state).await {
                Ok(()) if register => registered_for = Some(loaded.clone()),
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "sidecar step failed; retrying");
                    state.write().await.last_error = Some(e.to_string());
                    continue;
                }
            }
            let due = !self.backup_poll.is_zero()
                && last_work.is_none_or(|at| at.elapsed() >= self.backup_poll)
                && working.as_ref().is_none_or(|w| w.is_finished());
            if due {
                last_work = Some(std::time::Instant::now());
                let token = state.read().await.token.clone().unwrap_or_default();
                let (client, id, scratch, root, state) = (
                    client.clone(),
                    self.id.clone(),
                    self.scratch_dir.clone(),
                    self.path_root.clone(),
                    state.clone(),
                );
                working = Some(tokio::spawn(async move {
                    match backup::work(&client, &token, &id, &scratch, root.as_deref()).await {
                        Ok(done) => {
                            if !done.errors.is_empty() {
                                state.write().await.last_error = Some(done.errors.join("; "));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "asking for backup work failed; retrying")
                        }
                    }
                }));
            }
        }
    }

    async fn step(
        &self,
        client: &ApiClient,
        loaded: &Loaded,
        changed: bool,
        register: bool,
        state: &Arc<RwLock<SidecarState>>,
    ) -> Result<(), ClientError> {
        // After a change, the mounted token (bound to the mounted certificate); otherwise ours.
        // Either is replaced by a fresh one from the API once 80% of its life has passed.
        let kept = if changed {
            loaded.token.clone()
        } else {
            state.read().await.token.clone()
        };
        let token = match kept.filter(|t| refresh_in(t).is_some_and(|s| s > 0)) {
            Some(t) => t,
            None => client.token().await?["token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        };
        let expires = crate::identity::jwt::peek_claims(&token)
            .and_then(|c| jiff::Timestamp::from_second(c.exp as i64).ok())
            .map(|t| t.to_string());
        if register {
            let answer = client
                .register(
                    &token,
                    &register_request(&self.id, &self.capabilities, self.backup_prefs.clone()),
                )
                .await?;
            let mut s = state.write().await;
            s.registration = Some(answer);
            s.certificate_serial = serial_of(&loaded.cert);
            s.registrations += 1;
            tracing::info!(serial = ?s.certificate_serial, "registered");
        }
        let mut s = state.write().await;
        s.token = Some(token);
        s.token_expires_at = expires;
        s.creds = Some(loaded.clone());
        s.last_error = None;
        Ok(())
    }
}

/// The sidecar's localhost endpoint: `GET /token`, `/status`, `/card`,
/// `/agents?capability=...` (discovery with the current token), `/healthz`.
pub fn local_router(state: Arc<RwLock<SidecarState>>, api: String, id: String) -> axum::Router {
    use axum::extract::{RawQuery, State};
    use axum::http::StatusCode;
    use axum::routing::get;
    use axum::{Json, Router};
    type Shared = (Arc<RwLock<SidecarState>>, String, String);
    async fn proxied(s: &Shared, path: String) -> (StatusCode, Json<Value>) {
        // The token and the certificate it is bound to, from one snapshot.
        let (token, creds) = {
            let st = s.0.read().await;
            (st.token.clone().unwrap_or_default(), st.creds.clone())
        };
        let client = match creds
            .ok_or_else(|| "not registered yet".to_string())
            .and_then(|l| ApiClient::new(&s.1, &l))
        {
            Ok(c) => c,
            Err(e) => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(serde_json::json!({"error": "unavailable", "field": null, "message": e})),
                );
            }
        };
        match client.get(&path, &token).await {
            Ok(v) => (StatusCode::OK, Json(v)),
            Err(ClientError::Refused { status, body }) => (
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                Json(body),
            ),
            Err(ClientError::Transport(e)) => (
                StatusCode::BAD_GATEWAY,
                Json(serde_json::json!({"error": "unavailable", "field": null, "message": e})),
            ),
        }
    }
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/status",
            get(|State(s): State<Shared>| async move { Json(s.0.read().await.clone()) }),
        )
        .route(
            "/token",
            get(|State(s): State<Shared>| async move {
                let st = s.0.read().await;
                match &st.token {
                    Some(t) => (StatusCode::OK, Json(serde_json::json!({"token": t, "expires_at": st.token_expires_at}))),
                    None => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": "unavailable", "field": null, "message": "no token yet"}))),
                }
            }),
        )
        .route(
            "/card",
            get(|State(s): State<Shared>| async move {
                let (ns, name) = s.2.split_once('/').unwrap_or(("", ""));
                let path = format!("/a2a/{ns}/{name}/.well-known/agent-card.json");
                proxied(&s, path).await
            }),
        )
        .route(
            "/agents",
            get(|State(s): State<Shared>, RawQuery(q): RawQuery| async move {
                proxied(&s, format!("/v1/agents?{}", q.unwrap_or_default())).await
            }),
        )
        .with_state((state, api, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::jwt::{Claims, SigningKey, TokenIssuer};

    fn token(iat: u64, exp: u64) -> String {
        let issuer = TokenIssuer::new(
            "i".into(),
            "a".into(),
            vec![SigningKey::generate(0).unwrap()],
        )
        .unwrap();
        issuer
            .sign(&Claims {
                iss: "i".into(),
                sub: "s".into(),
                aud: "a".into(),
                iat,
                nbf: iat,
                exp,
                jti: "j".into(),
                scope: String::new(),
                cnf: None,
            })
            .unwrap()
    }

    #[test]
    fn refresh_at_four_fifths_of_the_life_without_overflow() {
        let now = jsonwebtoken::get_current_timestamp();
        let fresh = refresh_in(&token(now, now + 1000)).unwrap();
        assert!((790..=800).contains(&fresh), "{fresh}");
        assert_eq!(
            refresh_in(&token(now - 1000, now + 10)),
            Some(0),
            "past 80%: now"
        );
        // A hostile mounted token cannot overflow the arithmetic.
        assert_eq!(
            refresh_in(&token(u64::MAX - 1, u64::MAX)),
            Some(u64::MAX - 1 - now)
        );
        assert_eq!(refresh_in(&token(u64::MAX, 0)), Some(u64::MAX - now));
        assert_eq!(refresh_in("not a token"), None);
    }

    #[test]
    fn the_register_request_carries_prefs_only_when_given() {
        let caps = vec!["a".to_string()];
        let r = register_request("ns/n", &caps, None);
        assert_eq!(r, serde_json::json!({"id": "ns/n", "capabilities": ["a"]}));
        let r = register_request(
            "ns/n",
            &caps,
            Some(serde_json::json!({"schedule": "@daily"})),
        );
        assert_eq!(r["backup_prefs"]["schedule"], "@daily");
    }

    #[test]
    fn unparseable_credentials_are_an_error_not_a_panic() {
        let loaded = Loaded {
            cert: String::new(),
            key: String::new(),
            ca: String::new(),
            token: None,
        };
        // Unparseable credentials are a clear error, not a panic.
        assert!(ApiClient::new("https://x", &loaded).is_err());
    }
}
