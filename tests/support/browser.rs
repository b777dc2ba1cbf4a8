//! A real browser for UI tests: Debian's Chromium, headless, driven over
//! WebDriver by its chromedriver; with helpers that wait for live pages.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

use super::wait_for;

/// chromedriver on a free loopback port, stopped on drop with the
/// browsers it started (its process group): a test that ends without
/// closing its session, or panics, leaves no Chromium running.
pub struct Driver {
    child: Child,
    pub url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group is the driver's own (process_group(0)): its id is the
        // driver's pid. Signalled directly: procps' kill reads `-PGID` as
        // an option and signals group `-<first digit>` instead.
        let pgid = self.child.id() as i32;
        if pgid > 1 {
            // SAFETY: kill(2) with a negative pid signals that process group only.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn driver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    use std::os::unix::process::CommandExt;
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver is not installed: run scripts/test (Debian's chromium-driver)");
    let url = format!("http://127.0.0.1:{port}");
    let d = Driver { child, url };
    wait_for(30, "chromedriver to listen", || async {
        reqwest::get(format!("{}/status", d.url)).await.ok().filter(|r| r.status().is_success()).map(|_| ())
    })
    .await;
    d
}

pub async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("start chromium")
}

pub fn shots_dir() -> std::path::PathBuf {
    let d = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{name}: a PNG");
    std::fs::write(shots_dir().join(format!("{name}.png")), png).unwrap();
}

/// The text of `css`; found again when the page replaced the element
/// between finding and reading it (live pages re-render as events come).
pub async fn text(c: &Client, css: &str) -> String {
    let mut last = None;
    for _ in 0..50 {
        let e = c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        match e.text().await {
            Ok(t) => return t,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{css}: {last:?}")
}

pub async fn click_link(c: &Client, text: &str) {
    c.find(Locator::LinkText(text)).await.unwrap_or_else(|e| panic!("a link {text:?}: {e}")).click().await.unwrap();
}

pub async fn heading(c: &Client) -> String {
    text(c, "h1").await
}

/// Waits (a click's navigation may still be under way) until the text of
/// `css` satisfies `want`.
pub async fn until(c: &Client, css: &str, want: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        if let Ok(e) = c.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
        {
            if want(&t) {
                return t;
            }
            last = t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{css} never matched; last: {last:?}\n{}", c.source().await.unwrap_or_default());
}
