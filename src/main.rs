//! `agentry`: one binary, clap subcommands. Dispatch only; the flags live in `cli`, the work in
//! the library.
#![forbid(unsafe_code)]

mod cli;
mod cli_backup;
mod cli_messaging;
mod cli_verify;

use std::process::ExitCode;

use clap::Parser;

use agentry::telemetry;
use cli::{Cli, Command, CrdPart};

/// jemalloc, not the system's malloc: a controller's memory is many small long-lived objects
/// (its watch caches) made between many short-lived ones (each watch event, each request),
/// and glibc's malloc keeps the pages of that churn resident. At 10,000 Agents, measured:
/// 168.7 MiB with glibc against ~110 with jemalloc at the same point of the rollout
/// (docs/scale.md, Memory).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
    // One TLS crypto provider for the whole process (kube, rustls, jsonwebtoken all use aws-lc-rs).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match cli.command {
        Command::Ca(command) => cli::run_ca(command),
        Command::Crd(args) => {
            let rendered = match args.only {
                CrdPart::All => agentry::crd::render_yaml(),
                CrdPart::Crds => agentry::crd::render_crds(),
                CrdPart::ChartPolicy => agentry::crd::render_chart_policy(),
            };
            match rendered {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: rendering the CRDs failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Register(args) => cli::run_register(args),
        Command::Backup(command) => cli_backup::run(command),
        Command::Send(args) => cli_messaging::run_send(args),
        Command::Recv(args) => cli_messaging::run_recv(args),
        Command::Sidecar(args) => cli::run_sidecar(args),
        Command::Verify(args) => cli_verify::run(args),
        Command::Openapi => {
            print!("{}", agentry::api::openapi::document());
            ExitCode::SUCCESS
        }
        Command::Controller(args) => {
            let config = match args.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let Some(runtime) = cli::runtime() else {
                return ExitCode::FAILURE;
            };
            match runtime.block_on(agentry::controller::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "controller stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
