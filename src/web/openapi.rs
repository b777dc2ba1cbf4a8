//! The OpenAPI document of the JSON API, served at `/api/openapi.json`.
//! It is generated from the handlers' own annotations and the response
//! types' definitions, so it cannot drift from what the code answers; the
//! test suite runs schemathesis against it.

use std::sync::OnceLock;

use axum::Json;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{actions, api, badges, builds, channel, hydra, live, pages, webhooks};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Kiln",
        description = "Kiln's JSON API. Every page answers JSON at the same URL for `Accept: application/json`, \
            with Hydra's field names for projects, jobsets, evaluations and builds. Writes need \
            `Authorization: Bearer <token>`. Build status codes are Hydra's: 0 succeeded, 1 failed, \
            2 dependency failed, 3 aborted, 4 cancelled, 6 failed with output, 7 timed out, \
            8 cached failure, 9 unsupported system, 10 log limit exceeded, 11 output limit exceeded, \
            12 not deterministic."
    ),
    paths(
        pages::home,
        pages::project,
        api::put_project,
        api::delete_project,
        pages::jobset,
        api::get_jobset_evals,
        pages::eval,
        pages::build,
        pages::build_log,
        pages::job,
        pages::queue,
        pages::machines,
        pages::search,
        pages::environments,
        pages::environment,
        pages::deployment,
        actions::deployment_action,
        actions::environment_deploy,
        actions::build_action,
        actions::build_keep,
        actions::eval_action,
        actions::jobset_action,
        actions::machine_action,
        api::push,
        webhooks::github,
        webhooks::forge,
        hydra::jobsets,
        hydra::latest_builds,
        hydra::queue,
        hydra::nr_builds,
        hydra::queue_summary,
        hydra::latest_finished,
        hydra::latest_for,
        hydra::shield,
        hydra::eval_job,
        hydra::constituents,
        hydra::download,
        channel::jobset_latest,
        channel::jobset_latest_file,
        channel::job_latest,
        channel::job_latest_file,
        badges::jobset,
        badges::job,
        builds::job_latest,
        builds::job_latest_output,
        live::events,
        super::healthz,
        super::readyz,
        super::metrics,
        openapi_json,
    ),
    modifiers(&Token),
    tags(
        (name = "pages", description = "Every page, as JSON"),
        (name = "projects", description = "Creating and removing projects"),
        (name = "actions", description = "Acting on builds, evaluations, jobsets and machines (token)"),
        (name = "deploy", description = "Stable URLs of the latest good outputs"),
        (name = "github", description = "Webhooks from GitHub"),
    )
)]
pub struct ApiDoc;

struct Token;

impl Modify for Token {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("token", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The document, built once.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(ApiDoc::openapi)
}

#[utoipa::path(get, path = "/api/openapi.json", tag = "service",
    responses((status = 200, description = "this document", content_type = "application/json", body = Object)))]
pub async fn openapi_json() -> Response {
    Json(document()).into_response()
}
