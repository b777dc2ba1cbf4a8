//! The runner's view of its machines: the list from the machines file
//! (reloaded when it changes), each machine's running steps, idle
//! connections and failure count, and the choice of machine for a step.
//! Only machine faults count here: a failure of the coordinator's own
//! never pauses a machine. A pause and an operator's disabling are kept in
//! the database and read back whenever the list is (re)loaded, so both
//! survive a restart.

use super::*;

pub(super) struct MachineState {
    pub(super) m: Machine,
    pub(super) running: u32,
    pub(super) failures: u32,
    pub(super) paused_until: Option<Instant>,
    /// False when an operator disabled it: no new steps go there.
    pub(super) enabled: bool,
    pub(super) idle: Vec<Connection>,
}

impl Runner {
    // ------------------------------------------------------------ machines

    /// Reads the machines file again if it changed; true when it did.
    pub(super) fn reload_machines(&mut self) -> bool {
        let list = match &self.source {
            MachineSource::List(l) => {
                if !self.machines.is_empty() || l.is_empty() {
                    return false;
                }
                l.clone()
            }
            MachineSource::File(path) => {
                // Read again only when it changed (an empty file included).
                let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                if self.source_mtime == Some(mtime) {
                    return false;
                }
                self.source_mtime = Some(mtime);
                match crate::builder::machines::load(path) {
                    Ok((list, errors)) => {
                        for e in &errors {
                            warn!(file = %path.display(), "machines file {e}; skipped");
                        }
                        list
                    }
                    Err(e) => {
                        warn!(file = %path.display(), error = %e, "cannot read the machines file");
                        return false;
                    }
                }
            }
        };
        let mut old: HashMap<String, MachineState> = self.machines.drain(..).map(|m| (m.m.uri.clone(), m)).collect();
        for m in list {
            match old.remove(&m.uri) {
                Some(mut st) if st.m == m => {
                    st.m = m;
                    self.machines.push(st);
                }
                Some(st) => self.machines.push(MachineState {
                    m,
                    running: st.running,
                    failures: 0,
                    paused_until: None,
                    enabled: st.enabled,
                    idle: vec![],
                }),
                None => self.machines.push(MachineState {
                    m,
                    running: 0,
                    failures: 0,
                    paused_until: None,
                    enabled: true,
                    idle: vec![],
                }),
            }
        }
        info!(machines = self.machines.len(), "machines loaded");
        true
    }

    /// Takes each machine's pause and enabled flag from the database, where
    /// this runner's earlier life, or an operator, wrote them.
    pub(super) async fn load_machine_states(&mut self) -> Result<(), DbError> {
        let rows = {
            let mut c = self.db.conn().await?;
            machine_db::list(c.ex()).await?
        };
        let rows: HashMap<&str, &machine_db::MachineState> = rows.iter().map(|r| (r.name.as_str(), r)).collect();
        let (now, unix_now) = (Instant::now(), db::now());
        for m in &mut self.machines {
            let Some(row) = rows.get(m.m.uri.as_str()) else { continue };
            if m.enabled != row.enabled {
                info!(machine = %m.m.uri, enabled = row.enabled, "machine {}", if row.enabled { "enabled" } else { "disabled" });
            }
            m.enabled = row.enabled;
            if !m.enabled {
                m.idle.clear();
            }
            m.paused_until =
                row.paused_until.filter(|t| *t > unix_now).map(|t| now + Duration::from_secs((t - unix_now) as u64));
        }
        Ok(())
    }

    /// The machine to run a step of `platform` on (see [`pick`]).
    pub(super) fn pick_machine(
        &self,
        platform: &Platform,
        avoid: &HashSet<String>,
        resume: Option<&str>,
        inputs_on: &[Arc<str>],
    ) -> Option<usize> {
        pick(&self.machines, platform, avoid, resume, inputs_on)
    }

    /// A machine did its part. Its record in the database is for pages and
    /// restarts; the queue goes by what it holds, so a database error is
    /// logged and does not hold up the step's own transition.
    pub(super) async fn machine_ok(&mut self, uri: &str) {
        if let Some(m) = self.machines.iter_mut().find(|m| m.m.uri == uri) {
            m.failures = 0;
        }
        let written = async {
            let mut c = self.db.conn().await?;
            machine_db::record_success(c.ex(), uri).await
        };
        if let Err(e) = written.await {
            warn!(machine = uri, error = %e, "cannot record a machine's success");
        }
    }

