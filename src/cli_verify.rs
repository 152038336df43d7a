//! `agentry verify`: flags and output; the checks are `agentry::verify`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The namespace the controller is installed in (its Lease, CA and JWKS ConfigMaps, and
    /// the Secrets BackupLocations name).
    #[arg(
        long,
        short = 'n',
        default_value = "agentry-system",
        env = "POD_NAMESPACE"
    )]
    namespace: String,
    /// The controller's leader-election Lease.
    #[arg(long, default_value = "agentry-controller")]
    lease_name: String,
    /// The controller's Deployment (checked when it exists).
    #[arg(long, default_value = "agentry")]
    deployment: String,
    /// A CA expiring within this is reported as a warning.
    #[arg(long, default_value = "720h", value_parser = parse_duration)]
    ca_expiry_warning: Duration,
    /// The agent API to check, e.g. https://127.0.0.1:8443 after
    /// `kubectl -n agentry-system port-forward svc/agentry-api 8443`. Unset: not checked.
    #[arg(long, env = "AGENTRY_API_URL")]
    api_url: Option<String>,
    /// An agent's identity files (tls.crt, tls.key, token, as its Secret holds them): also call
    /// the API over mTLS with its JWT, as that agent.
    #[arg(long)]
    identity_dir: Option<PathBuf>,
    #[command(flatten)]
    redis: crate::cli::RedisArgs,
    /// The config `litestream replicate` runs with: the ledger's and catalog's replicas are
    /// checked against it. Needs --litestream-metrics-url.
    #[arg(long, requires = "litestream_metrics_url")]
    litestream_config: Option<PathBuf>,
    /// Litestream's metrics endpoint (`addr:` in its config), e.g. http://127.0.0.1:9090/metrics.
    #[arg(long, requires = "litestream_config")]
    litestream_metrics_url: Option<String>,
    /// Check only the BackupLocations matching this label selector (the controller's
    /// --backup-location-selector, when it has one).
    #[arg(long)]
    backup_location_selector: Option<String>,
    /// A replica further behind than this (with transactions not yet uploaded) fails.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    max_replication_lag: Duration,
    /// text (a report for people) or json (for scripts).
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: Output,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    agentry::crd::units::parse_duration(s)
}

/// Runs the checks; exit 0 when none failed, 1 when one did, 2 on bad flags.
pub fn run(args: VerifyArgs) -> ExitCode {
    let redis = match args.redis.target() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let litestream = args
        .litestream_config
        .clone()
        .zip(args.litestream_metrics_url.clone())
        .map(|(config, metrics_url)| agentry::verify::Litestream {
            config,
            metrics_url,
            max_lag: args.max_replication_lag,
        });
    let opts = agentry::verify::Options {
        namespace: args.namespace,
        lease_name: args.lease_name,
        ca_configmap: agentry::keys::CA_CONFIGMAP.into(),
        jwks_configmap: agentry::keys::JWKS_CONFIGMAP.into(),
        deployment: args.deployment,
        ca_expiry_warning: args.ca_expiry_warning,
        api_url: args.api_url,
        identity_dir: args.identity_dir,
        redis,
        litestream,
        location_selector: args.backup_location_selector,
    };
    let Some(runtime) = crate::cli::runtime() else {
        return ExitCode::FAILURE;
    };
    let report = runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("no Kubernetes client ({e}); set KUBECONFIG or run in a pod"))?;
        Ok::<_, String>(agentry::verify::run(&client, &opts).await)
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.output {
        Output::Text => print!("{}", report.render_text()),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
    }
    if report.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
