//! A deployment's progress as terminal lines (`kiln deploy`): each host's
//! status as it changes, and its log as it grows, prefixed with the host,
//! from successive reads of the deployment's rows.

use std::collections::HashMap;

use crate::db::deployment_hosts::HostRow;

/// What was printed so far, per host: its status and how much of its log.
#[derive(Default)]
pub struct Progress {
    seen: HashMap<String, (String, usize)>,
}

impl Progress {
    /// The lines that say what changed since the last call.
    pub fn lines(&mut self, rows: &[HostRow]) -> Vec<String> {
        let mut out = Vec::new();
        for r in rows {
            let (status, logged) = self.seen.entry(r.host.clone()).or_insert_with(|| (String::new(), 0));
            // The log first: it says what led to the status.
            if r.log.len() > *logged && r.log.is_char_boundary(*logged) {
                for line in r.log[*logged..].lines() {
                    out.push(format!("  {} | {line}", r.host));
                }
                *logged = r.log.len();
            }
            if *status != r.status {
                let mut l = format!("{} (wave {}): {}", r.host, r.wave + 1, r.status);
                if r.is_done()
                    && let Some(e) = &r.error
                {
                    l.push_str(&format!(": {e}"));
                }
                out.push(l);
                *status = r.status.clone();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(host: &str, status: &str, log: &str, error: Option<&str>) -> HostRow {
        HostRow {
            deployment_id: 1,
            host: host.into(),
            wave: 0,
            job: "j".into(),
            build_id: None,
            store_path: "/nix/store/x".into(),
            previous_path: None,
            status: status.into(),
            work_dir: None,
            log: log.into(),
            checks: "[]".into(),
            error: error.map(str::to_string),
            started_at: None,
            finished_at: None,
        }
    }

    #[test]
    fn prints_each_change_once_with_new_log_lines_before_the_status() {
        let mut p = Progress::default();
        assert_eq!(p.lines(&[row("a", "pending", "", None)]), ["a (wave 1): pending"]);
        assert!(p.lines(&[row("a", "pending", "", None)]).is_empty());
        assert_eq!(
            p.lines(&[row("a", "switching", "one\ntwo\n", None)]),
            ["  a | one", "  a | two", "a (wave 1): switching"]
        );
        assert_eq!(
            p.lines(&[row("a", "rolled-back", "one\ntwo\nthree\n", Some("health check failed"))]),
            ["  a | three", "a (wave 1): rolled-back: health check failed"]
        );
    }
}
