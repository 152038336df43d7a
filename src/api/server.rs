//! The HTTPS server: rustls (aws-lc-rs, the process's one crypto provider), HTTP/1.1 and
//! HTTP/2, a certificate from our own CA renewed at 2/3 of its life, and limits on every
//! connection (handshake, header and request timeouts, header and body sizes).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::auth::PeerCertificate;
use super::error::ApiError;
use super::state::ApiState;
use super::{agents, backups, card, csr, public};
use crate::identity::authority::Authority;
use crate::identity::ca::LeafRequest;

/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request headers must arrive within this (slow clients are cut off).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request, body included, must be answered within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head (HTTP/1.1 buffer; HTTP/2 header list).
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 4096;
/// HTTP/2 pings an idle connection this often and drops it when unanswered.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
/// How long the API's own certificate lives (shortened by the testing divisor).
const SERVER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// The API's routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/agents/register", post(agents::register))
        .route("/v1/token", post(agents::token))
        .route("/v1/agents", get(agents::discover))
        .route("/v1/agents/{namespace}/{name}", get(agents::get_own))
        .route("/v1/agents/{namespace}/{name}/csr", post(csr::sign_csr))
        .route("/v1/agents/{namespace}/{name}/work", get(backups::work))
        .route(
            "/v1/agents/{namespace}/{name}/backups/{id}",
            put(backups::put_backup).get(backups::get_backup),
        )
        .route(
            "/v1/agents/{namespace}/{name}/restores/{restore}",
            post(backups::report_restore),
        )
        .route(
            "/a2a/{namespace}/{name}/.well-known/agent-card.json",
            get(card::get_card),
        )
        .route("/.well-known/jwks.json", get(public::jwks))
        .route("/v1/crl", get(public::crl))
        .route("/v1/ca.crt", get(public::ca_bundle))
        .route("/v1/openapi.json", get(public::openapi))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .fallback(|| async { ApiError::not_found("no such route; see /v1/openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                Some("method"),
                "this route does not take that method; see /v1/openapi.json",
            )
        })
        .with_state(state)
}

