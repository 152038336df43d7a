//! The two real S3 stores `make test` starts (`hack/s3-stores`): their settings, and an
//! independent reader (boto3 + Python's blake3).

use std::collections::HashMap;

use agentry::backup::store::{ChecksumMode, StoreConfig};

/// What `hack/s3-stores env` prints.
pub fn env() -> HashMap<String, String> {
    let out = std::process::Command::new("hack/s3-stores")
        .arg("env")
        .output()
        .expect("running hack/s3-stores env");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.trim_matches('\'').trim_matches('"').to_string(),
            )
        })
        .collect()
}

/// The stores' settings, each under a fresh random prefix.
pub fn stores() -> (StoreConfig, StoreConfig) {
    let env = env();
    let get = |k: &str| {
        env.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("{k} missing from hack/s3-stores env (run `make s3-up`)"))
    };
    let store = |which: &str, mode| StoreConfig {
        endpoint: get(&format!("AGENTRY_S3_{which}_ENDPOINT")),
        region: get("AWS_REGION"),
        bucket: get(&format!("AGENTRY_S3_{which}_BUCKET")),
        prefix: format!("test-{:08x}/", rand::random::<u32>()),
        access_key: get(&format!("AGENTRY_S3_{which}_ACCESS_KEY")),
        secret_key: get(&format!("AGENTRY_S3_{which}_SECRET_KEY")),
        force_path_style: true,
        checksum_mode: mode,
        options: Default::default(),
    };
    (
        store("PRIMARY", ChecksumMode::WhenSupported),
        store("SECONDARY", ChecksumMode::WhenRequired),
    )
}

/// boto3 + blake3 (Python) read the object back and hash it: an independent check.
pub fn python_blake3(cfg: &StoreConfig, key: &str, version: Option<&str>) -> String {
    let python = std::env::var("AGENTRY_PYTHON").unwrap_or("python3".into());
    let script = r#"
import sys, boto3, blake3
endpoint, bucket, key, version, access, secret = sys.argv[1:7]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=access, aws_secret_access_key=secret,
                  config=boto3.session.Config(s3={"addressing_style": "path"}))
args = {"Bucket": bucket, "Key": key}
if version != "-":
    args["VersionId"] = version
print(blake3.blake3(s3.get_object(**args)["Body"].read()).hexdigest())
"#;
    let out = std::process::Command::new(python)
        .args([
            "-c",
            script,
            &cfg.endpoint,
            &cfg.bucket,
            key,
            version.unwrap_or("-"),
            &cfg.access_key,
            &cfg.secret_key,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
