//! Following a build log while it grows: what is there already, then every
//! new chunk as the builder sends it, until the step ends.

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast::{self, error::RecvError};

use super::AppState;

const TEXT: &str = "text/plain; charset=utf-8";

pub async fn follow_log(s: &AppState, drv: &str) -> Response {
    if let Some((so_far, rx)) = s.logs.follow(drv) {
        let stream = futures::stream::unfold(
            (Some(so_far), rx),
            |(first, mut rx): (Option<Vec<u8>>, broadcast::Receiver<Bytes>)| async move {
                if let Some(f) = first {
                    return Some((Ok::<_, std::io::Error>(Bytes::from(f)), (None, rx)));
                }
                loop {
                    match rx.recv().await {
                        Ok(b) => return Some((Ok(b), (None, rx))),
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return None,
                    }
                }
            },
        );
        return ([(header::CONTENT_TYPE, TEXT), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(stream))
            .into_response();
    }
    // Finished: the stored log, whole.
    match s.logs.open(drv) {
        Some(r) => {
            let v = tokio::task::spawn_blocking(move || {
                let mut r = r;
                let mut v = Vec::new();
                let _ = std::io::Read::read_to_end(&mut r, &mut v);
                v
            })
            .await
            .unwrap_or_default();
            ([(header::CONTENT_TYPE, TEXT)], v).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no log\n").into_response(),
    }
}
