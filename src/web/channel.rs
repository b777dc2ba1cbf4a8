//! Nix channels, as Hydra serves them: `…/channel/latest` of a jobset is
//! its newest evaluation whose every job built successfully (of a job: its
//! newest successful build, with an aggregate's constituents), and
//! `nix-channel --add <url> <name>` reads `<url>/nixexprs.tar.xz` (a Nix
//! expression naming each job's outputs) and `<url>/binary-cache-url`
//! (this cache). The expression refers to the outputs by store path, so
//! using the channel substitutes them from the binary cache; nothing is
//! built on the client.

use std::io::Write;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{AppState, ErrorBody, WebError};
use crate::db::{builds, evaluations, jobsets};

/// What a channel holds: one build per job.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Channel {
    /// The evaluation it is (for a jobset's channel).
    eval: Option<i64>,
    builds: Vec<ChannelBuild>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ChannelBuild {
    id: i64,
    job: String,
    nixname: String,
    system: String,
    /// Output name to store path.
    outputs: std::collections::BTreeMap<String, String>,
}

/// How many evaluations back a jobset's channel looks for an all-green one.
const LOOK_BACK: i64 = 50;

async fn of_jobset(s: &AppState, project: &str, jobset: &str) -> Result<Channel, WebError> {
    let mut c = s.db.conn().await?;
    let j = jobsets::get(c.ex(), project, jobset)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("jobset {project}:{jobset}")))?;
    for e in evaluations::latest(c.ex(), j.id, LOOK_BACK).await?.into_iter().filter(|e| e.status == "succeeded") {
        let cells = evaluations::cells(c.ex(), &[e.id]).await?;
        let green = !cells.is_empty()
            && cells.iter().all(|c| c.error.is_none() && c.finished == Some(true) && c.build_status == Some(0));
        if green {
            let ids: Vec<i64> = cells.iter().filter_map(|c| c.build_id).collect();
            return Ok(Channel { eval: Some(e.id), builds: channel_builds(&mut c, &ids).await? });
        }
    }
    Err(WebError::NotFound(format!("an evaluation of {project}:{jobset} whose every job succeeded")))
}

async fn of_job(s: &AppState, project: &str, jobset: &str, job: &str) -> Result<Channel, WebError> {
    let mut c = s.db.conn().await?;
    let j = jobsets::get(c.ex(), project, jobset)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("jobset {project}:{jobset}")))?;
    let b = builds::latest_successful(c.ex(), j.id, job)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("a successful build of {project}:{jobset}:{job}")))?;
    let mut ids = vec![b.id];
    if b.is_aggregate {
        ids.extend(builds::constituents(c.ex(), b.id).await?);
    }
    Ok(Channel { eval: None, builds: channel_builds(&mut c, &ids).await? })
}

async fn channel_builds(c: &mut crate::db::Conn, ids: &[i64]) -> Result<Vec<ChannelBuild>, WebError> {
    let mut out = Vec::new();
    for b in builds::get_many(c.ex(), ids).await? {
        let outputs = builds::outputs(c.ex(), b.id).await?.into_iter().map(|o| (o.name, o.path)).collect();
        out.push(ChannelBuild { id: b.id, job: b.job, nixname: b.nix_name, system: b.system, outputs });
    }
    out.sort_by(|a, b| a.job.cmp(&b.job));
    Ok(out)
}

/// A Nix string literal.
fn nix_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace("${", "\\${"))
}

