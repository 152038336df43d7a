//! One S3-compatible store (the primary, or the B2-compatible secondary): streaming multipart
//! uploads hashed with BLAKE3 in constant memory, reads that re-hash what is stored, and the
//! checksum mode Backblaze B2 needs.

use std::collections::HashMap;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::hash::HashingReader;

/// Multipart part size: the memory one upload holds at once (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Whether the SDK adds its own checksums to requests and validates them on responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumMode {
    /// The SDK's default (`x-amz-checksum-*` on uploads, validation on downloads).
    #[default]
    WhenSupported,
    /// Only where an operation requires it: Backblaze B2's S3 API refuses the SDK's default
    /// `x-amz-checksum-*` / `x-amz-sdk-checksum-algorithm` headers.
    WhenRequired,
}

/// How to reach one store.
#[derive(Clone)]
pub struct StoreConfig {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    /// Prepended to every key (e.g. `agentry/`).
    pub prefix: String,
    pub access_key: String,
    pub secret_key: String,
    pub force_path_style: bool,
    pub checksum_mode: ChecksumMode,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("checksum_mode", &self.checksum_mode)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{operation} on {bucket}/{key}: {message}")]
    S3 {
        operation: &'static str,
        bucket: String,
        key: String,
        message: String,
    },
    #[error("reading the backup stream: {0}")]
    Read(#[from] std::io::Error),
}

/// What an upload left in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub key: String,
    pub etag: Option<String>,
    pub version_id: Option<String>,
    pub size: u64,
    pub blake3: String,
}

pub struct S3Store {
    client: aws_sdk_s3::Client,
    pub bucket: String,
    prefix: String,
}

/// The SDK configuration for a store (interceptors may be added before `build`).
pub fn sdk_config(cfg: &StoreConfig) -> aws_sdk_s3::config::Builder {
    let (request, response) = match cfg.checksum_mode {
        ChecksumMode::WhenSupported => (
            RequestChecksumCalculation::WhenSupported,
            ResponseChecksumValidation::WhenSupported,
        ),
        ChecksumMode::WhenRequired => (
            RequestChecksumCalculation::WhenRequired,
            ResponseChecksumValidation::WhenRequired,
        ),
    };
    aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(cfg.endpoint.clone())
        .region(Region::new(cfg.region.clone()))
        .credentials_provider(Credentials::new(
            cfg.access_key.clone(),
            cfg.secret_key.clone(),
            None,
            None,
            "agentry-backup-location",
        ))
        .force_path_style(cfg.force_path_style)
        .request_checksum_calculation(request)
        .response_checksum_validation(response)
}

fn s3_error(
    operation: &'static str,
    bucket: &str,
    key: &str,
    e: impl std::error::Error,
) -> StoreError {
    // The SDK's Display is terse; its source chain says what the server answered.
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    StoreError::S3 {
        operation,
        bucket: bucket.to_string(),
        key: key.to_string(),
        message,
    }
}

impl S3Store {
    pub fn new(cfg: &StoreConfig) -> Self {
        Self::from_config(cfg, sdk_config(cfg).build())
    }

