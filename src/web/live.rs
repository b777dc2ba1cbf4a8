//! Following a build log while it grows: read from its file from the
//! first byte, then each new piece as it is written, until the step ends.

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast::error::RecvError;

use super::{AppState, ErrorBody};

const TEXT: &str = "text/plain; charset=utf-8";

pub async fn follow_log(s: &AppState, drv: &str) -> Response {
    if let Some(f) = s.logs.follow(drv) {
        // Read from the log's file as it grows; nothing of it is kept here.
        let stream = futures::stream::unfold(f, |mut f| async move { f.next().await.map(|c| (c, f)) });
        let stream = futures::StreamExt::take_until(stream, Box::pin(s.events.closing()));
        return ([(header::CONTENT_TYPE, TEXT), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(stream))
            .into_response();
    }
    // Finished: the stored log, streamed.
    s.logs.fetch_shared(drv).await;
    match s.logs.open(drv) {
        Some(r) => ([(header::CONTENT_TYPE, TEXT)], stream_reader(r)).into_response(),
        None => (StatusCode::NOT_FOUND, "no log\n").into_response(),
    }
}

/// A body that reads `r` (a blocking reader, such as a decompressing log
/// file) in chunks as the client takes them; never the whole in memory.
pub fn stream_reader(r: impl std::io::Read + Send + 'static) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut r = r;
        loop {
            let mut buf = vec![0u8; 64 << 10];
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        break; // the client went away
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) }))
}

/// Which events a listener wants; none given means all.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
pub struct EventFilter {
    build: Option<i64>,
    eval: Option<i64>,
    jobset: Option<i64>,
}

/// `GET /api/events`: server-sent events, one per change of state, named by
/// type (`build_finished`, …) with the event as JSON data. A listener that
/// falls behind gets a `lagged` event and should reload what it shows.
#[utoipa::path(get, path = "/api/events", tag = "live", params(EventFilter),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "server-sent events (`event:` is the type, `data:` the JSON of an Event)",
        content_type = "text/event-stream", body = crate::events::Event)))]
pub async fn events(
    axum::extract::State(s): axum::extract::State<AppState>,
    axum::extract::Query(f): axum::extract::Query<EventFilter>,
) -> Response {
    use axum::response::sse::{Event as Sse, KeepAlive};
    let all = f.build.is_none() && f.eval.is_none() && f.jobset.is_none();
    let rx = s.events.subscribe();
    let stream = futures::stream::unfold((rx, f), move |(mut rx, f)| async move {
        loop {
            match rx.recv().await {
                Ok(ev) if all || ev.concerns(f.build, f.eval, f.jobset) => {
                    let data = serde_json::to_string(&ev).unwrap_or_default();
                    let sse = Sse::default().event(ev.name()).data(data);
                    return Some((Ok::<_, std::convert::Infallible>(sse), (rx, f)));
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => {
                    let sse = Sse::default().event("lagged").data(n.to_string());
                    return Some((Ok(sse), (rx, f)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    let stream = futures::StreamExt::take_until(stream, Box::pin(s.events.closing()));
    axum::response::sse::Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}
