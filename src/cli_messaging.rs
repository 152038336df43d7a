//! `agentry send` and `agentry recv`: an agent's inbox from a shell, with its own credentials
//! (the identity Secret's `redis.json` and `redis-password`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use agentry::messaging::Message;
use agentry::messaging::client::{Credentials, Mailbox, MailboxError, Options};

#[derive(Args, Clone)]
pub struct MailboxArgs {
    /// The agent's identity directory (its mounted identity Secret, with redis.json and
    /// redis-password when spec.messaging is enabled).
    #[arg(long, env = "AGENTRY_IDENTITY_DIR", default_value = agentry::workload::IDENTITY_MOUNT)]
    pub identity_dir: PathBuf,
    /// The largest body sent (the controller's --message-body-limit; bigger bodies are refused
    /// before anything is written).
    #[arg(long, default_value = "64Ki", value_parser = parse_size)]
    pub body_limit: usize,
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub mailbox: MailboxArgs,
    /// The receiving Agent, as namespace/name.
    #[arg(long)]
    pub to: String,
    /// The message type, e.g. task.request.
    #[arg(long = "type", default_value = "message")]
    pub kind: String,
    /// The body (UTF-8 text, e.g. JSON).
    #[arg(long, conflicts_with = "body_file")]
    pub body: Option<String>,
    /// Read the body from this file (`-`: standard input).
    #[arg(long)]
    pub body_file: Option<PathBuf>,
}

#[derive(Args)]
pub struct RecvArgs {
    #[command(flatten)]
    pub mailbox: MailboxArgs,
    /// Keep receiving until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// The most messages per read.
    #[arg(long, default_value_t = 10)]
    pub count: usize,
    /// How long to wait for a message (without --follow: then exit).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub wait: Duration,
    /// This reader's name in the inbox's consumer group (default: the pod or host name).
    #[arg(long, env = "POD_NAME")]
    pub consumer: Option<String>,
    /// Take over messages another reader received but did not acknowledge for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub claim_idle: Duration,
    /// Run this shell command per message, with the message as JSON on stdin; the message is
    /// acknowledged only when it exits 0 (otherwise it is delivered again after --claim-idle,
    /// and after 5 deliveries it goes to the dead-letter stream).
    #[arg(long)]
    pub exec: Option<String>,
    /// Print without acknowledging.
    #[arg(long, conflicts_with = "exec")]
    pub no_ack: bool,
    /// List the dead-letter stream instead (with why each message is there).
    #[arg(long, conflicts_with_all = ["follow", "exec", "no_ack"])]
    pub dead: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    agentry::crd::units::parse_duration(s)
}

fn parse_size(s: &str) -> Result<usize, String> {
    agentry::crd::units::parse_memory(s).map(|b| b as usize)
}

fn fail(e: MailboxError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        MailboxError::Refused(_) | MailboxError::Credentials(_) => ExitCode::from(2),
        MailboxError::Redis(_) => ExitCode::FAILURE,
    }
}

async fn open(args: &MailboxArgs, options: Options) -> Result<Mailbox, MailboxError> {
    let creds = Credentials::from_dir(&args.identity_dir)?;
    Mailbox::connect(
        &creds,
        Options {
            body_limit: args.body_limit,
            ..options
        },
    )
    .await
}

/// `agentry send`: prints the message id. Exit 2 when the message is refused (bad target,
/// type or body; the relay refuses unknown targets and policy later, with a notice of type
/// `agentry.undeliverable` in the sender's inbox).
pub fn run_send(args: SendArgs) -> ExitCode {
    let body = match (&args.body, &args.body_file) {
        (Some(b), _) => b.clone(),
        (None, Some(path)) => {
            let read = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(path)
            };
            match read {
                Ok(b) => b,
                Err(e) => {
                    eprintln!(
                        "error: --body-file {}: {e} (the body must be UTF-8 text)",
                        path.display()
                    );
                    return ExitCode::from(2);
                }
            }
        }
        (None, None) => {
            eprintln!("error: give --body or --body-file");
            return ExitCode::from(2);
        }
    };
    let Some(runtime) = crate::cli::runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let mut mailbox = match open(&args.mailbox, Options::default()).await {
            Ok(m) => m,
            Err(e) => return fail(e),
        };
        match mailbox.send(&args.to, &args.kind, &body).await {
            Ok(id) => {
                println!("{id}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        }
    })
}

/// `agentry recv`: messages as JSON lines on stdout.
pub fn run_recv(args: RecvArgs) -> ExitCode {
    let Some(runtime) = crate::cli::runtime() else {
        return ExitCode::FAILURE;
    };
    let consumer = args.consumer.clone().unwrap_or_else(|| {
        hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "cli".into())
    });
    runtime.block_on(async {
        let options = Options {
            consumer,
            claim_idle: args.claim_idle,
            max_block: args.wait.max(Duration::from_millis(1)),
            ..Options::default()
        };
        let mut mailbox = match open(&args.mailbox, options).await {
            Ok(m) => m,
            Err(e) => return fail(e),
        };
        if args.dead {
            return match mailbox.dead_letters(args.count).await {
                Ok(list) => {
                    for (message, reason) in list {
                        let mut v = serde_json::to_value(&message).unwrap_or_default();
                        v["reason"] = reason.into();
                        println!("{v}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            };
        }
        loop {
            let got = tokio::select! {
                got = mailbox.recv(args.count, args.wait) => got,
                _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            };
            let messages = match got {
                Ok(m) => m,
                Err(MailboxError::Redis(e)) if args.follow => {
                    // The connection reconnects by itself; say so and go on.
                    eprintln!("warning: redis: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => return fail(e),
            };
            for message in &messages {
                if let Err(code) = handle(&mut mailbox, message, &args).await {
                    return code;
                }
            }
            if !args.follow {
                return ExitCode::SUCCESS;
            }
        }
    })
}

/// Prints or runs one message, then acknowledges it unless told not to.
async fn handle(mailbox: &mut Mailbox, message: &Message, args: &RecvArgs) -> Result<(), ExitCode> {
    let json = serde_json::to_string(message).unwrap_or_default();
    let ack = match &args.exec {
        None => {
            println!("{json}");
            !args.no_ack
        }
        Some(command) => run_handler(command, &json, message).await,
    };
    if ack {
        mailbox.ack(&[&message.entry]).await.map_err(fail)?;
    }
    Ok(())
}

/// Runs `sh -c command` with the message on stdin; true when it exited 0.
async fn run_handler(command: &str, json: &str, message: &Message) -> bool {
    use tokio::io::AsyncWriteExt;
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("AGENTRY_MESSAGE_ID", &message.id)
        .env("AGENTRY_MESSAGE_FROM", &message.from)
        .env("AGENTRY_MESSAGE_TYPE", &message.kind)
        .env("AGENTRY_MESSAGE_DELIVERIES", message.deliveries.to_string())
        .stdin(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: running --exec: {e}");
            return false;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(json.as_bytes()).await;
    }
    match child.wait().await {
        Ok(status) if status.success() => true,
        Ok(status) => {
            eprintln!(
                "message {} not acknowledged: the handler exited with {status} (delivery {})",
                message.id, message.deliveries
            );
            false
        }
        Err(e) => {
            eprintln!("error: waiting for --exec: {e}");
            false
        }
    }
}
