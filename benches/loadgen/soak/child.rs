//! The soak's servers as child processes: started, watched (every output line read and
//! counted, warnings and errors kept), stopped with SIGTERM and timed.

use std::collections::VecDeque;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// How long a server may take to say it listens, or to exit after SIGTERM.
const START_LIMIT: Duration = Duration::from_secs(60);
const STOP_LIMIT: Duration = Duration::from_secs(60);
/// Warning and error lines kept per server for the report.
const KEPT_LOG_LINES: usize = 20;

/// What a server's output showed: lines read, warnings and errors, the last few of them.
#[derive(Debug, Default, Clone, Serialize)]
pub struct LogTally {
    pub lines: u64,
    pub warnings: u64,
    pub errors: u64,
    pub last_warnings_and_errors: VecDeque<String>,
}

impl LogTally {
    pub fn read(&mut self, line: &[u8]) {
        self.lines += 1;
        // Human format: "<timestamp>  WARN target: ..."; the level sits near the start.
        let head = &line[..line.len().min(48)];
        let has = |word: &[u8]| head.windows(word.len()).any(|w| w == word);
        let level = if has(b" ERROR ") {
            &mut self.errors
        } else if has(b" WARN ") {
            &mut self.warnings
        } else {
            return;
        };
        *level += 1;
        if self.last_warnings_and_errors.len() == KEPT_LOG_LINES {
            self.last_warnings_and_errors.pop_front();
        }
        let text = String::from_utf8_lossy(line);
        self.last_warnings_and_errors
            .push_back(text.trim_end().chars().take(400).collect());
    }
}

/// A server child process: killed (by its own pid) if still running when dropped.
pub struct Managed {
    name: String,
    child: std::process::Child,
    pub pid: u32,
    /// Filled by the threads that read its output.
    log: Arc<Mutex<LogTally>>,
}

impl Drop for Managed {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Managed {
    /// Starts `cmd`. Both output streams are read to the end by a thread each (a full
    /// pipe would stall the server); the first line containing `marker` sends the word
    /// after it (an address) to the returned receiver.
    fn spawn(
        name: &str,
        mut cmd: Command,
        marker: Option<&str>,
    ) -> Result<(Managed, std::sync::mpsc::Receiver<String>)> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        let log = Arc::new(Mutex::new(LogTally::default()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let streams: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(child.stdout.take().context("stdout")?),
            Box::new(child.stderr.take().context("stderr")?),
        ];
        for stream in streams {
            let log = Arc::clone(&log);
            let tx = tx.clone();
            let mut marker = marker.map(|m| m.as_bytes().to_vec());
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream);
                let mut line = Vec::with_capacity(512);
                // Bounded by the child: EOF when it exits.
                while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                    if let Some(m) = &marker
                        && let Some(pos) = line.windows(m.len()).position(|w| w == m.as_slice())
                    {
                        let rest = String::from_utf8_lossy(&line[pos + m.len()..]);
                        let word: String = rest
                            .chars()
                            .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '/')
                            .collect();
                        let _ = tx.send(word);
                        marker = None;
                    }
                    if let Ok(mut l) = log.lock() {
                        l.read(&line);
                    }
                    line.clear();
                }
            });
        }
        let server = Managed {
            name: name.to_owned(),
            child,
            pid,
            log,
        };
        Ok((server, rx))
    }

    /// Starts `cmd` and waits for its `marker` line; returns the word after it.
    pub fn spawn_announced(name: &str, cmd: Command, marker: &str) -> Result<(Managed, String)> {
        let (mut server, rx) = Managed::spawn(name, cmd, Some(marker))?;
        match rx.recv_timeout(START_LIMIT) {
            Ok(word) => Ok((server, word)),
            Err(_) => Err(server.failed_to_start(&format!("say {marker:?}"))),
        }
    }

    /// Starts `cmd` and waits until `addr` accepts connections (whatever the server's
    /// log level, so no log line is needed).
    pub fn spawn_listening(name: &str, cmd: Command, addr: SocketAddr) -> Result<Managed> {
        let (mut server, _) = Managed::spawn(name, cmd, None)?;
        let started = Instant::now();
        // Bounded: START_LIMIT, a connect attempt per 10 ms.
        while started.elapsed() < START_LIMIT {
            if matches!(server.child.try_wait(), Ok(Some(_))) {
                break;
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(server.failed_to_start(&format!("listen on {addr}")))
    }

    fn failed_to_start(&mut self, what: &str) -> anyhow::Error {
        let status = self.child.try_wait().ok().flatten();
        anyhow::anyhow!(
            "{} did not {what} within {START_LIMIT:?} (exit: {status:?}); its warnings and errors: {:?}",
            self.name,
            self.tally().last_warnings_and_errors
        )
    }

    pub fn tally(&self) -> LogTally {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// SIGTERM, then waits (bounded) for the exit; its status and how long it took. A
    /// server that already exited (crashed) gives the status it exited with.
    pub fn terminate(&mut self) -> Result<(ExitStatus, Duration)> {
        let started = Instant::now();
        if let Some(status) = self.child.try_wait()? {
            return Ok((status, Duration::ZERO));
        }
        // No libc (this crate forbids unsafe code): kill(1), by this child's own pid.
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("running kill")?;
        anyhow::ensure!(sent.success(), "kill -TERM {} failed", self.pid);
        // Bounded poll: STOP_LIMIT / 5 ms.
        while started.elapsed() < STOP_LIMIT {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!(
            "{} (pid {}) did not exit within {STOP_LIMIT:?} of SIGTERM",
            self.name,
            self.pid
        )
    }
}