    pub fn from_config(cfg: &StoreConfig, config: aws_sdk_s3::Config) -> Self {
        Self {
            client: aws_sdk_s3::Client::from_conf(config),
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.clone(),
        }
    }

    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Streams `reader` into `name` as a multipart upload, hashing it on the way; at most one
    /// part ([`PART_SIZE`]) is held in memory. Aborts the upload on any failure, so nothing
    /// partial stays behind.
    pub async fn put_stream<R: AsyncRead + Unpin>(
        &self,
        name: &str,
        reader: R,
        metadata: HashMap<String, String>,
    ) -> Result<Uploaded, StoreError> {
        let key = self.key(name);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&key)
            .set_metadata(Some(metadata))
            .send()
            .await
            .map_err(|e| s3_error("CreateMultipartUpload", &self.bucket, &key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let mut hashing = HashingReader::new(reader);
        match self.upload_parts(&key, &upload_id, &mut hashing).await {
            Ok(parts) => {
                let done = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await;
                match done {
                    Ok(done) => {
                        let (blake3, size) = hashing.finish();
                        Ok(Uploaded {
                            key,
                            etag: done.e_tag().map(str::to_string),
                            version_id: done.version_id().map(str::to_string),
                            size,
                            blake3,
                        })
                    }
                    Err(e) => {
                        self.abort(&key, &upload_id).await;
                        Err(s3_error("CompleteMultipartUpload", &self.bucket, &key, e))
                    }
                }
            }
            Err(e) => {
                self.abort(&key, &upload_id).await;
                Err(e)
            }
        }
    }

    async fn upload_parts<R: AsyncRead + Unpin>(
        &self,
        key: &str,
        upload_id: &str,
        reader: &mut HashingReader<R>,
    ) -> Result<Vec<CompletedPart>, StoreError> {
        let mut parts = Vec::new();
        let mut number = 1;
        loop {
            let mut buf = Vec::with_capacity(PART_SIZE);
            while buf.len() < PART_SIZE {
                let n = (&mut *reader)
                    .take((PART_SIZE - buf.len()) as u64)
                    .read_to_end(&mut buf)
                    .await?;
                if n == 0 {
                    break;
                }
            }
            // An empty stream still makes one (empty) part: S3 needs at least one.
            if buf.is_empty() && number > 1 {
                break;
            }
            let last = buf.len() < PART_SIZE;
            let part = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(buf))
                .send()
                .await
                .map_err(|e| s3_error("UploadPart", &self.bucket, key, e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_string))
                    .build(),
            );
            number += 1;
            if last {
                break;
            }
        }
        Ok(parts)
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        if let Err(e) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            tracing::warn!(bucket = %self.bucket, key, error = %e, "aborting a multipart upload failed; cleanup will retry");
        }
    }

    /// Re-reads a stored object (a version, when given) and returns its BLAKE3 and size,
    /// streaming: what verification and scrubbing compare with the catalog.
    pub async fn hash_object(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<(String, u64), StoreError> {
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_string))
            .send()
            .await
            .map_err(|e| s3_error("GetObject", &self.bucket, key, e))?;
        Ok(super::hash::hash_stream(object.body.into_async_read()).await?)
    }

    /// Multipart uploads left behind (a crash mid-upload), for cleanup.
    pub async fn pending_uploads(&self) -> Result<Vec<(String, String)>, StoreError> {
        let listed = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .send()
            .await
            .map_err(|e| s3_error("ListMultipartUploads", &self.bucket, &self.prefix, e))?;
        Ok(listed
            .uploads()
            .iter()
            .filter_map(|u| Some((u.key()?.to_string(), u.upload_id()?.to_string())))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
    use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
    use std::sync::{Arc, Mutex};

    /// Records the header names of every request the SDK is about to send.
    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Intercept for Recorder {
        fn name(&self) -> &'static str {
            "Recorder"
        }
        fn read_before_transmit(
            &self,
            context: &BeforeTransmitInterceptorContextRef<'_>,
            _rc: &RuntimeComponents,
            _cfg: &mut ConfigBag,
        ) -> Result<(), aws_sdk_s3::error::BoxError> {
            let mut seen = self.0.lock().unwrap();
            for (name, _) in context.request().headers() {
                seen.push(name.to_ascii_lowercase());
            }
            Ok(())
        }
    }

    fn config(mode: ChecksumMode) -> StoreConfig {
        StoreConfig {
            // Nothing listens there: the request is recorded, then fails to connect.
            endpoint: "http://127.0.0.1:9".into(),
            region: "us-east-1".into(),
            bucket: "b".into(),
            prefix: "agentry/".into(),
            access_key: "k".into(),
            secret_key: "s".into(),
            force_path_style: true,
            checksum_mode: mode,
        }
    }

    async fn headers_of_a_put(mode: ChecksumMode) -> Vec<String> {
        let recorder = Recorder::default();
        let cfg = config(mode);
        let sdk = sdk_config(&cfg)
            .interceptor(recorder.clone())
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .build();
        let store = S3Store::from_config(&cfg, sdk);
        let _ = store
            .client
            .put_object()
            .bucket("b")
            .key("k")
            .body(ByteStream::from(vec![1u8; 1024]))
            .send()
            .await;
        let seen = recorder.0.lock().unwrap().clone();
        assert!(!seen.is_empty(), "the request reached the interceptor");
        seen
    }

    /// Backblaze B2 refuses the SDK's checksum headers: in `WhenRequired` mode none is sent;
    /// the default mode does send them (so the check can fail).
    #[tokio::test]
    async fn b2_mode_sends_no_checksum_headers() {
        let checksum =
            |h: &String| h.starts_with("x-amz-checksum-") || h == "x-amz-sdk-checksum-algorithm";
        let default = headers_of_a_put(ChecksumMode::WhenSupported).await;
        assert!(
            default.iter().any(checksum),
            "the default mode sends checksums: {default:?}"
        );
        let b2 = headers_of_a_put(ChecksumMode::WhenRequired).await;
        assert!(!b2.iter().any(checksum), "B2 mode sent {b2:?}");
    }

    #[test]
    fn credentials_stay_out_of_debug_output() {
        let shown = format!("{:?}", config(ChecksumMode::WhenRequired));
        assert!(
            !shown.contains("\"s\"") && !shown.contains("secret"),
            "{shown}"
        );
    }
}
