//! The backup store layer against the two real S3 servers `make test` starts on loopback
//! (`hack/s3-stores`): versitygw as the primary, SeaweedFS as the B2-like secondary (in the
//! checksum mode B2 needs). Bytes are checked independently with boto3 and Python's blake3.

use std::collections::HashMap;
use std::time::Duration;

use agentry::backup::store::S3Store;

mod common;
use common::s3::{pseudo_random, python_blake3, stores};

#[tokio::test]
async fn a_streamed_backup_lands_identically_in_both_stores() {
    let (primary_cfg, secondary_cfg) = stores();
    let data = pseudo_random(20 * 1024 * 1024 + 12345, 7);
    let expected = blake3::hash(&data).to_hex().to_string();
    for cfg in [&primary_cfg, &secondary_cfg] {
        let store = S3Store::new(cfg);
        let meta = HashMap::from([("agent".to_string(), "team-a/x".to_string())]);
        let up = store
            .put_stream("team-a/x/b1.tar.zst", &data[..], meta)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", cfg.endpoint));
        assert_eq!(up.size, data.len() as u64);
        assert_eq!(up.blake3, expected, "hashed while streaming");
        assert!(
            up.version_id.is_some(),
            "{}: versioning is on",
            cfg.endpoint
        );
        let (stored, size) = store
            .hash_object(&up.key, up.version_id.as_deref())
            .await
            .unwrap();
        assert_eq!(
            (stored.as_str(), size),
            (expected.as_str(), data.len() as u64),
            "re-read"
        );
        assert_eq!(
            python_blake3(cfg, &up.key, up.version_id.as_deref()),
            expected,
            "boto3 + blake3"
        );
        assert!(
            store.pending_uploads().await.unwrap().is_empty(),
            "no multipart upload left"
        );
    }
}

/// A stream that fails midway (the sidecar dies) leaves no object and no pending upload.
#[tokio::test]
async fn a_failed_upload_is_aborted_and_leaves_nothing() {
    struct Failing(usize);
    impl tokio::io::AsyncRead for Failing {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.0 == 0 {
                return std::task::Poll::Ready(Err(std::io::Error::other("the sidecar went away")));
            }
            let n = self.0.min(buf.remaining()).min(64 * 1024);
            buf.put_slice(&vec![7u8; n]);
            self.0 -= n;
            std::task::Poll::Ready(Ok(()))
        }
    }
    let (primary_cfg, secondary_cfg) = stores();
    for cfg in [&primary_cfg, &secondary_cfg] {
        let store = S3Store::new(cfg);
        let err = store
            .put_stream(
                "team-a/x/broken.tar.zst",
                Failing(12 * 1024 * 1024),
                HashMap::new(),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("went away"), "{err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            store.pending_uploads().await.unwrap().is_empty(),
            "{}: aborted",
            cfg.endpoint
        );
        assert!(
            store
                .hash_object(&store.key("team-a/x/broken.tar.zst"), None)
                .await
                .is_err(),
            "no object"
        );
    }
}

/// Wrong credentials are refused with the store's answer in the error.
#[tokio::test]
async fn wrong_credentials_are_refused_clearly() {
    let (mut primary_cfg, _) = stores();
    primary_cfg.secret_key = "wrong".into();
    let err = S3Store::new(&primary_cfg)
        .put_stream("x", &b"abc"[..], HashMap::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("CreateMultipartUpload"), "{err}");
}
