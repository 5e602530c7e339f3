//! The tamper-evident audit trail: one hash-chained JSON line per authenticated XKS
//! request, sealed by HMAC checkpoints, written by one dedicated thread fed through a
//! bounded queue; plus [`verify`] and [`show`] for `xks-proxy audit`.
//!
//! # How a request is recorded
//!
//! At the end of a request, `api` hands a [`RequestRecord`] to [`Trail::record`], which
//! only `try_send`s into a bounded queue: a request never waits for the disk, except
//! with `fsync = "every_record"`, where its answer waits (bounded by [`ACK_WAIT`]) until
//! its record is written and synced, so every 200 is on disk. When the queue is full or
//! the writer has failed, `on_failure` decides: fail closed (the request gets 503) or
//! continue (the record is dropped, counted in `xks_audit_records_dropped_total`, and a
//! `gap` record in the chain says how many were lost once writing works again).
//!
//! # The files
//!
//! `DIR/audit-<UTC time>-<first seq>.jsonl`; names sort in chain order. Every file
//! opens with a sealed `chain_start` whose `prev` is the hash of the previous file's
//! last complete line, so the chain runs across rotations and restarts. A checkpoint
//! (sealed) is written every `checkpoint_interval` when records were written, at
//! rotation, and at shutdown (`"final":true`). A write that fails is cut back off the
//! file, so a file never holds half a line except after a crash.

mod record;
mod verify;

pub use record::{ChainStart, Checkpoint, GENESIS, Gap, RequestRecord, SealKey, line_hash, now};
pub use verify::{Filter, Problem, Report, show, verify};

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{AuditConfig, AuditFsync, AuditOnFailure};

/// The longest a request waits for its record's write with `fsync = "every_record"`
/// (KMS gives up after 250 ms anyway); past it the record counts as not written.
pub const ACK_WAIT: Duration = Duration::from_secs(1);

/// How often a failed writer tries again (a new file, after a `gap` record).
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Most records written between two looks at the clock (rotation, checkpoints).
const BATCH: usize = 512;
/// How long the writer lets records gather after the first of a batch, unless each
/// request waits for its own record (`fsync = "every_record"`, where the sync per
/// batch is the group commit). Without it every request woke the writer thread: on one
/// core that is two context switches per request, and the trail cost 20–34 µs of CPU
/// per Encrypt (benches/README.md, "Audit trail on versus off"). A record waits at most
/// this long before its batch is written; a sleeping writer costs a sender nothing.
const LINGER: Duration = Duration::from_millis(2);

/// Why the audit trail could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit directory {}: {source}", dir.display())]
    Directory {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("audit file {}: {source}", file.display())]
    File {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the audit writer thread: {0}")]
    Thread(std::io::Error),
}

/// Why a record was not accepted (fixed texts: they go to the log and metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full: the writer is not keeping up.
    QueueFull,
    /// The last write failed and has not been retried successfully yet.
    WriterFailed,
    /// The writer has stopped (shutdown).
    Closed,
    /// With `every_record`: the write did not complete within [`ACK_WAIT`].
    NotWrittenInTime,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::QueueFull,
        Refusal::WriterFailed,
        Refusal::Closed,
        Refusal::NotWrittenInTime,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::WriterFailed => "writer_failed",
            Refusal::Closed => "closed",
            Refusal::NotWrittenInTime => "not_written_in_time",
        }
    }
}

enum Msg {
    /// A record, and with `every_record` whom to tell once it is on disk.
    Record(
        Box<RequestRecord>,
        Option<tokio::sync::oneshot::Sender<bool>>,
    ),
    /// Write the final checkpoint, sync, and stop.
    Close(tokio::sync::oneshot::Sender<()>),
}

/// What the request path and the writer thread share.
#[derive(Debug, Default)]
struct Shared {
    /// Set by the writer when a write fails, cleared when a retry succeeds: while set,
    /// records are refused at once rather than queued behind a broken disk.
    failed: AtomicBool,
    /// Records lost since the last successful write, for the next `gap` record.
    lost: AtomicU64,
    /// Records queued and not yet taken by the writer.
    depth: AtomicUsize,
}

