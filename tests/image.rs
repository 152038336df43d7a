//! The controller image (`make image`, hack/build-image): an OCI image layout tar, taken apart
//! here with tar and the OCI JSON documents alone (no Docker, no registry). Every blob matches
//! its digest; the config runs the binary as 65532 with the binary as the entrypoint and carries
//! the OCI labels; the one layer holds the binary, passwd/group, the CA bundle and /tmp, and no
//! shell. The binary is run from the extracted layer as the root directory (`unshare --root`):
//! nothing of this machine's libc or loader is reachable, as on an empty base. The chart's
//! default image is the one `make image` names.
//!
//! hack/build-image is called each time: warm (what `make test` leaves, since `e2e` depends on
//! `image`) it takes seconds; cold it is a release build of the whole crate.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sha2::{Digest, Sha256};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");
const ENTRYPOINT: &str = "/usr/local/bin/agentry";

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds (or, warm, refreshes) the image: (its name, the archive).
fn build_image() -> (String, PathBuf) {
    let script = Path::new(ROOT).join("hack/build-image");
    let name = stdout(&run(&mut Command::new(&script)));
    let path = stdout(&run(Command::new(&script).arg("--print-path")));
    (
        name.lines().last().unwrap_or_default().to_string(),
        path.into(),
    )
}

/// The archive unpacked: the OCI layout's directory.
struct Layout {
    dir: tempfile::TempDir,
}

impl Layout {
    fn unpack(archive: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(dir.path()));
        Self { dir }
    }

    fn json(&self, file: &str) -> Value {
        let path = self.dir.path().join(file);
        let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A blob by its descriptor, checked against the descriptor's digest and size.
    fn blob(&self, descriptor: &Value) -> Vec<u8> {
        let digest = descriptor["digest"].as_str().expect("a digest");
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        let bytes = std::fs::read(self.dir.path().join("blobs/sha256").join(hex))
            .unwrap_or_else(|e| panic!("blob {digest}: {e}"));
        assert_eq!(sha256_hex(&bytes), hex, "blob {digest}: content");
        assert_eq!(
            Some(bytes.len() as u64),
            descriptor["size"].as_u64(),
            "blob {digest}: size"
        );
        bytes
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `tar -tv --numeric-owner` of the layer: path -> (mode string, owner uid/gid).
fn layer_entries(layer: &Path) -> BTreeMap<String, (String, String)> {
    let listing = stdout(&run(Command::new("tar")
        .args(["--numeric-owner", "-tvzf"])
        .arg(layer)));
    listing
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let path = fields.last().unwrap().trim_end_matches('/').to_string();
            (path, (fields[0].to_string(), fields[1].to_string()))
        })
        .collect()
}

