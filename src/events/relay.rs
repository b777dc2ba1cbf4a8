//! Events between Kiln processes on one PostgreSQL database: each event a
//! process announces is also sent as a `NOTIFY kiln_events` with the
//! process's own id, and every process LISTENs and announces what others
//! sent, in its own process only (so nothing goes round twice). A web node
//! thus updates its live pages and drops its page memos within moments of
//! a build finishing on the node that runs the queue, instead of at its
//! next rescan. Events are best effort, as in one process: a lost one
//! costs a page a reload, never a wrong result.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tracing::{debug, warn};

use super::{Event, Events};

const CHANNEL: &str = "kiln_events";
/// PostgreSQL takes up to 8,000 bytes a notification; a step shared by
/// more builds than this names only these (pages of the others reload on
/// the next event about them).
const MAX_BUILDS: usize = 500;

#[derive(Serialize, Deserialize)]
struct Envelope {
    origin: String,
    event: Event,
}

/// Relays until `stop`: this process's events out, the others' in.
pub async fn run(pool: PgPool, events: Events, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let origin = format!("{}-{}", std::process::id(), crate::db::now());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    if events.relay.set(tx).is_err() {
        return;
    }
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot listen for other Kiln processes' events; retrying");
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            warn!(error = %e, "LISTEN kiln_events failed; retrying");
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        }
        loop {
            tokio::select! {
                _ = &mut stop => return,
                Some(mut ev) = rx.recv() => {
                    if let Event::StepStarted { builds, .. } = &mut ev {
                        builds.truncate(MAX_BUILDS);
                    }
                    let payload = serde_json::to_string(&Envelope { origin: origin.clone(), event: ev }).expect("serialises");
                    if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(&payload).execute(&pool).await {
                        debug!(error = %e, "an event was not relayed");
                    }
                }
                n = listener.recv() => match n {
                    Ok(n) => match serde_json::from_str::<Envelope>(n.payload()) {
                        Ok(env) if env.origin != origin => events.send_remote(env.event),
                        Ok(_) => {}
                        Err(e) => debug!(error = %e, "an unreadable relayed event"),
                    },
                    Err(e) => {
                        warn!(error = %e, "lost the connection for other processes' events; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}