/// Counts each routed request by route template and status (`agentry_api_requests_total`).
async fn count(
    axum::extract::State(state): axum::extract::State<Arc<ApiState>>,
    request: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let Some(metrics) = state.metrics.clone() else {
        return next.run(request).await;
    };
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    metrics
        .api_request_duration
        .observe(started.elapsed().as_secs_f64());
    metrics
        .api_requests
        .get_or_create(&crate::telemetry::ApiLabels {
            route,
            code: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

/// Accepts any client certificate in the handshake, after the handshake has proved the
/// client holds its key: whether it is trusted (chain, validity, ledger, revocation) is
/// decided per request by `auth`, so the caller gets a 401 that says why and a revocation or
/// a new trust bundle applies to open connections at once.
#[derive(Debug)]
struct ProofOfPossession(Arc<rustls::crypto::CryptoProvider>);

impl ClientCertVerifier for ProofOfPossession {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        // /.well-known/jwks.json, /v1/crl and /v1/ca.crt need none; the agent routes refuse
        // requests without one.
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The API's own certificate, swapped in place when renewed.
#[derive(Debug)]
pub struct ServerIdentity {
    current: RwLock<(Arc<CertifiedKey>, IssuedFacts)>,
    dns_names: Vec<String>,
}

#[derive(Debug, Clone)]
struct IssuedFacts {
    renew_at: i64,
    issuer_fingerprint: String,
}

impl ResolvesServerCert for ServerIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .clone(),
        )
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Issues the API's certificate from the signing CA (recorded in the ledger like any leaf).
async fn issue_server_cert(
    authority: &Arc<Authority>,
    dns_names: &[String],
) -> anyhow::Result<(Arc<CertifiedKey>, IssuedFacts)> {
    let config = &authority.config;
    let request = LeafRequest {
        agent_uid: "agentry-api".into(),
        agent_created: 0,
        namespace: config.namespace.clone(),
        name: "agentry-api".into(),
        trust_domain: config.trust_domain.clone(),
        dns_names: dns_names.to_vec(),
        ttl: authority.scaled(SERVER_CERT_TTL),
    };
    let a = authority.clone();
    let (leaf, signer) = tokio::task::spawn_blocking(move || {
        let signer = a.ca();
        signer.issue(&a.ledger, &request).map(|l| (l, signer))
    })
    .await??;
    let mut chain = vec![CertificateDer::from(leaf.cert_der.clone())];
    chain.extend(signer.ders().map(|d| CertificateDer::from(d.to_vec())));
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
    let certified = CertifiedKey::from_der(chain, key, &provider())?;
    let life = leaf.record.not_after - leaf.record.not_before;
    Ok((
        Arc::new(certified),
        IssuedFacts {
            renew_at: leaf.record.not_before + life * 2 / 3,
            issuer_fingerprint: signer.fingerprint().to_string(),
        },
    ))
}

impl ServerIdentity {
    pub async fn issue(
        authority: &Arc<Authority>,
        dns_names: Vec<String>,
    ) -> anyhow::Result<Arc<Self>> {
        let current = issue_server_cert(authority, &dns_names).await?;
        Ok(Arc::new(Self {
            current: RwLock::new(current),
            dns_names,
        }))
    }

    /// Renews at 2/3 of the certificate's life, or at once when the signing CA changed.
    pub async fn renew_if_due(&self, authority: &Arc<Authority>) -> anyhow::Result<bool> {
        let facts = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if now < facts.renew_at && facts.issuer_fingerprint == authority.ca().fingerprint() {
            return Ok(false);
        }
        let renewed = issue_server_cert(authority, &self.dns_names).await?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = renewed;
        Ok(true)
    }

    /// The certificate served now (DER), for tests.
    pub fn certificate_der(&self) -> Vec<u8> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .cert[0]
            .to_vec()
    }
}

/// The rustls configuration: TLS 1.2/1.3, ALPN h2 and http/1.1, client certificates
/// requested but checked per request.
pub fn tls_config(identity: Arc<ServerIdentity>) -> anyhow::Result<rustls::ServerConfig> {
    let provider = provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(ProofOfPossession(provider)))
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Binds `addr` and serves `app` over TLS until `shutdown` (see [`serve_on`]).
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    tls: rustls::ServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_on(
        tokio::net::TcpListener::bind(addr).await?,
        app,
        tls,
        shutdown,
    )
}

/// Serves `app` over TLS on `listener` until `shutdown`; in-flight requests finish (bounded
/// by the request timeout). Returns the bound address.
pub fn serve_on(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: rustls::ServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let bound = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let handle = tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let builder = connection_builder();
        loop {
            let (tcp, _remote) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Full: refuse at once rather than queue.
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, app, watcher) = (acceptor.clone(), app.clone(), graceful.watcher());
            let builder = builder.clone();
            tokio::spawn(async move {
                let _permit = permit;
                serve_connection(acceptor, tcp, app, builder, watcher).await;
            });
        }
        drop(listener);
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, graceful.shutdown()).await;
    });
    Ok((bound, handle))
}

/// HTTP/1.1 and HTTP/2 with the header size and time limits, built once for every connection.
fn connection_builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(Duration::from_secs(10));
    builder
}

/// One connection: the TLS handshake (bounded), then requests, each carrying the peer's
/// certificate and answered within the request timeout.
async fn serve_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    app: Router,
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
        return;
    };
    let peer = PeerCertificate(
        stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| Arc::from(c.as_ref())),
    );
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let app = app.clone();
        async move {
            // Backup transfers stream for as long as they send (cut off when idle instead).
            let limit = if req.uri().path().contains("/backups/") {
                backups::TRANSFER_TIMEOUT
            } else {
                REQUEST_TIMEOUT
            };
            let answer = tokio::time::timeout(limit, app.oneshot(req.map(Body::new))).await;
            Ok::<Response, std::convert::Infallible>(match answer {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    None,
                    "the request took too long; send it faster",
                )
                .into_response(),
            })
        }
    });
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let _ = watcher.watch(connection.into_owned()).await;
}

/// The DNS names (and addresses) on the API's certificate: the Service's names in the
/// controller's namespace, plus `extra` (e.g. 127.0.0.1 for a port-forward).
pub fn dns_names(namespace: &str, service: &str, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    for e in extra {
        if !names.contains(e) {
            names.push(e.clone());
        }
    }
    names
}