/// The channel's `default.nix`: each job as a derivation-shaped set whose
/// outputs are the built store paths.
pub fn expression(what: &str, ch: &Channel) -> String {
    // Each output is a set of its own, as in a real derivation (nix-env
    // reads `drv.${output}` for every name in `outputs`).
    let mut e = format!(
        "# A Kiln channel: {what}.\n{{ ... }}:\nlet\n  built = name: system: outputs:\n    let\n      \
         common = {{ type = \"derivation\"; inherit name system; outputs = builtins.attrNames outputs; }}\n        \
         // builtins.mapAttrs (n: _: one n) outputs;\n      \
         one = n: common // {{ outputName = n; outPath = builtins.storePath outputs.${{n}}; }};\n    \
         in one (if outputs ? out then \"out\" else builtins.head (builtins.attrNames outputs));\nin {{\n"
    );
    // Attribute paths nest (`tools.fmt` is `tools` then `fmt`), as the
    // flake's own outputs do; a job whose path another job's passes
    // through stays a quoted name of its own.
    #[derive(Default)]
    struct Node {
        leaf: Option<String>,
        children: std::collections::BTreeMap<String, Node>,
    }
    let mut root = Node::default();
    for b in &ch.builds {
        let outs: Vec<String> = b.outputs.iter().map(|(n, p)| format!("{} = {};", nix_str(n), nix_str(p))).collect();
        let value = format!("built {} {} {{ {} }}", nix_str(&b.nixname), nix_str(&b.system), outs.join(" "));
        let mut node = &mut root;
        for part in b.job.split('.') {
            node = node.children.entry(part.to_string()).or_default();
        }
        node.leaf = Some(value);
    }
    fn print(node: &Node, out: &mut String, prefix: &str, depth: usize) {
        let pad = "  ".repeat(depth);
        for (name, child) in &node.children {
            let full = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            match (&child.leaf, child.children.is_empty()) {
                (Some(v), true) => out.push_str(&format!("{pad}{} = {v};\n", nix_str(name))),
                (Some(v), false) => {
                    // Both a job and a set of jobs: each keeps its whole name.
                    out.push_str(&format!("{pad}{} = {v};\n", nix_str(name)));
                    flat(child, out, &full, &pad);
                }
                (None, _) => {
                    out.push_str(&format!("{pad}{} = {{\n", nix_str(name)));
                    print(child, out, &full, depth + 1);
                    out.push_str(&format!("{pad}}};\n"));
                }
            }
        }
    }
    fn flat(node: &Node, out: &mut String, prefix: &str, pad: &str) {
        for (name, child) in &node.children {
            let full = format!("{prefix}.{name}");
            if let Some(v) = &child.leaf {
                out.push_str(&format!("{pad}{} = {v};\n", nix_str(&full)));
            }
            flat(child, out, &full, pad);
        }
    }
    print(&root, &mut e, "", 1);
    e.push_str("}\n");
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_nest_by_attribute_path_and_strings_are_escaped() {
        let b = |job: &str| ChannelBuild {
            id: 1,
            job: job.into(),
            nixname: "n\"${x}".into(),
            system: "x86_64-linux".into(),
            outputs: [("out".to_string(), "/nix/store/abc-n".to_string())].into(),
        };
        let e =
            expression("t", &Channel { eval: None, builds: vec![b("a"), b("a.b"), b("tools.fmt"), b("tools.lint")] });
        assert!(e.contains("  \"tools\" = {\n    \"fmt\" = built"), "{e}");
        assert!(e.contains("  \"a\" = built") && e.contains("  \"a.b\" = built"), "{e}");
        assert!(e.contains("\"n\\\"\\${x}\""), "{e}");
    }
}

/// A tar archive (ustar) of one directory holding `default.nix`, xz-compressed.
pub fn tarball(dir: &str, default_nix: &str) -> std::io::Result<Vec<u8>> {
    fn header(name: &str, mode: u32, size: usize, kind: u8) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |h: &mut [u8; 512], at: usize, width: usize, v: u64| {
            let s = format!("{:0w$o}", v, w = width - 1);
            h[at..at + width - 1].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, mode as u64);
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, size as u64);
        octal(&mut h, 136, 12, 1);
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        h
    }
    let mut tar = Vec::new();
    tar.extend_from_slice(&header(&format!("{dir}/"), 0o755, 0, b'5'));
    tar.extend_from_slice(&header(&format!("{dir}/default.nix"), 0o644, default_nix.len(), b'0'));
    tar.extend_from_slice(default_nix.as_bytes());
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    tar.extend_from_slice(&[0u8; 1024]);
    let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(&tar)?;
    xz.finish()
}

