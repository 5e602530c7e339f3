//! The trail against every kind of tampering, rotation, restarts and crashes, on real
//! files in a temp dir (the writer thread included).

use super::*;
use crate::config::SecretSource;
use crate::secret::SecretString;

const KEY: &str = "an audit key of at least 32 characters";

fn config(dir: &Path) -> AuditConfig {
    AuditConfig {
        directory: dir.to_path_buf(),
        key: SecretString::new(KEY.into()),
        key_source: SecretSource::Env("UNUSED".into()),
        rotate_bytes: None,
        rotate_interval: None,
        queue_capacity: 64,
        on_failure: AuditOnFailure::FailClosed,
        fsync: AuditFsync::EveryRecord,
        checkpoint_interval: Duration::from_secs(3600),
    }
}

fn record(i: usize) -> RequestRecord {
    RequestRecord {
        time: now(),
        kms_request_id: Some(format!("req-{i}")),
        kms_operation: Some("Encrypt".into()),
        xks_operation: Some("Encrypt"),
        principal: Some(format!("arn:aws:iam::111122223333:role/p{}", i % 2)),
        source_vpc: Some("vpc-0abc".into()),
        source_vpce: None,
        prefix: Some("/t".into()),
        access_key_id: Some("AKIAEXAMPLEEXAMPLE22".into()),
        key_id: Some(format!("key-{}", i % 3)),
        key_version: Some(1),
        outcome: "ok",
        error_name: None,
        status: 200,
        backend: Some("default".into()),
        latency_us: 100,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Starts a trail on `cfg`, writes `n` records (numbered from `from`), closes it.
fn write(cfg: &AuditConfig, from: usize, n: usize) {
    runtime().block_on(async {
        let trail = Trail::start(cfg).expect("start");
        for i in from..from + n {
            trail.record(record(i)).await.expect("recorded");
        }
        trail.close().await;
    });
}

fn files(dir: &Path) -> Vec<PathBuf> {
    audit_files(dir).expect("list")
}

fn key() -> SealKey {
    SealKey::new(KEY.as_bytes())
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn rewrite(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").expect("write");
}

/// One file: chain_start, checkpoint (start), 10 requests, final checkpoint.
fn ten(dir: &Path) -> PathBuf {
    write(&config(dir), 0, 10);
    let f = files(dir);
    assert_eq!(f.len(), 1);
    assert_eq!(lines(&f[0]).len(), 13);
    f[0].clone()
}

#[test]
fn a_clean_trail_verifies_and_is_sealed_to_its_end() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = ten(dir.path());
    let r = verify(std::slice::from_ref(&file), Some(&key()));
    assert!(r.intact_and_sealed(), "{r}");
    assert_eq!((r.requests, r.lines, r.exit_code()), (10, 13, 0));
    let all = lines(&file);
    assert!(all[0].contains(r#""type":"chain_start""#) && all[0].contains(r#""reason":"new""#));
    assert!(all[0].contains(&format!(r#""prev":"{GENESIS}""#)));
    assert!(all[12].contains(r#""type":"checkpoint""#) && all[12].contains(r#""final":true"#));
    // Fixed field order: the chain fields first, the MAC last.
    assert!(all[5].starts_with(r#"{"seq":5,"prev":""#), "{}", all[5]);
    assert!(
        all[5].contains(r#""type":"request","time":""#),
        "{}",
        all[5]
    );
    // Without the key the chain is checked, the seals are not: not a pass.
    assert_eq!(verify(&[file], None).exit_code(), 3);
}

#[test]
fn an_edited_record_is_named_by_its_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = ten(dir.path());
    let mut all = lines(&file);
    all[6] = all[6].replace("key-", "kex-");
    rewrite(&file, &all);
    let r = verify(std::slice::from_ref(&file), Some(&key()));
    let p = r.problem.clone().expect("detected");
    assert_eq!((p.file, p.line), (file, 7), "{r}");
    assert!(p.why.contains("altered"), "{}", p.why);
    assert_eq!(r.exit_code(), 1);
}

#[test]
fn an_edit_with_every_later_hash_recomputed_fails_the_next_seal() {
    // Without the key an editor can rebuild the chain after their edit, but not the
    // checkpoint's MAC over the new head.
    let dir = tempfile::tempdir().expect("tmp");
    let file = ten(dir.path());
    let mut all = lines(&file);
    all[6] = all[6].replace("req-4", "req-X");
    for i in 7..all.len() {
        // Substituted in place, so the line keeps its exact layout.
        let old_prev = serde_json::from_str::<serde_json::Value>(&all[i]).expect("json")["prev"]
            .as_str()
            .expect("prev")
            .to_owned();
        all[i] = all[i].replace(&old_prev, &line_hash(all[i - 1].as_bytes()));
    }
    rewrite(&file, &all);
    let p = verify(std::slice::from_ref(&file), Some(&key()))
        .problem
        .expect("detected");
    assert_eq!((p.file, p.line), (file, 13));
    assert!(p.why.contains("MAC"), "{}", p.why);
}

#[test]
fn a_deleted_record_is_named_where_it_was() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = ten(dir.path());
    let mut all = lines(&file);
    all.remove(4);
    rewrite(&file, &all);
    let p = verify(std::slice::from_ref(&file), Some(&key()))
        .problem
        .expect("detected");
    assert_eq!((p.file, p.line), (file, 5));
    assert!(p.why.contains("1 record(s) missing"), "{}", p.why);
}

#[test]
fn reordered_records_are_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = ten(dir.path());
    let mut all = lines(&file);
    all.swap(4, 5);
    rewrite(&file, &all);
    let p = verify(std::slice::from_ref(&file), Some(&key()))
        .problem
        .expect("detected");
    assert_eq!((p.file, p.line), (file, 5));
    assert!(p.why.contains("out of order"), "{}", p.why);
}

#[test]
fn a_cut_tail_is_detected_through_the_final_checkpoint() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = ten(dir.path());
    let mut all = lines(&file);
    // Cut the last three records and the final checkpoint: what is left is a
    // perfectly consistent chain, but not one that ends sealed.
    all.truncate(9);
    rewrite(&file, &all);
    let r = verify(std::slice::from_ref(&file), Some(&key()));
    assert!(r.problem.is_none(), "{r}");
    assert_eq!(r.exit_code(), 3, "{r}");
    assert!(!r.ends_final);
    assert_eq!(r.unsealed, 7, "{r}");
    // The last seal is the start's checkpoint, line 2 (seq 1).
    assert_eq!(r.sealed_at, Some((file.clone(), 2, 1)));
    assert!(r.to_string().contains("NOT SEALED"), "{r}");
    // Only the final checkpoint cut: the same.
    let dir2 = tempfile::tempdir().expect("tmp");
    let file2 = ten(dir2.path());
    let mut all2 = lines(&file2);
    all2.pop();
    rewrite(&file2, &all2);
    assert_eq!(verify(&[file2], Some(&key())).exit_code(), 3);
}

#[test]
fn rotation_continues_the_chain_and_a_missing_file_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = AuditConfig {
        rotate_bytes: Some(4096),
        ..config(dir.path())
    };
    write(&cfg, 0, 40);
    let f = files(dir.path());
    assert!(f.len() >= 3, "{f:?}");
    let r = verify(&f, Some(&key()));
    assert!(r.intact_and_sealed(), "{r}");
    assert_eq!(r.requests, 40);
    for file in &f[1..] {
        assert!(lines(file)[0].contains(r#""reason":"rotated""#));
    }
    // Without the middle file, the next one's first line is where records are missing.
    let without: Vec<PathBuf> = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, p)| p.clone())
        .collect();
    let p = verify(&without, Some(&key())).problem.expect("detected");
    assert_eq!((p.file, p.line), (f[2].clone(), 1));
    assert!(p.why.contains("missing"), "{}", p.why);
}

#[test]
fn a_restart_resumes_the_chain_in_a_new_file() {
    let dir = tempfile::tempdir().expect("tmp");
    write(&config(dir.path()), 0, 3);
    write(&config(dir.path()), 3, 3);
    let f = files(dir.path());
    assert_eq!(f.len(), 2);
    assert!(lines(&f[1])[0].contains(r#""reason":"resumed""#));
    let r = verify(&f, Some(&key()));
    assert!(r.intact_and_sealed(), "{r}");
    assert_eq!(r.requests, 6);
}

#[test]
fn after_a_crash_mid_write_the_chain_verifies_to_the_last_complete_record() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = ten(dir.path());
    // What a crash leaves: no final checkpoint, half a line at the end.
    let mut all = lines(&file);
    all.pop();
    let half = &all[5][..40].to_owned();
    std::fs::write(&file, all.join("\n") + "\n" + half).expect("write");
    let r = verify(std::slice::from_ref(&file), Some(&key()));
    assert!(r.problem.is_none(), "{r}");
    assert_eq!((r.requests, r.exit_code()), (10, 3), "{r}");
    assert!(
        r.notices.iter().any(|n| n.contains("incomplete last line")),
        "{r}"
    );
    // The next start resumes from the last complete line, says the stop was unclean,
    // and seals everything before it.
    write(&config(dir.path()), 10, 2);
    let f = files(dir.path());
    assert!(lines(&f[1])[0].contains("resumed_after_unclean_stop"));
    let r = verify(&f, Some(&key()));
    assert!(r.intact_and_sealed(), "{r}");
    assert_eq!(r.requests, 12);
}

#[test]
fn an_unreadable_last_file_starts_a_new_chain_that_says_why() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path()
            .join("audit-20000101T000000.000Z-000000000000.jsonl"),
        "garbage\n",
    )
    .expect("write");
    write(&config(dir.path()), 0, 2);
    let f = files(dir.path());
    let first = lines(&f[1]);
    assert!(first[0].contains("previous_unreadable"), "{}", first[0]);
    assert!(first[0].contains(&format!(r#""seq":0,"prev":"{GENESIS}""#)));
    assert!(verify(&f[1..], Some(&key())).intact_and_sealed());
    // Given the garbage too, the walk names it.
    assert_eq!(verify(&f, Some(&key())).problem.expect("bad").line, 1);
}

#[test]
fn show_filters_by_request_id_key_principal_and_time() {
    let dir = tempfile::tempdir().expect("tmp");
    ten(dir.path());
    let f = files(dir.path());
    let by = |filter: Filter| show(&f, &filter).expect("show");
    let one = by(Filter {
        request_id: Some("req-7".into()),
        ..Filter::default()
    });
    assert_eq!(one.len(), 1);
    assert!(one[0].contains(r#""kmsRequestId":"req-7""#));
    assert_eq!(
        by(Filter {
            key_id: Some("key-0".into()),
            ..Filter::default()
        })
        .len(),
        4
    );
    let p1 = Some("arn:aws:iam::111122223333:role/p1".to_owned());
    let both = by(Filter {
        key_id: Some("key-0".into()),
        principal: p1,
        ..Filter::default()
    });
    assert_eq!(both.len(), 2, "{both:?}");
    let future = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    assert!(
        by(Filter {
            since: Some(future),
            ..Filter::default()
        })
        .is_empty()
    );
    assert_eq!(
        by(Filter {
            until: Some(future),
            ..Filter::default()
        })
        .len(),
        10
    );
}

#[test]
fn a_full_queue_refuses_or_counts_as_configured() {
    // A writer that cannot keep up is simulated by a queue of 1 and records submitted
    // faster than the thread takes them, without waiting for their write.
    let dir = tempfile::tempdir().expect("tmp");
    for (on_failure, expect_lost) in [
        (AuditOnFailure::FailClosed, false),
        (AuditOnFailure::Continue, true),
    ] {
        let cfg = AuditConfig {
            queue_capacity: 1,
            fsync: AuditFsync::Never,
            on_failure,
            directory: dir.path().join(format!("{on_failure:?}")),
            ..config(dir.path())
        };
        runtime().block_on(async {
            let trail = Trail::start(&cfg).expect("start");
            let mut refused = 0;
            for i in 0..10_000 {
                if trail.record(record(i)).await == Err(Refusal::QueueFull) {
                    refused += 1;
                }
            }
            assert!(refused > 0, "the queue of 1 never filled");
            trail.close().await;
        });
        let f = files(&cfg.directory);
        let r = verify(&f, Some(&key()));
        assert!(r.intact_and_sealed(), "{r}");
        // With continue, the chain itself says records were lost.
        assert_eq!(
            r.notices.iter().any(|n| n.contains("lost here")),
            expect_lost,
            "{r}"
        );
    }
}

#[test]
fn an_idle_writer_sleeps_a_whole_interval_and_a_busy_one_until_its_checkpoint() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = AuditConfig {
        checkpoint_interval: Duration::from_secs(10),
        ..config(dir.path())
    };
    let mut w = Writer::open(&cfg, key()).expect("open");
    // Nothing unsealed and the last checkpoint long ago: no busy loop.
    w.last_checkpoint = Instant::now()
        .checked_sub(Duration::from_secs(20))
        .expect("uptime");
    assert_eq!(w.next_due(), Duration::from_secs(10));
    // Something unsealed and the interval over: due now (the 1 ms floor).
    w.unsealed = 1;
    assert_eq!(w.next_due(), Duration::from_millis(1));
    // A rotation by age sooner than the checkpoint wins.
    w.last_checkpoint = Instant::now();
    w.rotate_interval = Some(Duration::from_secs(2));
    assert!(w.next_due() <= Duration::from_secs(2));
    // A failed writer retries every second.
    w.file = None;
    assert_eq!(w.next_due(), RETRY_EVERY);
}

#[test]
fn preflight_names_a_directory_that_is_a_file() {
    let dir = tempfile::tempdir().expect("tmp");
    assert!(preflight(&config(&dir.path().join("new/sub"))).is_ok());
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").expect("write");
    let e = preflight(&config(&file)).expect_err("a file");
    assert!(e.contains("not a directory"), "{e}");
    assert!(preflight(&config(&file.join("below"))).is_err());
}

#[test]
fn a_failed_write_rolls_the_chain_back_and_the_retry_continues_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let shared = Shared::default();
    let mut w = Writer::open(&config(dir.path()), key()).expect("open");
    w.append("request", &record(0)).expect("append");
    w.commit().expect("written");
    let (seq, head) = (w.seq, w.head.clone());
    // The disk goes away under a batch (and the immediate retry fails too): nothing
    // of it counts, the head rolls back.
    w.file = None;
    let real_dir = std::mem::replace(&mut w.dir, dir.path().join("gone"));
    w.write_batch(
        vec![(Box::new(record(1)), None), (Box::new(record(2)), None)],
        &shared,
    );
    assert_eq!((w.seq, &w.head), (seq, &head));
    assert!(shared.failed.load(Ordering::Acquire));
    assert_eq!(shared.lost.load(Ordering::Acquire), 2);
    // The retry opens a new file that resumes the chain and says what was lost.
    w.dir = real_dir;
    w.retry(&shared);
    assert!(!shared.failed.load(Ordering::Acquire));
    w.finish(&shared);
    let f = files(dir.path());
    assert_eq!(f.len(), 2);
    let second = lines(&f[1]);
    assert!(
        second[0].contains("recovered_after_write_error"),
        "{}",
        second[0]
    );
    assert!(second[1].contains(r#""type":"gap""#) && second[1].contains(r#""lost":2"#));
    let r = verify(&f, Some(&key()));
    assert!(r.intact_and_sealed(), "{r}");
    assert_eq!(r.requests, 1);
}

#[test]
fn rotation_by_age_continues_the_chain() {
    // An age of zero: every look at the clock finds the file old enough (no waiting).
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = AuditConfig {
        rotate_interval: Some(Duration::ZERO),
        ..config(dir.path())
    };
    write(&cfg, 0, 3);
    let f = files(dir.path());
    assert!(f.len() >= 3, "{f:?}");
    assert!(lines(&f[1])[0].contains(r#""reason":"rotated""#));
    let r = verify(&f, Some(&key()));
    assert!(r.intact_and_sealed(), "{r}");
    assert_eq!(r.requests, 3);
}
