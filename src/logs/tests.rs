//! The log store on a real directory: live logs written, followed and
//! stored; earlier attempts kept, listed, forgotten and removed.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;

use super::*;

const DRV: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-t.drv";

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

/// Reads a follower to its end on a task of its own.
fn collect(mut f: Follower) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(c) = f.next().await {
            all.extend_from_slice(&c.unwrap());
        }
        all
    })
}

/// Waits until the live log of `DRV` is written up to `n` bytes.
async fn written(logs: &Logs, n: u64) {
    let f = logs.follow(DRV).unwrap();
    let mut rx = f.progress.clone();
    rx.wait_for(|p| p.written >= n).await.unwrap();
}

#[tokio::test]
async fn followers_read_every_byte_once_wherever_they_join_and_end_with_the_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::new(dir.path());
    let live = logs.start(DRV, 1, 1 << 30).unwrap();
    let early = collect(logs.follow(DRV).unwrap());
    let sink = live.sink();
    let mut expected = Vec::new();
    for i in 0..300u32 {
        let line = format!("line {i} {}\n", "x".repeat((i as usize * 37) % 5000));
        expected.extend_from_slice(line.as_bytes());
        sink.send(Bytes::from(line)).await.unwrap();
    }
    written(&logs, expected.len() as u64).await;
    // Mid-build: a snapshot has what is written, a new follower all of it.
    assert_eq!(read_all(logs.follow(DRV).unwrap().so_far()), expected);
    let middle = collect(logs.follow(DRV).unwrap());
    for i in 300..600u32 {
        let line = format!("line {i}\n");
        expected.extend_from_slice(line.as_bytes());
        sink.send(Bytes::from(line)).await.unwrap();
    }
    drop(sink);
    let stored = live.finish(Kept::Final).await.unwrap();
    assert_eq!(stored, logs.path_for(DRV).unwrap());
    assert_eq!(early.await.unwrap(), expected, "a follower from the start");
    assert_eq!(middle.await.unwrap(), expected, "a follower that joined mid-build");
    assert_eq!(read_all(logs.open(DRV).unwrap()), expected, "the stored log");
    assert!(logs.follow(DRV).is_none(), "no longer live");
    assert!(live::live_files(&logs).is_empty(), "the live file is gone");
}

#[tokio::test]
async fn a_log_is_cut_at_its_limit_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::new(dir.path());
    let live = logs.start(DRV, 1, 10).unwrap();
    live.append("0123456789abcdef").await;
    live.append("more").await;
    live.finish(Kept::Final).await.unwrap();
    let text = String::from_utf8(read_all(logs.open(DRV).unwrap())).unwrap();
    assert_eq!(text, "0123456789kiln: the log was cut at 10 bytes (queue.max_log_mib); 10 more were dropped\n");
}

#[tokio::test]
async fn a_connection_that_never_closes_its_stderr_cuts_the_log_after_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::new(dir.path());
    let live = logs.start(DRV, 2, 1 << 20).unwrap();
    let held = live.sink();
    held.send(Bytes::from_static(b"before the end\n")).await.unwrap();
    let follower = collect(logs.follow(DRV).unwrap());
    let t = tokio::time::Instant::now();
    let stored = live.finish(Kept::Attempt).await.unwrap();
    assert!(t.elapsed() >= EOF_WAIT, "waited for the connection's stderr to end");
    assert_eq!(stored, logs.attempt_path(DRV, 2).unwrap());
    let text = String::from_utf8(read_all(logs.open_attempt(DRV, 2).unwrap())).unwrap();
    assert_eq!(text, "before the end\nkiln: the rest of this log did not arrive within 300ms of the attempt's end\n");
    assert_eq!(follower.await.unwrap(), text.as_bytes(), "the follower ended with it");
    assert!(held.send(Bytes::from_static(b"late")).await.is_err(), "nothing is taken after the end");
    assert!(logs.open(DRV).is_none(), "an attempt is not the step's log");
}

