//! What anyone may fetch without credentials: the JWKS, the CRL, the trust bundle and the
//! OpenAPI document. Each answers with a strong ETag and honours If-None-Match.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::ApiState;
use crate::identity::ca;

fn cached(
    headers: &HeaderMap,
    content_type: &'static str,
    max_age: u32,
    body: Vec<u8>,
) -> Response {
    let etag = format!("\"{}\"", &ca::sha256_hex(&body)[..32]);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let cache = format!("public, max-age={max_age}");
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&cache) {
        h.insert(header::CACHE_CONTROL, v);
    }
    response
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "trust",
    responses((status = 200, content_type = "application/json", description = "The token signing keys (ES256), including keys not yet signing and retired keys still valid")))]
pub async fn jwks(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(&state.authority.tokens().jwks()).map_err(ApiError::internal)?;
    Ok(cached(&headers, "application/json", 300, body))
}

#[utoipa::path(get, path = "/v1/crl", tag = "trust",
    responses((status = 200, content_type = "application/pkix-crl", description = "The signing CA's CRL (DER)"),
              (status = 503, body = super::error::ErrorBody, description = "No CRL published yet")))]
pub async fn crl(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pem = state
        .authority
        .latest_crl()
        .ok_or_else(|| ApiError::unavailable("no CRL has been published yet; retry shortly"))?;
    let der = ca::pem_blocks(&pem, "X509 CRL")
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("the published CRL has no PEM block"))?;
    Ok(cached(&headers, "application/pkix-crl", 60, der))
}

#[utoipa::path(get, path = "/v1/ca.crt", tag = "trust",
    responses((status = 200, content_type = "application/x-pem-file", description = "The trust bundle: the signing CA and any CA in a rotation overlap (PEM)")))]
pub async fn ca_bundle(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    cached(
        &headers,
        "application/x-pem-file",
        300,
        state.authority.bundle().into_bytes(),
    )
}

pub async fn openapi(headers: HeaderMap) -> Response {
    cached(
        &headers,
        "application/json",
        3600,
        super::openapi::document().into_bytes(),
    )
}
