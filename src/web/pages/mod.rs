//! The HTML pages. Each handler loads what its page shows into a plain
//! struct and renders a template from `templates/`; the same URL answers
//! JSON for `Accept: application/json` (through `api`).

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::{AppState, ErrorBody, WebError, api, builds as build_api, wants_json};
use crate::db::builds::{self, BuildStatus};
use crate::db::{evaluations, jobsets, projects, steps};

mod build;
mod deploy;
mod eval;
mod home;
mod job;
mod jobset;
mod log;
mod project;
mod queue;
mod search;

pub use build::*;
pub use deploy::*;
pub use eval::*;
pub use home::*;
pub use job::*;
pub use jobset::*;
pub use log::*;
pub use project::*;
pub use queue::*;
pub use search::*;

/// What the page header needs: whether the viewer is signed in, and the
/// CSRF token its forms carry.
#[derive(Default)]
pub struct Nav {
    pub signed_in: bool,
    pub csrf: String,
}

pub fn nav(s: &AppState, headers: &HeaderMap) -> Nav {
    match super::actions::signed_in(s, headers) {
        Some(csrf) => Nav { signed_in: true, csrf },
        None => Nav::default(),
    }
}

/// Seconds since the epoch as `2026-11-24 08:01:02 UTC`.
pub fn when(ts: i64) -> String {
    let days = ts.div_euclid(86400);
    let secs = ts.rem_euclid(86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs % 3600 / 60, secs % 60)
}

pub fn when_opt(ts: Option<i64>) -> String {
    ts.map(when).unwrap_or_else(|| "–".into())
}

/// A duration as `1h 2m`, `3m 4s` or `5s`.
pub fn duration(secs: i64) -> String {
    let s = secs.max(0);
    if s >= 3600 {
        format!("{}h {}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m {}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// A build's status for people, and the CSS class that colours it.
pub fn status_of(finished: bool, status: Option<i64>) -> (String, &'static str) {
    if !finished {
        return ("queued".into(), "queued");
    }
    match status.and_then(BuildStatus::from_i64) {
        Some(BuildStatus::Succeeded) => ("succeeded".into(), "ok"),
        Some(s @ (BuildStatus::Cancelled | BuildStatus::Aborted | BuildStatus::Unsupported)) => {
            (s.label().into(), "other")
        }
        Some(s) => (s.label().into(), "bad"),
        None => ("unknown".into(), "other"),
    }
}

#[derive(Clone)]
pub struct Row {
    pub id: i64,
    pub project: String,
    pub jobset: String,
    pub job: String,
    pub name: String,
    pub system: String,
    pub status: String,
    pub class: &'static str,
    pub finished_at: String,
    pub took: String,
}

fn row(b: builds::Listed) -> Row {
    let (status, class) = status_of(b.finished, b.build_status);
    Row {
        took: match (b.start_time, b.stop_time) {
            (Some(a), Some(z)) => duration(z - a),
            _ => String::new(),
        },
        finished_at: when_opt(b.stop_time),
        id: b.id,
        project: b.project,
        jobset: b.jobset,
        job: b.job,
        name: b.nix_name,
        system: b.system,
        status,
        class,
    }
}

fn html(t: impl Template) -> Result<Response, WebError> {
    Ok(Html(t.render()?).into_response())
}

/// A step as the build and queue pages list it.
struct StepLine {
    id: i64,
    drv_base: String,
    state: String,
    class: &'static str,
    machine: String,
    took: String,
    phase: String,
    tries: i64,
}
