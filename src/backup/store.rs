//! One S3-compatible store (the primary, or the B2-compatible secondary): streaming multipart
//! uploads hashed with BLAKE3 in constant memory, reads that re-hash what is stored, and the
//! checksum mode Backblaze B2 needs.

use std::collections::HashMap;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
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
    /// How objects are written (storage class, object lock, encryption).
    pub options: WriteOptions,
}

/// How objects are written to a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// `STANDARD` when None.
    pub storage_class: Option<String>,
    /// Objects are locked in COMPLIANCE mode for this many days.
    pub object_lock_days: Option<u32>,
    /// `AES256` or `aws:kms`, and the KMS key.
    pub sse: Option<(String, Option<String>)>,
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
    options: WriteOptions,
}

/// One multipart upload under way.
#[derive(Debug, Clone)]
pub struct Upload {
    pub key: String,
    pub upload_id: String,
    parts: Vec<CompletedPart>,
}

/// A stored object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// Unix seconds (0 when the store did not say).
    pub last_modified: i64,
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
        // A store that stops answering fails the request instead of hanging it.
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .read_timeout(std::time::Duration::from_secs(120))
                .build(),
        )
        .request_checksum_calculation(request)
        .response_checksum_validation(response)
}

/// Reads up to one part ([`PART_SIZE`]) from `reader`; shorter only at the end of the stream.
pub async fn read_part<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Bytes> {
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
    Ok(Bytes::from(buf))
}