/// The running audit trail: the request path's handle on the writer thread.
#[derive(Debug)]
pub struct Trail {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    on_failure: AuditOnFailure,
    wait_for_write: bool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Trail {
    /// Opens the directory, resumes the chain from its last file (or starts a new one,
    /// saying why), writes the first lines, and starts the writer thread. Errors here
    /// stop the proxy from starting: with an audit trail configured, no request is
    /// served unrecorded from the first one.
    pub fn start(config: &AuditConfig) -> Result<Trail, AuditError> {
        let key = SealKey::new(config.key.expose().as_bytes());
        let writer = Writer::open(config, key)?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("xks-audit".into())
            .spawn(move || writer.run(&rx, &thread_shared))
            .map_err(AuditError::Thread)?;
        register_series();
        Ok(Trail {
            tx,
            shared,
            on_failure: config.on_failure,
            wait_for_write: config.fsync == AuditFsync::EveryRecord,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn on_failure(&self) -> AuditOnFailure {
        self.on_failure
    }

    /// Why a record would be refused right now, if it would (checked before a request
    /// reaches the key manager, so a fail-closed proxy does no key work it cannot
    /// record).
    pub fn refusing(&self) -> Option<Refusal> {
        self.shared
            .failed
            .load(Ordering::Acquire)
            .then_some(Refusal::WriterFailed)
    }

    /// Queues one record (never blocks on the disk; see the module doc for
    /// `every_record`). On refusal with `on_failure = "continue"` the record is counted
    /// as dropped here; with `fail_closed` the caller answers 503.
    pub async fn record(&self, record: RequestRecord) -> Result<(), Refusal> {
        let result = self.submit(record).await;
        if let Err(why) = result {
            self.note_refusal(why);
        }
        result
    }

    /// Counts a record that was not taken: a 503 (fail closed) or a lost record
    /// (continue, which the next `gap` line also reports).
    pub fn note_refusal(&self, why: Refusal) {
        match self.on_failure {
            AuditOnFailure::Continue => {
                self.shared.lost.fetch_add(1, Ordering::AcqRel);
                metrics::counter!("xks_audit_records_dropped_total", "reason" => why.label())
                    .increment(1);
            }
            AuditOnFailure::FailClosed => {
                metrics::counter!("xks_audit_requests_refused_total", "reason" => why.label())
                    .increment(1);
            }
        }
    }

    async fn submit(&self, record: RequestRecord) -> Result<(), Refusal> {
        if let Some(why) = self.refusing() {
            return Err(why);
        }
        let (ack, written) = if self.wait_for_write {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.shared.depth.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.tx.try_send(Msg::Record(Box::new(record), ack)) {
            self.shared.depth.fetch_sub(1, Ordering::AcqRel);
            return Err(match e {
                TrySendError::Full(_) => Refusal::QueueFull,
                TrySendError::Disconnected(_) => Refusal::Closed,
            });
        }
        let Some(written) = written else {
            return Ok(());
        };
        match tokio::time::timeout(ACK_WAIT, written).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(Refusal::WriterFailed),
            Ok(Err(_)) => Err(Refusal::Closed),
            Err(_) => Err(Refusal::NotWrittenInTime),
        }
    }

    /// Records queued and not yet taken by the writer.
    pub fn queue_depth(&self) -> usize {
        self.shared.depth.load(Ordering::Acquire)
    }

    /// Writes the final checkpoint and stops the writer (after the last request has
    /// been answered). Later records are refused.
    pub async fn close(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A blocking send: the queue may be full, and the close must come after the
        // records already queued. Off the async threads.
        let sender = self.tx.clone();
        let sent = tokio::task::spawn_blocking(move || sender.send(Msg::Close(tx)).is_ok()).await;
        if matches!(sent, Ok(true)) {
            let _ = rx.await;
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// Every audit series exists from the start, at 0.
fn register_series() {
    metrics::counter!("xks_audit_records_written_total").increment(0);
    metrics::counter!("xks_audit_write_errors_total").increment(0);
    for why in Refusal::ALL {
        metrics::counter!("xks_audit_records_dropped_total", "reason" => why.label()).increment(0);
        metrics::counter!("xks_audit_requests_refused_total", "reason" => why.label()).increment(0);
    }
}

/// The open file and the chain's head: owned by the writer thread alone.
struct Writer {
    dir: PathBuf,
    key: SealKey,
    fsync: AuditFsync,
    rotate_bytes: Option<u64>,
    rotate_interval: Option<Duration>,
    checkpoint_interval: Duration,
    /// `None` after a failed write until a retry opens a new file.
    file: Option<Open>,
    /// The next line's seq and prev (moved by each line queued in `pending`).
    seq: u64,
    head: String,
    /// Lines written since the last checkpoint (a checkpoint is due only if > 0).
    unsealed: u64,
    /// Lines appended and not yet written: one `write` per batch, not per record.
    pending: Vec<u8>,
    /// `(seq, head, unsealed)` as of the last line on disk, to roll back to when a
    /// write fails.
    on_disk: (u64, String, u64),
    last_checkpoint: Instant,
    /// Why the last write failed (for the `recovered_after_write_error` start).
    failure: Option<String>,
    last_retry: Instant,
}

struct Open {
    file: File,
    path: PathBuf,
    len: u64,
    opened: Instant,
}

impl Writer {
    fn open(config: &AuditConfig, key: SealKey) -> Result<Writer, AuditError> {
        let dir = config.directory.clone();
        std::fs::create_dir_all(&dir).map_err(|source| AuditError::Directory {
            dir: dir.clone(),
            source,
        })?;
        let mut w = Writer {
            dir,
            key,
            fsync: config.fsync,
            rotate_bytes: config.rotate_bytes,
            rotate_interval: config.rotate_interval,
            checkpoint_interval: config.checkpoint_interval,
            file: None,
            seq: 0,
            head: GENESIS.to_owned(),
            unsealed: 0,
            pending: Vec::new(),
            on_disk: (0, GENESIS.to_owned(), 0),
            last_checkpoint: Instant::now(),
            failure: None,
            last_retry: Instant::now(),
        };
        let (reason, detail) = w.resume()?;
        w.new_file(reason, detail)
            .and_then(|()| w.checkpoint(false))
            .and_then(|()| w.sync())
            .map_err(|source| AuditError::File {
                file: w.file.as_ref().map(|f| f.path.clone()).unwrap_or_default(),
                source,
            })?;
        Ok(w)
    }

    /// Finds where the chain goes on: the last complete line of the newest file.
    fn resume(&mut self) -> Result<(&'static str, Option<String>), AuditError> {
        let Some(last) = audit_files(&self.dir)
            .map_err(|source| AuditError::Directory {
                dir: self.dir.clone(),
                source,
            })?
            .pop()
        else {
            return Ok(("new", None));
        };
        let name = last
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = match std::fs::read(&last) {
            Ok(b) => b,
            Err(e) => {
                return Ok(("previous_unreadable", Some(format!("{name}: {}", e.kind()))));
            }
        };
        // Only complete lines count: a crash can leave half of one at the end.
        let complete = match bytes.iter().rposition(|&b| b == b'\n') {
            Some(end) => &bytes[..end],
            None => &bytes[..0],
        };
        let line = complete
            .rsplit(|&b| b == b'\n')
            .next()
            .filter(|l| !l.is_empty());
        let parsed = line.and_then(|l| {
            let v: serde_json::Value = serde_json::from_slice(l).ok()?;
            Some((v["seq"].as_u64()?, v, l))
        });
        let Some((seq, value, line)) = parsed else {
            return Ok((
                "previous_unreadable",
                Some(format!("{name}: its last line is not an audit record")),
            ));
        };
        self.seq = seq + 1;
        self.head = line_hash(line);
        self.on_disk = (self.seq, self.head.clone(), 0);
        let clean = value["type"] == "checkpoint" && value["final"] == true;
        let partial = complete.len() + 1 < bytes.len();
        Ok(if clean && !partial {
            ("resumed", Some(name))
        } else {
            ("resumed_after_unclean_stop", Some(name))
        })
    }

    fn run(mut self, rx: &Receiver<Msg>, shared: &Shared) {
        loop {
            let wait = self.next_due();
            let mut batch = Vec::new();
            let mut close = None;
            match rx.recv_timeout(wait) {
                Ok(Msg::Record(r, ack)) => {
                    batch.push((r, ack));
                    if self.fsync != AuditFsync::EveryRecord {
                        std::thread::sleep(LINGER);
                    }
                }
                Ok(Msg::Close(ack)) => close = Some(ack),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.finish(shared);
                    return;
                }
            }
            while close.is_none() && batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(Msg::Record(r, ack)) => batch.push((r, ack)),
                    Ok(Msg::Close(ack)) => close = Some(ack),
                    Err(_) => break,
                }
            }
            let taken = batch.len();
            if taken > 0 {
                shared.depth.fetch_sub(taken, Ordering::AcqRel);
                self.write_batch(batch, shared);
            }
            self.housekeeping(shared);
            if let Some(ack) = close {
                self.finish(shared);
                let _ = ack.send(());
                return;
            }
        }
    }

    /// How long the writer may sleep: until the next retry, checkpoint or rotation by
    /// age. An idle trail (nothing unsealed) sleeps a whole interval, never spins.
    fn next_due(&self) -> Duration {
        let Some(f) = &self.file else {
            return RETRY_EVERY;
        };
        let checkpoint = if self.unsealed > 0 {
            self.checkpoint_interval
                .saturating_sub(self.last_checkpoint.elapsed())
        } else {
            self.checkpoint_interval
        };
        let rotation = self
            .rotate_interval
            .map_or(Duration::MAX, |age| age.saturating_sub(f.opened.elapsed()));
        checkpoint.min(rotation).max(Duration::from_millis(1))
    }

    /// Rotation, checkpoints and retries: whatever is due by the clock.
    fn housekeeping(&mut self, shared: &Shared) {
        if self.file.is_none() {
            if self.last_retry.elapsed() >= RETRY_EVERY {
                self.retry(shared);
            }
            return;
        }
        let result = if self.rotation_due() {
            self.rotate()
        } else if self.unsealed > 0 && self.last_checkpoint.elapsed() >= self.checkpoint_interval {
            self.checkpoint(false).and_then(|()| {
                if self.fsync == AuditFsync::Interval {
                    self.sync()
                } else {
                    Ok(())
                }
            })
        } else {
            Ok(())
        };
        if let Err(e) = result {
            self.failed(&e, shared);
        }
    }

    fn rotation_due(&self) -> bool {
        let Some(f) = &self.file else { return false };
        self.rotate_bytes.is_some_and(|max| f.len >= max)
            || self
                .rotate_interval
                .is_some_and(|age| f.opened.elapsed() >= age)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.checkpoint(false)?;
        if self.fsync != AuditFsync::Never {
            self.sync()?;
        }
        self.new_file("rotated", None)
    }

    /// Writes a batch with one `write` (and with `every_record` one sync), then tells
    /// each waiting request whether its record made it. All or nothing: a failed write
    /// is cut back off the file and the chain head rolls back with it.
    fn write_batch(
        &mut self,
        batch: Vec<(
            Box<RequestRecord>,
            Option<tokio::sync::oneshot::Sender<bool>>,
        )>,
        shared: &Shared,
    ) {
        if self.file.is_none() {
            self.retry(shared);
        }
        let lost_before = self.gap_if_lost(shared);
        let mut result = Ok(());
        for (record, _) in &batch {
            if let Err(e) = self.append("request", record.as_ref()) {
                result = Err(e);
                break;
            }
        }
        result = result.and_then(|()| self.commit());
        if result.is_ok() && self.fsync == AuditFsync::EveryRecord {
            result = self.sync();
        }
        let ok = result.is_ok();
        if ok {
            metrics::counter!("xks_audit_records_written_total").increment(batch.len() as u64);
        } else {
            // Records whose request did not wait were answered already: they are lost,
            // and the next gap record says so. Counted before the failure is logged,
            // so whoever reads the log line finds them in the metrics.
            let lost = batch.iter().filter(|(_, ack)| ack.is_none()).count() as u64;
            shared.lost.fetch_add(lost_before + lost, Ordering::AcqRel);
            if lost > 0 {
                metrics::counter!("xks_audit_records_dropped_total", "reason" => Refusal::WriterFailed.label())
                    .increment(lost);
            }
        }
        if let Err(e) = &result {
            self.failed(e, shared);
        }
        for (_, ack) in batch {
            if let Some(tx) = ack {
                let _ = tx.send(ok);
            }
        }
    }

    /// Queues a `gap` line for records lost since the last successful write, if any,
    /// and returns how many it covers (the caller puts them back if the write fails).
    fn gap_if_lost(&mut self, shared: &Shared) -> u64 {
        let lost = shared.lost.swap(0, Ordering::AcqRel);
        if lost == 0 {
            return 0;
        }
        let gap = Gap {
            time: now(),
            lost,
            reason: self
                .failure
                .clone()
                .unwrap_or_else(|| "the audit queue was full".into()),
        };
        if self.append("gap", &gap).is_err() {
            shared.lost.fetch_add(lost, Ordering::AcqRel);
            return 0;
        }
        lost
    }

    /// After a failure: a new file that resumes the chain (the failed write was cut
    /// back off the old one), saying why.
    fn retry(&mut self, shared: &Shared) {
        self.last_retry = Instant::now();
        let detail = self.failure.clone();
        let mut lost = 0;
        match self
            .new_file("recovered_after_write_error", detail)
            .and_then(|()| {
                lost = self.gap_if_lost(shared);
                self.commit()
            })
            .and_then(|()| self.sync())
        {
            Ok(()) => {
                self.failure = None;
                // Open for records before saying so: whoever reads the line may send.
                shared.failed.store(false, Ordering::Release);
                tracing::warn!("audit trail writing again (a new file resumes the chain)");
            }
            Err(e) => {
                self.file = None;
                shared.lost.fetch_add(lost, Ordering::AcqRel);
                tracing::debug!(error = %e, "audit trail retry failed");
            }
        }
    }

    fn failed(&mut self, e: &std::io::Error, shared: &Shared) {
        metrics::counter!("xks_audit_write_errors_total").increment(1);
        let path = self.file.as_ref().map(|f| f.path.display().to_string());
        let first = !shared.failed.swap(true, Ordering::AcqRel);
        if first {
            tracing::error!(
                file = path.as_deref().unwrap_or("-"),
                error = %e,
                "audit trail write failed: records are refused (fail closed) or dropped and counted (continue) until a retry succeeds"
            );
        }
        self.failure = Some(format!("write error: {}", e.kind()));
        self.file = None;
        self.last_retry = Instant::now();
    }

    /// Adds one line to the pending write and moves the chain head past it
    /// ([`Writer::commit`] writes it, or rolls the head back).
    fn append<T: serde::Serialize>(&mut self, kind: &'static str, body: &T) -> std::io::Result<()> {
        let line = serde_json::to_string(&record::Line {
            seq: self.seq,
            prev: &self.head,
            kind,
            body,
        })
        .map_err(std::io::Error::other)?;
        let line = if matches!(kind, "chain_start" | "checkpoint") {
            self.key.seal(&line)
        } else {
            line
        };
        self.pending.extend_from_slice(line.as_bytes());
        self.pending.push(b'\n');
        self.seq += 1;
        self.head = line_hash(line.as_bytes());
        self.unsealed += 1;
        Ok(())
    }

    /// Writes the pending lines with one `write`. On error the file is cut back to
    /// where it was, so no half line stays behind, and the chain head returns to the
    /// last line on disk.
    fn commit(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = match self.file.as_mut() {
            None => Err(std::io::Error::other("no audit file open")),
            Some(f) => match f.file.write_all(&self.pending) {
                Ok(()) => {
                    f.len += self.pending.len() as u64;
                    Ok(())
                }
                Err(e) => {
                    let _ = f.file.set_len(f.len);
                    Err(e)
                }
            },
        };
        self.pending.clear();
        match result {
            Ok(()) => {
                self.on_disk = (self.seq, self.head.clone(), self.unsealed);
                Ok(())
            }
            Err(e) => {
                (self.seq, self.head, self.unsealed) = self.on_disk.clone();
                Err(e)
            }
        }
    }

    fn checkpoint(&mut self, is_final: bool) -> std::io::Result<()> {
        self.append(
            "checkpoint",
            &Checkpoint {
                time: now(),
                is_final,
            },
        )?;
        self.commit()?;
        self.unsealed = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match &self.file {
            Some(f) => f.file.sync_data(),
            None => Ok(()),
        }
    }

    /// Starts a file whose first line continues the chain (or starts one).
    fn new_file(&mut self, reason: &'static str, detail: Option<String>) -> std::io::Result<()> {
        let stamp = time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!(
                "[year][month][day]T[hour][minute][second].[subsecond digits:3]Z"
            ))
            .map_err(std::io::Error::other)?;
        let path = self
            .dir
            .join(format!("audit-{stamp}-{:012}.jsonl", self.seq));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)?;
        if let Some(old) = self.file.take() {
            drop(old);
        }
        self.file = Some(Open {
            file,
            path,
            len: 0,
            opened: Instant::now(),
        });
        if self.fsync != AuditFsync::Never {
            // The new name must survive a crash too.
            let _ = File::open(&self.dir).and_then(|d| d.sync_all());
        }
        let started = self
            .append(
                "chain_start",
                &ChainStart {
                    time: now(),
                    reason,
                    detail,
                },
            )
            .and_then(|()| self.commit());
        if started.is_err()
            && let Some(f) = self.file.take()
        {
            // An empty file would only puzzle the verifier.
            let _ = std::fs::remove_file(&f.path);
        }
        started
    }

    /// At shutdown: the final checkpoint, synced (unless fsync is `never`).
    fn finish(&mut self, shared: &Shared) {
        if self.file.is_none() {
            // One last try, so a trail that recovered can still be sealed.
            self.retry(shared);
            if self.file.is_none() {
                return;
            }
        }
        self.gap_if_lost(shared);
        let result = self.checkpoint(true).and_then(|()| {
            if self.fsync == AuditFsync::Never {
                Ok(())
            } else {
                self.sync()
            }
        });
        if let Err(e) = result {
            metrics::counter!("xks_audit_write_errors_total").increment(1);
            tracing::error!(error = %e, "audit trail: the final checkpoint could not be written");
        }
    }
}

/// What `config check` can tell without writing: the directory is one (or can be
/// made under an existing directory) and, when it has files, the newest is readable.
pub fn preflight(config: &AuditConfig) -> Result<(), String> {
    let dir = &config.directory;
    if dir.exists() {
        if !dir.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        let files = audit_files(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some(last) = files.last() {
            File::open(last).map_err(|e| format!("{}: {e}", last.display()))?;
        }
        return Ok(());
    }
    match dir.ancestors().skip(1).find(|a| a.exists()) {
        Some(a) if a.is_dir() => Ok(()),
        _ => Err(format!(
            "{} does not exist and cannot be created (no directory above it)",
            dir.display()
        )),
    }
}

/// Paths as `audit verify`/`show` take them: files as given, a directory standing for
/// its audit files in chain order.
pub fn expand(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            out.extend(audit_files(p)?);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The audit files in `dir`, in chain order (their names sort that way).
pub fn audit_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests;