    /// A machine fault: counted, and the machine paused after too many
    /// (see [`Runner::machine_ok`] on database errors).
    pub(super) async fn machine_failed(&mut self, uri: &str, error: &str) {
        let mut pause = None;
        if let Some(m) = self.machines.iter_mut().find(|m| m.m.uri == uri) {
            m.failures += 1;
            m.idle.clear();
            if m.failures >= self.config.pause_after_failures {
                m.paused_until = Some(Instant::now() + Duration::from_secs(self.config.pause_s));
                pause = Some(db::now() + self.config.pause_s as i64);
                warn!(machine = uri, failures = m.failures, pause_s = self.config.pause_s, "machine paused");
            }
            let m = m.m.clone();
            self.sessions.forget(&m);
        }
        let written = async {
            let mut c = self.db.conn().await?;
            machine_db::record_failure(c.ex(), uri, error, pause).await
        };
        if let Err(e) = written.await {
            warn!(machine = uri, error = %e, "cannot record a machine's failure");
        }
    }
}

/// The machine to run a step of `platform` on: of the free ones that fit,
/// the one that built most of its inputs, then the least loaded per speed
/// factor; not one of `avoid` while another could take it; `resume` (the
/// machine it ran on when the last runner died) while that one is usable,
/// waiting for a slot there.
fn pick(
    machines: &[MachineState],
    platform: &Platform,
    avoid: &HashSet<String>,
    resume: Option<&str>,
    inputs_on: &[Arc<str>],
) -> Option<usize> {
    let now = Instant::now();
    let usable =
        |m: &MachineState| m.enabled && m.m.fits(&platform.0, &platform.1) && m.paused_until.is_none_or(|t| t <= now);
    let free = |m: &MachineState| m.running < m.m.max_jobs.max(1);
    if let Some((i, m)) = resume.and_then(|uri| machines.iter().enumerate().find(|(_, m)| m.m.uri == uri && usable(m)))
    {
        return free(m).then_some(i);
    }
    let load = |m: &MachineState| m.running as f64 / m.m.max_jobs.max(1) as f64 / m.m.speed_factor;
    // Among free machines, the one that built most of the step's inputs
    // first: the others would have to copy them in (a NAR import and a
    // store registration each), which on a chain of small steps costs
    // more than the build. Then the lowest load.
    let held = |m: &MachineState| inputs_on.iter().filter(|u| ***u == *m.m.uri).count();
    let best = |skip_avoided: bool| {
        machines
            .iter()
            .enumerate()
            .filter(|(_, m)| usable(m) && free(m) && !(skip_avoided && avoid.contains(&m.m.uri)))
            .min_by(|a, b| {
                held(b.1).cmp(&held(a.1)).then(load(a.1).partial_cmp(&load(b.1)).unwrap_or(std::cmp::Ordering::Equal))
            })
            .map(|(i, _)| i)
    };
    if let Some(i) = best(true) {
        return Some(i);
    }
    // Only avoided machines are free: wait if another could take it.
    let other_exists = machines.iter().any(|m| usable(m) && !avoid.contains(&m.m.uri));
    if other_exists { None } else { best(false) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machines(slots: &[(u32, u32)]) -> Vec<MachineState> {
        let text: String =
            slots.iter().enumerate().map(|(i, (max, _))| format!("ssh://b{i} x86_64-linux - {max} 1\n")).collect();
        let (list, errors) = crate::builder::machines::parse(&text);
        assert!(errors.is_empty(), "{errors:?}");
        list.into_iter()
            .zip(slots)
            .map(|(m, (_, running))| MachineState {
                m,
                running: *running,
                failures: 0,
                paused_until: None,
                enabled: true,
                idle: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_step_goes_where_its_inputs_were_built_while_that_machine_has_a_slot() {
        let platform: Platform = (Arc::from("x86_64-linux"), Vec::new());
        let none = HashSet::new();
        let on = |uris: &[&str]| uris.iter().map(|u| Arc::<str>::from(*u)).collect::<Vec<_>>();
        // b1 is busier than b0, but holds both inputs.
        let ms = machines(&[(2, 0), (2, 1)]);
        assert_eq!(pick(&ms, &platform, &none, None, &[]), Some(0), "no inputs: the least loaded");
        assert_eq!(pick(&ms, &platform, &none, None, &on(&["ssh://b1", "ssh://b1"])), Some(1));
        // More inputs on b0 than on b1 wins over b1's load.
        assert_eq!(pick(&ms, &platform, &none, None, &on(&["ssh://b1", "ssh://b0", "ssh://b0"])), Some(0));
        // b1 is full: the step goes elsewhere rather than wait.
        let ms = machines(&[(2, 0), (2, 2)]);
        assert_eq!(pick(&ms, &platform, &none, None, &on(&["ssh://b1", "ssh://b1"])), Some(0));
        // A machine the step failed on is still avoided.
        let avoid: HashSet<String> = ["ssh://b1".to_string()].into();
        let ms = machines(&[(2, 1), (2, 0)]);
        assert_eq!(pick(&ms, &platform, &avoid, None, &on(&["ssh://b1"])), Some(0));
    }
}