#[tokio::test]
async fn a_dropped_attempt_keeps_its_log_as_an_earlier_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::new(dir.path());
    let live = logs.start(DRV, 3, 1 << 20).unwrap();
    live.append("cancelled mid-way\n").await;
    let follower = collect(logs.follow(DRV).unwrap());
    drop(live);
    assert_eq!(follower.await.unwrap(), b"cancelled mid-way\n");
    for _ in 0..500 {
        if logs.follow(DRV).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(read_all(logs.open_attempt(DRV, 3).unwrap()), b"cancelled mid-way\n");
    assert_eq!(logs.attempts(DRV), vec![3]);
}

#[tokio::test]
async fn attempts_are_listed_forgotten_from_a_restarted_try_and_removed_with_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::new(dir.path());
    for n in 1..=3 {
        let live = logs.start(DRV, n, 1 << 20).unwrap();
        live.append(&format!("try {n}\n")).await;
        live.finish(Kept::Attempt).await.unwrap();
    }
    assert_eq!(logs.attempts(DRV), vec![1, 2, 3]);
    assert_eq!(logs.attempts(&DRV["/nix/store/".len()..]), vec![1, 2, 3], "by base name too");
    // Tries reset (a restart): try 2 again forgets what 2 and 3 were.
    let live = logs.start(DRV, 2, 1 << 20).unwrap();
    assert_eq!(logs.attempts(DRV), vec![1]);
    live.append("try 2 again\n").await;
    let stored = live.finish(Kept::Final).await.unwrap();
    assert_eq!(read_all(logs.open_attempt(DRV, 1).unwrap()), b"try 1\n");
    assert_eq!(read_all(logs.open(DRV).unwrap()), b"try 2 again\n");
    assert!(logs.open_attempt(DRV, 2).is_none());

    // A file of the database outside the logs is never touched.
    let outside = dir.path().join("precious");
    std::fs::write(&outside, "keep").unwrap();
    assert_eq!(logs.remove_all(DRV, Some(outside.to_str().unwrap())).unwrap(), 2);
    assert!(outside.exists());
    assert!(!stored.exists());
    assert!(logs.attempts(DRV).is_empty());
    assert!(!logs.attempts_dir(DRV).unwrap().exists(), "the attempts' directory went with them");
    assert_eq!(logs.remove_all(DRV, Some(stored.to_str().unwrap())).unwrap(), 0, "nothing left");
}

#[test]
fn only_derivations_have_log_paths_and_they_stay_inside_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::new(dir.path());
    for bad in ["../../etc/passwd", "/etc/passwd", "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-t", "x.drv"] {
        assert!(logs.path_for(bad).is_none(), "{bad}");
        assert!(logs.attempt_path(bad, 1).is_none(), "{bad}");
        assert!(logs.attempts(bad).is_empty(), "{bad}");
    }
    let p = logs.attempt_path(DRV, 7).unwrap();
    assert!(p.starts_with(dir.path().join("logs")), "{}", p.display());
    assert_eq!(p.file_name().unwrap(), "7.zst");
}

#[tokio::test]
async fn a_live_log_left_by_an_earlier_run_is_kept_as_its_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let logs = Logs::new(dir.path());
    // This process's own live log is not salvaged.
    let ours = logs.start(DRV, 5, 1 << 20).unwrap();
    let other = "/nix/store/1123456789abcdfghijklmnpqrsvwxyz-u.drv";
    let left = dir.path().join("logs/live").join(format!("{}.4", &other["/nix/store/".len()..]));
    std::fs::write(&left, "the coordinator died here\n").unwrap();
    assert_eq!(logs.salvage(), 1);
    assert!(!left.exists());
    assert_eq!(read_all(logs.open_attempt(other, 4).unwrap()), b"the coordinator died here\n");
    ours.append("still ours\n").await;
    ours.finish(Kept::Final).await.unwrap();
    assert_eq!(read_all(logs.open(DRV).unwrap()), b"still ours\n");
}
