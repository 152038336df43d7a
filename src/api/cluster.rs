//! The API's two writes to and questions of the cluster: an Agent's registration status
//! (server-side apply under its own field manager) and TokenReview.

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};

use super::state::{Registrar, TokenReviewer};
use crate::crd::{Agent, RegistrationStatus};
use crate::keys::{API_MANAGER, conditions::REGISTERED};

pub struct KubeRegistrar(pub Client);

impl Registrar for KubeRegistrar {
    fn record<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        registration: &'a RegistrationStatus,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let api: Api<Agent> = Api::namespaced(self.0.clone(), namespace);
            let now = k8s_openapi::jiff::Timestamp::now();
            let condition = Condition {
                type_: REGISTERED.into(),
                status: "True".into(),
                reason: "Registered".into(),
                message: format!(
                    "registered capabilities [{}]{}",
                    registration.capabilities.join(", "),
                    registration
                        .client_version
                        .as_ref()
                        .map(|v| format!(" with {v}"))
                        .unwrap_or_default()
                ),
                last_transition_time: Time(now),
                observed_generation: None,
            };
            let patch = serde_json::json!({
                "apiVersion": Agent::api_version(&()),
                "kind": Agent::kind(&()),
                "status": {"registration": registration, "conditions": [condition]},
            });
            api.patch_status(
                name,
                &PatchParams::apply(API_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
    }
}

pub struct KubeTokenReviewer(pub Client);

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, String>> {
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: Some(vec![audience.to_string()]),
                },
                ..Default::default()
            };
            let api: Api<TokenReview> = Api::all(self.0.clone());
            let answer = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| e.to_string())?;
            let Some(status) = answer.status else {
                return Ok(None);
            };
            let audience_ok = status
                .audiences
                .as_ref()
                .is_some_and(|a| a.iter().any(|x| x == audience));
            if status.authenticated != Some(true) || !audience_ok {
                return Ok(None);
            }
            Ok(status.user.and_then(|u| u.username))
        })
    }
}
