//! The sidecar's messaging on localhost, for agents that would rather speak HTTP than Redis:
//! `POST /v1/messages` `{to, type, body}` -> `{id}`; `GET /v1/messages?max=10&wait=5s` -> the
//! next messages (at-least-once: acknowledge each with `POST /v1/messages/ack`
//! `{entries: [...]}`, or it is delivered again after the claim timeout). The credentials are
//! re-read from the identity directory, so a rotated password is picked up by itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::messaging::client::{Credentials, Mailbox, MailboxError, Options};

/// One connection per direction, so a waiting receive never holds up a send.
struct Local {
    dir: PathBuf,
    options: Options,
    send: Mutex<Option<(String, Mailbox)>>,
    recv: Mutex<Option<(String, Mailbox)>>,
}

/// The connected mailbox in `slot`, reconnected when the password on disk changed.
async fn mailbox<'a>(
    local: &Local,
    slot: &'a mut Option<(String, Mailbox)>,
) -> Result<&'a mut Mailbox, MailboxError> {
    let creds = Credentials::from_dir(&local.dir)?;
    if slot.as_ref().is_none_or(|(p, _)| *p != creds.password) {
        let m = Mailbox::connect(&creds, local.options.clone()).await?;
        *slot = Some((creds.password.clone(), m));
    }
    Ok(&mut slot.as_mut().expect("just set").1)
}

fn refused(e: MailboxError) -> (StatusCode, Json<Value>) {
    match e {
        MailboxError::Refused(r) => {
            let message = r.to_string();
            let field = message.split(':').next().unwrap_or_default().to_string();
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid", "field": field, "message": message})),
            )
        }
        other => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "unavailable", "field": null, "message": other.to_string()})),
        ),
    }
}

#[derive(serde::Deserialize)]
struct Outgoing {
    to: String,
    #[serde(rename = "type")]
    kind: String,
    body: String,
}

#[derive(serde::Deserialize)]
struct Wait {
    max: Option<usize>,
    wait: Option<String>,
}

#[derive(serde::Deserialize)]
struct Ack {
    entries: Vec<String>,
}

/// The routes, for the identity directory `dir`; `consumer` names this pod in the inbox group.
pub fn router(dir: PathBuf, consumer: String, body_limit: usize) -> Router {
    let local = Arc::new(Local {
        dir,
        options: Options {
            consumer,
            body_limit,
            max_block: Duration::from_secs(30),
            ..Options::default()
        },
        send: Mutex::new(None),
        recv: Mutex::new(None),
    });
    Router::new()
        .route(
            "/v1/messages",
            post(
                |State(l): State<Arc<Local>>, Json(m): Json<Outgoing>| async move {
                    let mut slot = l.send.lock().await;
                    let sent = match mailbox(&l, &mut slot).await {
                        Ok(mb) => mb.send(&m.to, &m.kind, &m.body).await,
                        Err(e) => Err(e),
                    };
                    match sent {
                        Ok(id) => (StatusCode::ACCEPTED, Json(json!({ "id": id }))),
                        Err(e) => refused(e),
                    }
                },
            )
            .get(|State(l): State<Arc<Local>>, Query(q): Query<Wait>| async move {
                let wait = match q.wait.as_deref().map(crate::crd::units::parse_duration) {
                    None => Duration::from_secs(5),
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        return (
                            StatusCode::BAD_REQUEST,
                            Json(json!({"error": "invalid", "field": "wait", "message": format!("wait: {e}")})),
                        );
                    }
                };
                let mut slot = l.recv.lock().await;
                let got = match mailbox(&l, &mut slot).await {
                    Ok(mb) => mb.recv(q.max.unwrap_or(10).clamp(1, 1000), wait).await,
                    Err(e) => Err(e),
                };
                match got {
                    Ok(messages) => (StatusCode::OK, Json(json!(messages))),
                    Err(e) => {
                        // A broken connection is rebuilt on the next call.
                        *slot = None;
                        refused(e)
                    }
                }
            }),
        )
        .route(
            "/v1/messages/ack",
            post(
                |State(l): State<Arc<Local>>, Json(a): Json<Ack>| async move {
                    let mut slot = l.send.lock().await;
                    let entries: Vec<&str> = a.entries.iter().map(String::as_str).collect();
                    let done = match mailbox(&l, &mut slot).await {
                        Ok(mb) => mb.ack(&entries).await,
                        Err(e) => Err(e),
                    };
                    match done {
                        Ok(()) => (StatusCode::OK, Json(json!({ "acknowledged": entries.len() }))),
                        Err(e) => refused(e),
                    }
                },
            ),
        )
        .route(
            "/v1/messages/dead",
            get(|State(l): State<Arc<Local>>| async move {
                let mut slot = l.send.lock().await;
                let got = match mailbox(&l, &mut slot).await {
                    Ok(mb) => mb.dead_letters(100).await,
                    Err(e) => Err(e),
                };
                match got {
                    Ok(list) => {
                        let list: Vec<Value> = list
                            .into_iter()
                            .map(|(m, reason)| {
                                let mut v = json!(m);
                                v["reason"] = reason.into();
                                v
                            })
                            .collect();
                        (StatusCode::OK, Json(json!(list)))
                    }
                    Err(e) => refused(e),
                }
            }),
        )
        .with_state(local)
}
