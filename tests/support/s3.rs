//! A real S3-compatible server for tests: moto's server (`moto[server]`,
//! pinned in scripts/requirements-test.txt and installed by scripts/test
//! into target/venv), on a loopback port, with one bucket. It can be
//! paused (SIGSTOP: every request hangs, as a store that is down or slow)
//! and resumed, and lists its keys, read straight from the server.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
    child: Child,
    /// Access key files Kiln reads (moto takes any credentials, but checks
    /// that requests are signed).
    pub dir: tempfile::TempDir,
}

fn moto_server() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/moto_server");
    assert!(p.exists(), "{} is missing: scripts/test installs it (scripts/requirements-test.txt)", p.display());
    p
}

impl S3 {
    pub fn start(bucket: &str) -> S3 {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("access-key"), "kiln-test\n").unwrap();
        std::fs::write(dir.path().join("secret-key"), "kiln-test-secret\n").unwrap();
        let s3 = S3 { endpoint: format!("http://127.0.0.1:{port}"), bucket: bucket.to_string(), child, dir };
        let start = Instant::now();
        loop {
            if s3.request("GET", "/").is_some_and(|(status, _)| status == 200) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let (status, body) = s3.request("PUT", &format!("/{bucket}")).unwrap();
        assert_eq!(status, 200, "creating the bucket: {body}");
        s3
    }

    /// `[cache]` settings for Kiln on this bucket.
    pub fn cache_config(&self) -> String {
        format!(
            "[cache]\nstorage = \"s3\"\n[cache.s3]\nbucket = \"{}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n\
             access_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\ntimeout_s = 2\n",
            self.bucket,
            self.endpoint,
            self.dir.path().join("access-key").display(),
            self.dir.path().join("secret-key").display(),
        )
    }

    /// A plain HTTP/1.0 request, unsigned: status and body.
    pub fn request(&self, method: &str, path: &str) -> Option<(u16, String)> {
        self.request_bytes(method, path).map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
    }

    pub fn request_bytes(&self, method: &str, path: &str) -> Option<(u16, Vec<u8>)> {
        use std::io::{Read, Write};
        let addr = self.endpoint.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        // moto does not check signatures, but answers 403 to an anonymous
        // read of an object: an Authorization header names the test's key.
        let auth = "AWS4-HMAC-SHA256 Credential=kiln-test/20260101/us-east-1/s3/aws4_request, \
                    SignedHeaders=host, Signature=0";
        write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: {auth}\r\nContent-Length: 0\r\n\r\n")
            .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).ok()?;
        let end = out.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&out[..end]).into_owned();
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, out[end + 4..].to_vec()))
    }

    /// Every key in the bucket.
    pub fn keys(&self) -> Vec<String> {
        let (status, body) = self.request("GET", &format!("/{}?list-type=2&max-keys=1000", self.bucket)).unwrap();
        assert_eq!(status, 200, "{body}");
        body.split("<Key>").skip(1).filter_map(|k| k.split("</Key>").next()).map(str::to_string).collect()
    }

    /// An object's bytes, straight from the server.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let (status, body) = self.request_bytes("GET", &format!("/{}/{key}", self.bucket))?;
        (status == 200).then_some(body)
    }

    /// Every request hangs until [`S3::resume`].
    pub fn pause(&self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    pub fn resume(&self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