async fn answer(
    s: &AppState,
    what: String,
    ch: Channel,
    file: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, WebError> {
    match file {
        None if super::wants_json(headers) => Ok(axum::Json(ch).into_response()),
        None => {
            let list: String = ch
                .builds
                .iter()
                .map(|b| format!("<li><a href=\"/build/{}\">{}</a></li>", b.id, super::hydra::escape(&b.job)))
                .collect();
            Ok(axum::response::Html(format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>Channel · Kiln</title>\
                 <link rel=\"stylesheet\" href=\"/static/style.css\"></head><body><main><h1>Channel: {}</h1>\
                 <p>Subscribe with <code>nix-channel --add</code> and this page's address.</p><ul>{list}</ul></main></body></html>",
                super::hydra::escape(&what)
            ))
            .into_response())
        }
        Some("nixexprs.tar.xz") => {
            let body = tarball("channel", &expression(&what, &ch)).map_err(|e| WebError::Internal(e.to_string()))?;
            Ok(([(header::CONTENT_TYPE, "application/x-xz")], body).into_response())
        }
        Some("binary-cache-url") => Ok(([(header::CONTENT_TYPE, "text/plain")], s.config.base_url()).into_response()),
        Some(other) => Err(WebError::NotFound(format!("channel file {other}"))),
    }
}

#[utoipa::path(get, path = "/jobset/{project}/{jobset}/channel/latest", tag = "hydra",
    params(("project" = String, Path, description = "project name"), ("jobset" = String, Path, description = "jobset name")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the newest evaluation whose every job succeeded, as a channel", content((Channel = "application/json"), (String = "text/html"))), (status = 404, description = "no such evaluation yet", body = ErrorBody)))]
pub async fn jobset_latest(
    State(s): State<AppState>,
    Path((project, jobset)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let ch = of_jobset(&s, &project, &jobset).await?;
    answer(&s, format!("{project}:{jobset}"), ch, None, &headers).await
}

#[utoipa::path(get, path = "/jobset/{project}/{jobset}/channel/latest/{file}", tag = "hydra",
    params(("project" = String, Path, description = "project name"), ("jobset" = String, Path, description = "jobset name"), ("file" = String, Path, description = "nixexprs.tar.xz or binary-cache-url")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the channel's expression (xz tarball) or its binary cache's URL (text)"), (status = 404, description = "no such evaluation yet, or another file", body = ErrorBody)))]
pub async fn jobset_latest_file(
    State(s): State<AppState>,
    Path((project, jobset, file)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let ch = of_jobset(&s, &project, &jobset).await?;
    answer(&s, format!("{project}:{jobset}"), ch, Some(&file), &headers).await
}

#[utoipa::path(get, path = "/job/{project}/{jobset}/{job}/channel/latest", tag = "hydra",
    params(("project" = String, Path, description = "project name"), ("jobset" = String, Path, description = "jobset name"), ("job" = String, Path, description = "job name (an aggregate brings its constituents)")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the job's newest successful build as a channel", content((Channel = "application/json"), (String = "text/html"))), (status = 404, description = "no such build yet", body = ErrorBody)))]
pub async fn job_latest(
    State(s): State<AppState>,
    Path((project, jobset, job)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let ch = of_job(&s, &project, &jobset, &job).await?;
    answer(&s, format!("{project}:{jobset}:{job}"), ch, None, &headers).await
}

#[utoipa::path(get, path = "/job/{project}/{jobset}/{job}/channel/latest/{file}", tag = "hydra",
    params(("project" = String, Path, description = "project name"), ("jobset" = String, Path, description = "jobset name"), ("job" = String, Path, description = "job name"), ("file" = String, Path, description = "nixexprs.tar.xz or binary-cache-url")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the channel's expression (xz tarball) or its binary cache's URL (text)"), (status = 404, description = "no such build yet, or another file", body = ErrorBody)))]
pub async fn job_latest_file(
    State(s): State<AppState>,
    Path((project, jobset, job, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let ch = of_job(&s, &project, &jobset, &job).await?;
    answer(&s, format!("{project}:{jobset}:{job}"), ch, Some(&file), &headers).await
}
