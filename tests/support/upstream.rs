//! An upstream binary cache for tests: a directory in Nix's file-cache
//! layout (filled by `nix copy --to file://…?secret-key=…`), served over
//! HTTP on loopback by a server on its own thread, that records every
//! request with its User-Agent (Kiln's or Nix's) and can be told to
//! misbehave per file: answer an HTTP error, never answer, or serve other
//! bytes (a narinfo signed with an untrusted key, say).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

#[derive(Clone, Debug)]
pub enum Fault {
    Status(u16),
    /// Waits this long before answering at all.
    Hang(Duration),
    /// Serves these bytes instead of the file.
    Body(String),
}

#[derive(Default)]
struct Shared {
    faults: HashMap<String, Fault>,
    /// (path, user agent) of every request, in order.
    requests: Vec<(String, String)>,
}

pub struct Upstream {
    pub dir: tempfile::TempDir,
    pub url: String,
    /// `name:base64` of the key the cache's narinfos are signed with.
    pub public_key: String,
    pub secret_key_file: PathBuf,
    shared: Arc<Mutex<Shared>>,
}

impl Upstream {
    /// An empty cache (`nix-cache-info` only) with a fresh signing key.
    pub fn start(key_name: &str) -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let (sk, pk) = (keys.join("sk"), keys.join("pk"));
        super::nix("nix-store", &["--generate-binary-cache-key", key_name, sk.to_str().unwrap(), pk.to_str().unwrap()]);
        let public_key = std::fs::read_to_string(&pk).unwrap().trim().to_string();
        let root = dir.path().join("cache");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("nix-cache-info"), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n").unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = (root.clone(), shared.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let app = axum::Router::new().fallback(serve).with_state(state);
                let l = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(l, app).await.unwrap();
            });
        });
        Upstream { dir, url, public_key, secret_key_file: sk, shared }
    }

    /// The cache's directory (Nix's file layout).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Copies `paths` (and their closures) from the local store into the
    /// cache, signed with the cache's key.
    pub fn add(&self, paths: &[&str]) {
        let to = format!("file://{}?secret-key={}", self.root().display(), self.secret_key_file.display());
        let mut args = vec!["copy", "--to", &to];
        args.extend_from_slice(paths);
        super::nix("nix", &args);
    }

    /// Makes requests for `file` (e.g. `<hash>.narinfo`) misbehave.
    pub fn fault(&self, file: &str, f: Fault) {
        self.shared.lock().unwrap().faults.insert(file.to_string(), f);
    }

    /// Every request so far: (path without the leading '/', User-Agent).
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.lock().unwrap().requests.clone()
    }

    /// The narinfo file name of a store path.
    pub fn narinfo_name(store_path: &str) -> String {
        let base = store_path.trim_start_matches("/nix/store/");
        format!("{}.narinfo", &base[..32])
    }

    /// The text of a store path's narinfo in this cache.
    pub fn narinfo(&self, store_path: &str) -> String {
        std::fs::read_to_string(self.root().join(Self::narinfo_name(store_path))).unwrap()
    }
}

async fn serve(State((root, shared)): State<(PathBuf, Arc<Mutex<Shared>>)>, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().trim_start_matches('/').to_string();
    let ua = headers.get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let fault = {
        let mut s = shared.lock().unwrap();
        s.requests.push((path.clone(), ua));
        s.faults.get(&path).cloned()
    };
    match fault {
        Some(Fault::Status(code)) => return (StatusCode::from_u16(code).unwrap(), "injected\n").into_response(),
        Some(Fault::Hang(d)) => tokio::time::sleep(d).await,
        Some(Fault::Body(b)) => return (StatusCode::OK, b).into_response(),
        None => {}
    }
    if path.split('/').any(|c| c == ".." || c.is_empty()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    match tokio::fs::read(Path::new(&root).join(&path)).await {
        Ok(bytes) => (StatusCode::OK, Body::from(bytes)).into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}
