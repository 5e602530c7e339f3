//! What every test binary's harness needs, written once: signalling a child process,
//! waiting (bounded) for it to exit or for any other event, and a free loopback port.
//! Waits poll for the event and give up after a limit; none asserts on time.
#![allow(dead_code)]

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How often [`poll`] looks again.
const EVERY: Duration = Duration::from_millis(20);

/// Calls `f` until it returns `Some`, for at most `limit`; `None` if it never did.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(EVERY);
    }
}

/// Waits up to `limit` for `child` to exit.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    poll(limit, || child.try_wait().expect("wait"))
}

/// Sends `sig` (`-HUP`, `-TERM`, ...) to process `pid` with kill(1); whether it was sent.
pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success()
}

/// A free TCP port on `ip` (bound, then released: another process could take it in
/// between, which on a loopback address of our own is unlikely enough for a test).
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// [`poll`] for an async check, sleeping on the runtime between looks.
pub async fn poll_async<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(EVERY).await;
    }
}
