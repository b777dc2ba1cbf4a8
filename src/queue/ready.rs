//! The ready queues: one per platform (system and required features), each
//! grouped by jobset so fair shares cost a look per jobset, not per step.
//! A step is in its queue exactly when it is runnable: all its inputs
//! built, not running, needed by some unfinished build.

use super::*;

/// A queue of steps for one platform, grouped by jobset for fair shares.
#[derive(Default)]
pub(super) struct Ready {
    pub(super) by_jobset: HashMap<i64, BTreeSet<Key>>,
    pub(super) bumped: BTreeSet<Key>,
    pub(super) len: usize,
}

/// Order within a jobset: scheduling priority (high first), then age.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Key {
    pub(super) global: Reverse<i64>,
    pub(super) priority: Reverse<i64>,
    pub(super) build: i64,
    pub(super) step: i64,
}

pub(super) type Platform = (Arc<str>, Vec<String>);

impl Runner {
    // ------------------------------------------------------------ the ready queues

    /// (Re)places a step in its platform's queue with its current priority,
    /// if it is runnable.
    pub(super) fn requeue(&mut self, id: i64) {
        self.unqueue(id);
        let Some(s) = self.steps.get(&id) else { return };
        if s.running || !s.deps.is_empty() || s.builds.is_empty() {
            return;
        }
        let mut best: Option<(i64, Key)> = None;
        for b in &s.builds {
            if let Some(lb) = self.builds.get(b) {
                let k = Key { global: Reverse(lb.global), priority: Reverse(lb.priority), build: *b, step: id };
                if best.is_none_or(|(_, bk)| k < bk) {
                    best = Some((lb.jobset, k));
                }
            }
        }
        let Some((jobset, key)) = best else { return };
        let platform = s.platform.clone();
        let ready = self.ready.entry(platform).or_default();
        if key.global.0 > 0 {
            ready.bumped.insert(key);
        }
        ready.by_jobset.entry(jobset).or_default().insert(key);
        ready.len += 1;
        let s = self.steps.get_mut(&id).expect("checked");
        s.key = Some((jobset, key));
        // A retry counts from when it may run again.
        s.runnable_since = Some(s.not_before.unwrap_or_else(Instant::now).max(Instant::now()));
        // Written with the others of this round (see `write_runnable`).
        self.became_runnable.push(id);
    }

    /// Records in the database the steps that became runnable, and those
    /// that left the queue unfinished (no live build needs them), since the
    /// last call, so pages show what the queue holds. What each step is
    /// now decides, whatever happened to it in between.
    pub(super) async fn write_runnable(&mut self) -> Result<(), DbError> {
        if self.became_runnable.is_empty() && self.became_idle.is_empty() {
            return Ok(());
        }
        let idle: Vec<i64> =
            std::mem::take(&mut self.became_idle).into_iter().filter(|id| !self.steps.contains_key(id)).collect();
        let runnable: Vec<i64> = std::mem::take(&mut self.became_runnable)
            .into_iter()
            .filter(|id| self.steps.get(id).is_some_and(|s| s.key.is_some()))
            .collect();
        let written = async {
            let mut c = self.db.conn().await?;
            for from in ["runnable", "running"] {
                steps::transition_many(c.ex(), &idle, from, "waiting").await?;
            }
            steps::transition_many(c.ex(), &runnable, "waiting", "runnable").await
        }
        .await;
        if let Err(e) = written {
            // Written again next round (the transitions are idempotent), not
            // lost with a database that was away for a moment.
            self.became_idle.extend(idle);
            self.became_runnable.extend(runnable);
            return Err(e);
        }
        Ok(())
    }

    pub(super) fn unqueue(&mut self, id: i64) {
        let Some(s) = self.steps.get_mut(&id) else { return };
        let Some((jobset, key)) = s.key.take() else { return };
        if let Some(r) = self.ready.get_mut(&s.platform) {
            r.bumped.remove(&key);
            if let Some(set) = r.by_jobset.get_mut(&jobset) {
                if set.remove(&key) {
                    r.len -= 1;
                }
                if set.is_empty() {
                    r.by_jobset.remove(&jobset);
                }
            }
        }
    }

    /// The next step of a platform: bumped first, then the jobset that used
    /// least machine time for its shares, then priority and age within it.
    /// Costs a look at each jobset with runnable steps, not at every step.
    pub(super) fn best_of(&self, platform: &Platform, skip: &HashSet<i64>) -> Option<i64> {
        let r = self.ready.get(platform)?;
        let now = Instant::now();
        let eligible = |k: &Key| {
            !skip.contains(&k.step) && self.steps.get(&k.step).is_some_and(|s| s.not_before.is_none_or(|t| t <= now))
        };
        if let Some(k) = r.bumped.iter().find(|k| eligible(k)) {
            return Some(k.step);
        }
        let mut best: Option<(f64, Key)> = None;
        for (jobset, set) in &r.by_jobset {
            let Some(k) = set.iter().find(|k| eligible(k)) else { continue };
            let used = self.usage.get(jobset).copied().unwrap_or(0.0) / *self.shares.get(jobset).unwrap_or(&100) as f64;
            let better = match best {
                None => true,
                Some((bu, bk)) => used < bu || (used == bu && *k < bk),
            };
            if better {
                best = Some((used, *k));
            }
        }
        best.map(|(_, k)| k.step)
    }
}
