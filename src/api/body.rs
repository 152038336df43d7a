//! Request bodies: JSON only, at most [`MAX_BODY`] bytes, no unknown fields, and a parse error
//! names the field. Pure, so a property test can throw anything at it.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// The largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// Parses a JSON request body for a `Content-Type: application/json` request.
pub fn parse_json<T: DeserializeOwned>(
    content_type: Option<&str>,
    bytes: &[u8],
) -> Result<T, ApiError> {
    check_content_type(content_type, "application/json")?;
    if bytes.len() > MAX_BODY {
        return Err(too_large());
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        ApiError::invalid(Some(&field_of(&path, &inner)), json_message(&inner))
    })?;
    Ok(value)
}

/// Refuses any media type but `expected` (parameters such as `charset=utf-8` are allowed).
pub fn check_content_type(content_type: Option<&str>, expected: &str) -> Result<(), ApiError> {
    let essence = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase());
    if essence.as_deref() == Some(expected) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        Some("content-type"),
        format!(
            "send the body as {expected} (got {})",
            content_type.map_or("no Content-Type".into(), |c| format!("{c:?}"))
        ),
    ))
}

/// Reads at most [`MAX_BODY`] bytes of a body.
pub async fn read_limited(body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| too_large())
}

pub fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        None,
        format!("the body is larger than {MAX_BODY} bytes"),
    )
}

/// The field a serde error is about: its path, plus the unknown field's name when that is
/// the complaint.
fn field_of(path: &str, message: &str) -> String {
    let base = if path == "." { "" } else { path };
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    match unknown {
        // serde_path_to_error's path already ends at the unknown field.
        Some(name) if base.is_empty() => name.to_string(),
        Some(name) if !base.ends_with(name) => format!("{base}.{name}"),
        _ if base.is_empty() => "body".to_string(),
        _ => base.to_string(),
    }
}

/// serde's message without its line/column suffix, plus the fix for unknown fields.
fn json_message(inner: &str) -> String {
    let trimmed = inner
        .rsplit_once(" at line ")
        .map_or(inner, |(head, _)| head);
    if trimmed.starts_with("unknown field") {
        format!("{trimmed}; remove it")
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Req {
        id: String,
        #[serde(default)]
        inner: Option<Inner>,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u32,
    }

    const JSON: Option<&str> = Some("application/json");

    #[test]
    fn names_the_field() {
        let e = parse_json::<Req>(JSON, br#"{"id": 3}"#).unwrap_err();
        assert_eq!(
            (e.status, e.body.field.as_deref()),
            (StatusCode::BAD_REQUEST, Some("id"))
        );
        let e = parse_json::<Req>(JSON, br#"{"id": "a", "extra": 1}"#).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("extra"));
        assert!(e.body.message.contains("remove it"), "{}", e.body.message);
        let e = parse_json::<Req>(JSON, br#"{"id": "a", "inner": {"n": 1, "m": 2}}"#).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("inner.m"));
        let e = parse_json::<Req>(JSON, br#"{"id": "a", "inner": {"n": -1}}"#).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("inner.n"));
        let e = parse_json::<Req>(JSON, br#"{"id": "#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parse_json::<Req>(JSON, b"{}").unwrap_err();
        assert!(
            e.body.message.contains("missing field `id`"),
            "{}",
            e.body.message
        );
    }

    #[test]
    fn refuses_other_media_types_and_big_bodies() {
        for ct in [None, Some("text/plain"), Some("application/jsonx")] {
            let e = parse_json::<Req>(ct, br#"{"id":"a"}"#).unwrap_err();
            assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        }
        assert!(
            parse_json::<Req>(Some("Application/JSON; charset=utf-8"), br#"{"id":"a"}"#).is_ok()
        );
        let big = format!(r#"{{"id":"{}"}}"#, "a".repeat(MAX_BODY));
        let e = parse_json::<Req>(JSON, big.as_bytes()).unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Arbitrary bytes never panic and are answered with a 4xx naming a field.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = parse_json::<crate::api::model::RegisterRequest>(JSON, &bytes) {
                prop_assert!(e.status.is_client_error());
                prop_assert!(e.body.field.is_some());
            }
        }

        /// JSON-looking input (random objects with known and unknown keys) never panics.
        #[test]
        fn json_like_input_never_panics(
            id in ".{0,80}",
            caps in proptest::collection::vec(".{0,70}", 0..40),
            key in "[a-z_]{1,12}",
            schedule in ".{0,40}",
        ) {
            let body = serde_json::json!({
                "id": id, "capabilities": caps,
                "backup_prefs": {"schedule": schedule, "paths": ["/x"], key.clone(): 1},
            });
            let bytes = serde_json::to_vec(&body).unwrap();
            if let Err(e) = parse_json::<crate::api::model::RegisterRequest>(JSON, &bytes) {
                prop_assert!(e.status.is_client_error());
            }
        }
    }
}