/// The image's manifest and config, every blob verified on the way.
fn manifest_and_config(layout: &Layout, name: &str) -> (Value, Value) {
    assert_eq!(
        layout.json("oci-layout")["imageLayoutVersion"],
        "1.0.0",
        "an OCI image layout"
    );
    let index = layout.json("index.json");
    let manifests = index["manifests"].as_array().expect("index.manifests");
    assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
    let descriptor = &manifests[0];
    assert_eq!(
        descriptor["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    // docker load and ctr import read the first, podman load the second.
    for key in [
        "io.containerd.image.name",
        "org.opencontainers.image.ref.name",
    ] {
        assert_eq!(descriptor["annotations"][key], name, "{key} in {index}");
    }
    let manifest: Value = serde_json::from_slice(&layout.blob(descriptor)).unwrap();
    let config: Value = serde_json::from_slice(&layout.blob(&manifest["config"])).unwrap();
    (manifest, config)
}

#[test]
fn image_is_an_oci_archive_of_a_static_binary_on_an_empty_base() {
    let (name, archive) = build_image();
    assert_eq!(name, format!("ghcr.io/agentry-dev/agentry:{VERSION}"));
    assert_eq!(
        archive,
        Path::new(ROOT).join(format!("target/image/agentry-{VERSION}.oci.tar"))
    );
    let layout = Layout::unpack(&archive);
    let (manifest, config) = manifest_and_config(&layout, &name);

    check_config(&config);
    let layer_path = single_layer(&layout, &manifest, &config);

    // What the layer holds: exactly this, owned by root; no shell, no libc, no loader.
    let entries = layer_entries(&layer_path);
    let paths: Vec<&str> = entries.keys().map(String::as_str).collect();
    assert_eq!(
        paths,
        [
            "etc",
            "etc/group",
            "etc/passwd",
            "etc/ssl",
            "etc/ssl/certs",
            "etc/ssl/certs/ca-certificates.crt",
            "tmp",
            "usr",
            "usr/local",
            "usr/local/bin",
            "usr/local/bin/agentry",
        ]
    );
    assert_eq!(
        entries["usr/local/bin/agentry"],
        ("-rwxr-xr-x".into(), "0/0".into())
    );
    assert_eq!(entries["tmp"], ("drwxrwxrwt".into(), "0/0".into()));
    let rootfs = extract(&layout, &layer_path);
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("nonroot:x:65532:65532:"), "{passwd}");
    let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap();
    assert!(group.contains("nonroot:x:65532:"), "{group}");
    let bundle = std::fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(
        bundle.matches("BEGIN CERTIFICATE").count() > 50,
        "a CA bundle"
    );

    // It runs with the layer as its root directory, with an empty environment.
    let version = in_image_root(&rootfs, &["--version"], &[]);
    assert!(
        version.status.success() && stdout(&version).contains(VERSION),
        "agentry --version from the image: {version:?}"
    );
}

/// The config: who and what runs, and the labels.
fn check_config(config: &Value) {
    let run_config = &config["config"];
    assert_eq!(run_config["User"], "65532:65532", "{config}");
    assert_eq!(run_config["Entrypoint"], serde_json::json!([ENTRYPOINT]));
    assert!(run_config["Cmd"].is_null(), "no Cmd: {config}");
    assert_eq!(
        (&config["os"], &config["architecture"]),
        (&"linux".into(), &"amd64".into())
    );
    let labels = &run_config["Labels"];
    assert_eq!(labels["org.opencontainers.image.title"], "agentry");
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert_eq!(
        labels["org.opencontainers.image.licenses"],
        env!("CARGO_PKG_LICENSE")
    );
    assert_eq!(
        labels["org.opencontainers.image.source"],
        "https://github.com/agentry-dev/agentry"
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap();
    assert!(
        revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()),
        "revision: {revision}"
    );
    let created = labels["org.opencontainers.image.created"].as_str().unwrap();
    assert!(
        created.parse::<jiff::Timestamp>().is_ok(),
        "created: {created}"
    );
}

/// The image's one layer (checked against the config's rootfs diff_id), written out as a file.
fn single_layer(layout: &Layout, manifest: &Value, config: &Value) -> PathBuf {
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer on an empty base: {manifest}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let compressed = layout.blob(&layers[0]);
    let layer_path = layout.dir.path().join("layer.tar.gz");
    std::fs::write(&layer_path, &compressed).unwrap();
    let uncompressed = run(Command::new("gzip").arg("-dc").arg(&layer_path)).stdout;
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([format!("sha256:{}", sha256_hex(&uncompressed))])
    );
    layer_path
}

/// The layer extracted into the layout's dir: the image's root directory.
fn extract(layout: &Layout, layer: &Path) -> PathBuf {
    let rootfs = layout.dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    run(Command::new("tar")
        .args(["--no-same-owner", "-xzf"])
        .arg(layer)
        .arg("-C")
        .arg(&rootfs));
    rootfs
}

/// Runs the image's binary with the extracted layer as `/` (an unprivileged user namespace, so
/// no root is needed), with only `env` in its environment.
fn in_image_root(rootfs: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--root"])
        .arg(rootfs)
        .arg(ENTRYPOINT)
        .args(args)
        .env_clear()
        .envs(env.iter().copied());
    cmd.output().expect("running unshare (util-linux)")
}