fn s3_error(
    operation: &'static str,
    bucket: &str,
    key: &str,
    e: impl std::error::Error,
) -> StoreError {
    StoreError::S3 {
        operation,
        bucket: bucket.to_string(),
        key: key.to_string(),
        // The SDK's Display is terse; its source chain says what the server answered.
        message: crate::telemetry::error_chain(&e),
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
            options: cfg.options.clone(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Starts a multipart upload of `key` (a full key, prefix included) with `metadata`, written
    /// with the store's storage class, object lock and encryption.
    pub async fn start_upload(
        &self,
        key: &str,
        metadata: HashMap<String, String>,
    ) -> Result<Upload, StoreError> {
        let mut request = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(Some(metadata))
            .content_type("application/zstd");
        if let Some(class) = &self.options.storage_class {
            request = request.storage_class(class.as_str().into());
        }
        if let Some(days) = self.options.object_lock_days {
            let until = jiff::Timestamp::now()
                .checked_add(jiff::SignedDuration::from_hours(24 * i64::from(days)))
                .unwrap_or(jiff::Timestamp::MAX);
            request = request
                .object_lock_mode(aws_sdk_s3::types::ObjectLockMode::Compliance)
                .object_lock_retain_until_date(aws_sdk_s3::primitives::DateTime::from_secs(
                    until.as_second(),
                ));
        }
        if let Some((algorithm, kms_key)) = &self.options.sse {
            request = request
                .server_side_encryption(algorithm.as_str().into())
                .set_ssekms_key_id(kms_key.clone());
        }
        let created = request
            .send()
            .await
            .map_err(|e| s3_error("CreateMultipartUpload", &self.bucket, key, e))?;
        Ok(Upload {
            key: key.to_string(),
            upload_id: created.upload_id().unwrap_or_default().to_string(),
            parts: Vec::new(),
        })
    }

    /// Uploads the next part of `upload`.
    pub async fn upload_part(&self, upload: &mut Upload, data: Bytes) -> Result<(), StoreError> {
        let number = i32::try_from(upload.parts.len() + 1).unwrap_or(i32::MAX);
        let part = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&upload.key)
            .upload_id(&upload.upload_id)
            .part_number(number)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| s3_error("UploadPart", &self.bucket, &upload.key, e))?;
        upload.parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(part.e_tag().map(str::to_string))
                .build(),
        );
        Ok(())
    }

    /// Completes `upload` (aborting it if that fails): its etag and version id.
    pub async fn finish_upload(
        &self,
        upload: Upload,
    ) -> Result<(Option<String>, Option<String>), StoreError> {
        let done = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&upload.key)
            .upload_id(&upload.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(upload.parts.clone()))
                    .build(),
            )
            .send()
            .await;
        match done {
            Ok(done) => Ok((
                done.e_tag().map(str::to_string),
                done.version_id().map(str::to_string),
            )),
            Err(e) => {
                let _ = self.abort_upload(&upload.key, &upload.upload_id).await;
                Err(s3_error(
                    "CompleteMultipartUpload",
                    &self.bucket,
                    &upload.key,
                    e,
                ))
            }
        }
    }

    /// Aborts a multipart upload; false when that failed (logged; the caller keeps it for a
    /// later retry).
    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> bool {
        self.abort(key, upload_id).await
    }

    /// Writes a small object in one request (manifests).
    pub async fn put_small(
        &self,
        key: &str,
        body: Vec<u8>,
        metadata: HashMap<String, String>,
    ) -> Result<Option<String>, StoreError> {
        let put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/json")
            .set_metadata(Some(metadata))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| s3_error("PutObject", &self.bucket, key, e))?;
        Ok(put.version_id().map(str::to_string))
    }

    /// Reads a whole small object (at most `max` bytes).
    pub async fn get_small(&self, key: &str, max: usize) -> Result<Vec<u8>, StoreError> {
        let mut reader = self.open(key, None).await?;
        let mut out = Vec::new();
        (&mut reader)
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .await?;
        if out.len() > max {
            return Err(StoreError::S3 {
                operation: "GetObject",
                bucket: self.bucket.clone(),
                key: key.to_string(),
                message: format!("larger than {max} bytes"),
            });
        }
        Ok(out)
    }

    /// A stored object (a version, when given) as a byte stream.
    pub async fn open(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<impl AsyncRead + Unpin + Send + 'static, StoreError> {
        let object = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_string))
            .send()
            .await
            .map_err(|e| s3_error("GetObject", &self.bucket, key, e))?;
        Ok(object.body.into_async_read())
    }

    /// Deletes an object version (or the object, when no version is given). Object-locked
    /// versions are refused by the store.
    pub async fn delete(&self, key: &str, version_id: Option<&str>) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_string))
            .send()
            .await
            .map_err(|e| s3_error("DeleteObject", &self.bucket, key, e))?;
        Ok(())
    }

    /// Every object under `prefix` (the store's prefix plus `under`).
    pub async fn list(&self, under: &str) -> Result<Vec<Listed>, StoreError> {
        let prefix = self.key(under);
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| s3_error("ListObjectsV2", &self.bucket, &prefix, e))?;
            for o in page.contents() {
                if let Some(key) = o.key() {
                    out.push(Listed {
                        key: key.to_string(),
                        size: o.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                        last_modified: o.last_modified().map_or(0, |t| t.secs()),
                    });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Checks the bucket is reachable with these credentials; its versioning state
    /// (`Enabled`, `Suspended` or `Off`).
    pub async fn validate(&self) -> Result<String, StoreError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| s3_error("HeadBucket", &self.bucket, "", e))?;
        let versioning = self
            .client
            .get_bucket_versioning()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| s3_error("GetBucketVersioning", &self.bucket, "", e))?;
        Ok(versioning
            .status()
            .map_or_else(|| "Off".to_string(), |s| s.as_str().to_string()))
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
        let mut upload = self.start_upload(&key, metadata).await?;
        let mut hashing = HashingReader::new(reader);
        let sent = async {
            loop {
                let part = read_part(&mut hashing).await?;
                let last = part.len() < PART_SIZE;
                // An empty stream still makes one (empty) part: S3 needs at least one.
                if !part.is_empty() || upload.parts.is_empty() {
                    self.upload_part(&mut upload, part).await?;
                }
                if last {
                    return Ok::<_, StoreError>(());
                }
            }
        }
        .await;
        if let Err(e) = sent {
            let _ = self.abort(&key, &upload.upload_id).await;
            return Err(e);
        }
        let (etag, version_id) = self.finish_upload(upload).await?;
        let (blake3, size) = hashing.finish();
        Ok(Uploaded {
            key,
            etag,
            version_id,
            size,
            blake3,
        })
    }

    async fn abort(&self, key: &str, upload_id: &str) -> bool {
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
            return false;
        }
        true
    }

    /// Re-reads a stored object (a version, when given) and returns its BLAKE3 and size,
    /// streaming: what verification and scrubbing compare with the catalog.
    pub async fn hash_object(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<(String, u64), StoreError> {
        let reader = self.open(key, version_id).await?;
        Ok(super::hash::hash_stream(reader).await?)
    }

    /// Multipart uploads left behind (a crash mid-upload), for cleanup: key, upload id and
    /// when it began. Every page.
    pub async fn pending_uploads(
        &self,
    ) -> Result<Vec<(String, String, Option<jiff::Timestamp>)>, StoreError> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None, None);
        loop {
            let listed = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| s3_error("ListMultipartUploads", &self.bucket, &self.prefix, e))?;
            out.extend(listed.uploads().iter().filter_map(|u| {
                let initiated = u
                    .initiated()
                    .and_then(|t| jiff::Timestamp::from_second(t.secs()).ok());
                Some((u.key()?.to_string(), u.upload_id()?.to_string(), initiated))
            }));
            if listed.is_truncated() != Some(true) {
                break;
            }
            key_marker = listed.next_key_marker().map(str::to_string);
            id_marker = listed.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && id_marker.is_none() {
                break;
            }
        }
        Ok(out)
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
            options: WriteOptions::default(),
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
