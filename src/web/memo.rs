//! A memo of what the jobset and evaluation pages read from the database,
//! so a page many people (or a wall display) load at once is read once.
//! An entry belongs to a jobset and holds until an event about that jobset
//! (an evaluation started or ended, a build queued or finished) or one
//! about no jobset in particular arrives, and for a few seconds at most.
//! A page computed while such an event arrives is not kept: each entry
//! records the jobset's generation from before its reads.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::events::{Event, Events};

/// Longest an entry is used, events or not.
const TTL: Duration = Duration::from_secs(5);
/// Entries kept before the memo starts afresh.
const MAX_ENTRIES: usize = 2000;

/// Generations of jobsets, bumped by events.
#[derive(Clone, Default)]
pub struct Generations {
    inner: Arc<Mutex<(u64, HashMap<i64, u64>)>>,
}

impl Generations {
    /// Follows `events` for as long as they run.
    pub fn follow(events: &Events) -> Generations {
        let g = Generations::default();
        let mut rx = events.subscribe();
        let g2 = g.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => g2.saw(&ev),
                    // Fell behind: anything may have changed.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => g2.bump_all(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        g
    }

    fn saw(&self, ev: &Event) {
        match ev {
            Event::EvalStarted { jobset, .. } | Event::EvalFinished { jobset, .. } => self.bump(*jobset),
            Event::BuildQueued { jobset, .. } | Event::BuildFinished { jobset, .. } => match jobset {
                Some(j) => self.bump(*j),
                None => self.bump_all(),
            },
            // A step starting or a deployment changes no status these
            // pages show.
            Event::StepStarted { .. } | Event::DeploymentChanged { .. } => {}
        }
    }

    fn bump(&self, jobset: i64) {
        *self.inner.lock().expect("generations").1.entry(jobset).or_default() += 1;
    }

    pub fn bump_all(&self) {
        self.inner.lock().expect("generations").0 += 1;
    }

    /// The jobset's generation now; take it before reading what depends on it.
    pub fn of(&self, jobset: i64) -> (u64, u64) {
        let g = self.inner.lock().expect("generations");
        (g.0, g.1.get(&jobset).copied().unwrap_or(0))
    }
}

struct Entry<V> {
    at: Instant,
    jobset: i64,
    generation: (u64, u64),
    value: Arc<V>,
}

/// Values by key, each tied to a jobset's generation.
pub struct Memo<K, V> {
    generations: Generations,
    entries: Mutex<HashMap<K, Entry<V>>>,
}

impl<K: Hash + Eq, V> Memo<K, V> {
    pub fn new(generations: Generations) -> Self {
        Memo { generations, entries: Mutex::new(HashMap::new()) }
    }

    pub fn get(&self, key: &K) -> Option<Arc<V>> {
        let entries = self.entries.lock().expect("memo");
        let e = entries.get(key)?;
        (e.at.elapsed() < TTL && self.generations.of(e.jobset) == e.generation).then(|| e.value.clone())
    }

    /// Keeps `value`, read after the jobset was at `generation`.
    pub fn put(&self, key: K, jobset: i64, generation: (u64, u64), value: Arc<V>) {
        if self.generations.of(jobset) != generation {
            return;
        }
        let mut entries = self.entries.lock().expect("memo");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key, Entry { at: Instant::now(), jobset, generation, value });
    }

    pub fn generations(&self) -> &Generations {
        &self.generations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_hold_until_an_event_about_their_jobset() {
        let events = Events::new();
        let g = Generations::follow(&events);
        let memo: Memo<&str, i32> = Memo::new(g.clone());
        let before = g.of(7);
        memo.put("a", 7, before, Arc::new(1));
        memo.put("b", 8, g.of(8), Arc::new(2));
        assert_eq!(memo.get(&"a").as_deref(), Some(&1));
        events.send(Event::BuildFinished { build: 1, jobset: Some(7), buildstatus: 0 });
        tokio::time::timeout(Duration::from_secs(5), async {
            while g.of(7) == before {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(memo.get(&"a"), None, "jobset 7 changed");
        assert_eq!(memo.get(&"b").as_deref(), Some(&2), "jobset 8 did not");
        // A value read before the change is not kept.
        memo.put("a", 7, before, Arc::new(3));
        assert_eq!(memo.get(&"a"), None);
        events.send(Event::BuildFinished { build: 2, jobset: None, buildstatus: 0 });
        tokio::time::timeout(Duration::from_secs(5), async {
            while memo.get(&"b").is_some() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
    }
}