/// The chart installs the image `make image` names: the rendered Deployment's image (and the
/// agents' sidecar image) is `ghcr.io/agentry-dev/agentry:<Cargo version>`.
#[test]
fn chart_default_image_is_the_one_make_image_names() {
    let name = stdout(&run(
        Command::new(Path::new(ROOT).join("hack/build-image")).arg("--print-name")
    ));
    let chart = Path::new(ROOT).join("charts/agentry");
    let rendered = stdout(&run(Command::new(common::tool_dir().join("helm"))
        .args(["template", "agentry"])
        .arg(&chart)
        .args(["--show-only", "templates/deployment.yaml"])));
    let deployment: Value = serde_saphyr::from_str(&rendered).unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], name.as_str());
    let sidecar = format!("--sidecar-image={name}");
    assert!(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == sidecar.as_str()),
        "{container}"
    );
    let chart_yaml: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart.join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        chart_yaml["appVersion"], VERSION,
        "Chart.yaml appVersion must follow Cargo.toml's version"
    );
}

/// From the image's root directory the binary resolves a name (glibc's built-in lookups read
/// /etc/hosts, as in a pod, where the kubelet mounts it) and speaks TLS to the apiserver (rustls
/// with aws-lc, statically linked), which answers. Needs the local cluster.
#[test]
fn image_binary_reaches_the_apiserver_by_name_over_tls() {
    let (name, archive) = build_image();
    let layout = Layout::unpack(&archive);
    let (manifest, config) = manifest_and_config(&layout, &name);
    let rootfs = extract(&layout, &single_layer(&layout, &manifest, &config));
    std::fs::write(
        rootfs.join("etc/hosts"),
        "127.0.0.1 localhost\n127.0.0.1 kubernetes.default.svc\n",
    )
    .unwrap();
    // The apiserver by a name on its certificate instead of 127.0.0.1.
    let path = std::env::var("KUBECONFIG").expect("KUBECONFIG: run with `make test`");
    let config = kube::config::Kubeconfig::read_from(&path).unwrap();
    let mut config = serde_json::to_value(&config).unwrap();
    for cluster in config["clusters"].as_array_mut().unwrap() {
        let server = cluster["cluster"]["server"].as_str().unwrap();
        let port = server.rsplit(':').next().unwrap();
        cluster["cluster"]["server"] = format!("https://kubernetes.default.svc:{port}").into();
    }
    std::fs::write(rootfs.join("tmp/kubeconfig"), config.to_string()).unwrap();
    let out = in_image_root(
        &rootfs,
        &[
            "ca",
            "status",
            "--namespace",
            "default",
            "--ca-secret",
            "agentry-image-check",
        ],
        &[("KUBECONFIG", "/tmp/kubeconfig")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("secrets \"agentry-image-check\" not found")
            && stderr.contains("code: 404"),
        "the apiserver's answer (404 for a Secret that does not exist) expected: {out:?}"
    );
}

/// A `crane registry serve` on 127.0.0.1, stopped when dropped.
struct Registry {
    child: std::process::Child,
    port: u16,
}

impl Registry {
    fn start(crane: &Path) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(crane)
            .args(["registry", "serve", "--address", "127.0.0.1:0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting crane registry serve");
        // Its log goes on being read (a closed pipe would end it at its next line).
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(port) = line.split("serving on port ").nth(1) {
                    let _ = tx.send(port.trim().parse::<u16>().ok());
                }
            }
        });
        let port = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .ok()
            .flatten()
            .expect("crane registry serve printed no port");
        Self { child, port }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// docs/install.md's push: `crane push` of the unpacked archive (an OCI layout directory) to a
/// registry serves the very manifest and config the archive holds.
#[test]
fn image_pushes_from_its_unpacked_layout() {
    let (name, archive) = build_image();
    let layout = Layout::unpack(&archive);
    let (_, config) = manifest_and_config(&layout, &name);
    let crane_dir = stdout(&run(
        Command::new(Path::new(ROOT).join("hack/build-crane")).arg("--print-dir")
    ));
    let crane = Path::new(&crane_dir).join("crane");
    let registry = Registry::start(&crane);
    let reference = format!("127.0.0.1:{}/agentry:{VERSION}", registry.port);
    run(Command::new(&crane)
        .arg("push")
        .arg(layout.dir.path())
        .arg(&reference));
    let pushed: Value = serde_json::from_str(&stdout(&run(
        Command::new(&crane).args(["config", &reference])
    )))
    .unwrap();
    assert_eq!(pushed, config);
    let digest = stdout(&run(Command::new(&crane).args(["digest", &reference])));
    assert_eq!(
        layout.json("index.json")["manifests"][0]["digest"],
        digest.as_str()
    );
}
