//! Reading audit files back: [`verify`] walks the chain and the seals and names the
//! first bad line (file, line, why); [`show`] prints the request records that match a
//! filter. Both read one file at a time.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::record::{GENESIS, SealKey, line_hash};

/// The first line that breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    pub why: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.why)
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Complete lines that verified (up to the first problem).
    pub lines: u64,
    /// Of those, request records.
    pub requests: u64,
    /// The last seal that verified: (file, line, the seq it seals up to).
    pub sealed_at: Option<(PathBuf, usize, u64)>,
    /// Lines after the last verified seal.
    pub unsealed: u64,
    /// The chain ends with a final checkpoint (a clean shutdown).
    pub ends_final: bool,
    /// Seals were checked (a key was given).
    pub keyed: bool,
    /// Things an auditor should read that do not break the chain: restarts after an
    /// unclean stop, new chains, lost records, a half-written last line.
    pub notices: Vec<String>,
    pub problem: Option<Problem>,
}

impl Report {
    /// Everything verified and the chain ends sealed by a final checkpoint.
    pub fn intact_and_sealed(&self) -> bool {
        self.problem.is_none() && self.keyed && self.ends_final && self.unsealed == 0
    }

    /// `audit verify`'s exit code: 0 intact and sealed to the end; 1 the chain is
    /// broken (see [`Report::problem`]); 3 intact as far as it goes, but its end is not
    /// sealed by a final checkpoint (a crash, a proxy still running, or a cut tail) or
    /// no key was given.
    pub fn exit_code(&self) -> u8 {
        if self.problem.is_some() {
            1
        } else if self.intact_and_sealed() {
            0
        } else {
            3
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for n in &self.notices {
            writeln!(f, "note: {n}")?;
        }
        if let Some(p) = &self.problem {
            writeln!(f, "BROKEN at {p}")?;
            return writeln!(
                f,
                "{} lines ({} request records) verified before it",
                self.lines, self.requests
            );
        }
        writeln!(
            f,
            "chain intact: {} lines, {} request records",
            self.lines, self.requests
        )?;
        if !self.keyed {
            return writeln!(
                f,
                "NOT CHECKED: seals (no key given: --key-file or --key-env); a cut tail cannot be detected without them"
            );
        }
        match &self.sealed_at {
            Some((file, line, seq)) => writeln!(
                f,
                "sealed up to seq {seq} by the checkpoint at {}:{line}",
                file.display()
            )?,
            None => writeln!(f, "no seal verified")?,
        }
        if self.ends_final && self.unsealed == 0 {
            writeln!(f, "OK: ends with a final checkpoint (clean shutdown)")
        } else {
            writeln!(
                f,
                "NOT SEALED: {} lines after the last seal, and no final checkpoint at the end: the proxy stopped without a clean shutdown (or is still running), or the tail was cut off",
                self.unsealed
            )
        }
    }
}

/// Where the walk is: what the next line must carry.
struct State {
    /// seq and hash of the last complete line, and where it is.
    last: Option<(u64, String, PathBuf, usize)>,
}

/// Verifies `files` as one chain, in the order given (`audit_files` sorts a
/// directory's). Without a key the chain is checked but not the seals.
pub fn verify(files: &[PathBuf], key: Option<&SealKey>) -> Report {
    let mut report = Report {
        keyed: key.is_some(),
        ..Report::default()
    };
    let mut state = State { last: None };
    for file in files {
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) => {
                report.problem = Some(Problem {
                    file: file.clone(),
                    line: 0,
                    why: format!("cannot read: {}", e.kind()),
                });
                return report;
            }
        };
        let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
        // The segment after the last newline: empty for a whole file, half a line
        // after a crash mid-write (not part of the chain).
        let tail = lines.pop().unwrap_or_default();
        for (i, line) in lines.iter().enumerate() {
            let next = lines.get(i + 1).copied();
            if let Err(why) = check_line(file, i + 1, line, next, key, &mut state, &mut report) {
                report.problem = Some(why);
                return report;
            }
        }
        if !tail.is_empty() {
            report.notices.push(format!(
                "{}:{}: an incomplete last line ({} bytes, no newline): a write cut short by a crash; not part of the chain",
                file.display(),
                lines.len() + 1,
                tail.len()
            ));
        }
    }
    report
}

/// Where a line is, for the problem it may be.
#[derive(Clone, Copy)]
struct At<'a> {
    file: &'a Path,
    /// 1-based.
    n: usize,
}

impl At<'_> {
    fn problem(self, why: String) -> Problem {
        Problem {
            file: self.file.to_path_buf(),
            line: self.n,
            why,
        }
    }
}

/// The fields every record carries, read from one line.
struct Record<'a> {
    /// The line as written: what a seal's MAC covers.
    text: &'a str,
    v: &'a Value,
    seq: u64,
    prev: &'a str,
    /// `type`, or "" (refused as an unknown type by [`tally`], after the link and seal
    /// checks).
    kind: &'a str,
}

/// Checks one complete line: it is a record, it links to the line before, its seal
/// (if it is a seal) verifies, and its type is known; then counts it. The first check
/// that fails names the problem, in that order.
fn check_line(
    file: &Path,
    n: usize,
    line: &[u8],
    next: Option<&[u8]>,
    key: Option<&SealKey>,
    state: &mut State,
    report: &mut Report,
) -> Result<(), Problem> {
    let at = At { file, n };
    let text = std::str::from_utf8(line).map_err(|_| at.problem("not UTF-8 text".into()))?;
    let v: Value =
        serde_json::from_str(text).map_err(|_| at.problem("not a JSON record".into()))?;
    let rec = Record {
        text,
        v: &v,
        seq: v["seq"]
            .as_u64()
            .ok_or_else(|| at.problem("no seq field".into()))?,
        prev: v["prev"]
            .as_str()
            .ok_or_else(|| at.problem("no prev field".into()))?,
        kind: v["type"].as_str().unwrap_or(""),
    };
    check_link(at, &rec, next, state, report)?;
    check_seal(at, &rec, key, report)?;
    tally(at, &rec, report)?;
    report.ends_final = rec.kind == "checkpoint" && v["final"] == true;
    report.lines += 1;
    state.last = Some((rec.seq, line_hash(line), file.to_path_buf(), n));
    Ok(())
}

/// How the line joins the walk: the first line given, a new chain (noted, with whether
/// the chain before ended cleanly), or the next line of the current chain.
fn check_link(
    at: At<'_>,
    rec: &Record<'_>,
    next: Option<&[u8]>,
    state: &State,
    report: &mut Report,
) -> Result<(), Problem> {
    let (file, n, seq) = (at.file, at.n, rec.seq);
    let new_chain = rec.kind == "chain_start" && rec.prev == GENESIS && seq == 0;
    match &state.last {
        None if !new_chain && rec.prev == GENESIS => Err(at.problem(format!(
            "seq {seq} claims to start a chain but is not a chain_start"
        ))),
        // The first file given may begin mid-chain (older files archived): the walk
        // starts from what it is given.
        None => {
            if !new_chain {
                report.notices.push(format!(
                    "{}:{n}: the walk starts mid-chain at seq {seq} (earlier files not given)",
                    file.display()
                ));
            }
            Ok(())
        }
        Some(_) if new_chain => {
            report.notices.push(format!(
                "{}:{n}: a new chain starts here ({}): the proxy could not continue the previous one",
                file.display(),
                describe_start(rec.v)
            ));
            if !(report.ends_final && report.unsealed == 0) {
                report.notices.push(format!(
                    "the chain before {}:{n} did not end with a final checkpoint",
                    file.display()
                ));
            }
            Ok(())
        }
        Some(last) => check_successor(at, rec, last, next),
    }
}

/// The next line of a chain: the seq after the last one (a gap is deleted records,
/// unless the missing seq follows: then out of order), and a prev that is the last
/// line's hash (else that line was altered).
fn check_successor(
    at: At<'_>,
    rec: &Record<'_>,
    (last_seq, last_hash, last_file, last_line): &(u64, String, PathBuf, usize),
    next: Option<&[u8]>,
) -> Result<(), Problem> {
    let seq = rec.seq;
    let want = last_seq + 1;
    let next_seq = next
        .and_then(|l| serde_json::from_slice::<Value>(l).ok())
        .and_then(|v| v["seq"].as_u64());
    if seq > want && next_seq == Some(want) {
        return Err(at.problem(format!(
            "seq {seq} where {want} was expected, and {want} follows: records out of order"
        )));
    }
    if seq > want {
        return Err(at.problem(format!(
            "seq {seq} where {want} was expected: {} record(s) missing before this line (deleted)",
            seq - want
        )));
    }
    if seq < want {
        return Err(at.problem(format!(
            "seq {seq} where {want} was expected: records out of order (or repeated)"
        )));
    }
    if rec.prev != last_hash {
        // The sequence is right, so the line before changed after the fact
        // (or this line's prev did).
        return Err(Problem {
            file: last_file.clone(),
            line: *last_line,
            why: format!(
                "seq {last_seq} was altered: its hash does not match the prev recorded by the next line ({}:{})",
                at.file.display(),
                at.n
            ),
        });
    }
    Ok(())
}

/// A chain_start or checkpoint is a seal: with a key, its MAC must verify, and the
/// lines up to it are then sealed. Without a key, or for any other line, the line
/// counts as unsealed.
fn check_seal(
    at: At<'_>,
    rec: &Record<'_>,
    key: Option<&SealKey>,
    report: &mut Report,
) -> Result<(), Problem> {
    let kind = rec.kind;
    if matches!(kind, "chain_start" | "checkpoint")
        && let Some(key) = key
    {
        match key.check(rec.text) {
            Some(true) => {
                report.sealed_at = Some((at.file.to_path_buf(), at.n, rec.seq));
                report.unsealed = 0;
            }
            Some(false) => {
                return Err(at.problem(format!(
                    "the {kind}'s MAC does not verify under the given key: the line was altered or forged (or the key is wrong)"
                )));
            }
            None => return Err(at.problem(format!("a {kind} without a MAC"))),
        }
    } else {
        report.unsealed += 1;
    }
    Ok(())
}

/// What the line adds to the report by its type: a request counted; a notice for a
/// chain start an auditor should read, or for lost records. An unknown type is a
/// problem.
fn tally(at: At<'_>, rec: &Record<'_>, report: &mut Report) -> Result<(), Problem> {
    let (file, n, v) = (at.file, at.n, rec.v);
    match rec.kind {
        "request" => report.requests += 1,
        "chain_start" => {
            if let Some(
                "resumed_after_unclean_stop"
                | "recovered_after_write_error"
                | "previous_unreadable",
            ) = v["reason"].as_str()
            {
                report
                    .notices
                    .push(format!("{}:{n}: {}", file.display(), describe_start(v)));
            }
        }
        "gap" => report.notices.push(format!(
            "{}:{n}: {} record(s) lost here ({})",
            file.display(),
            v["lost"].as_u64().unwrap_or(0),
            plain(&v["reason"])
        )),
        "checkpoint" => {}
        other => return Err(at.problem(format!("unknown record type {other:?}"))),
    }
    Ok(())
}

/// A file-derived string for the terminal: control characters escaped, so a line
/// nobody sealed cannot drive the auditor's terminal.
fn plain(v: &Value) -> String {
    v.as_str().unwrap_or("-").escape_debug().to_string()
}

fn describe_start(v: &Value) -> String {
    match v["detail"].as_str() {
        Some(_) => format!("{} ({})", plain(&v["reason"]), plain(&v["detail"])),
        None => plain(&v["reason"]),
    }
}

/// Which request records [`show`] prints; every given field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub request_id: Option<String>,
    pub key_id: Option<String>,
    pub principal: Option<String>,
    pub since: Option<time::OffsetDateTime>,
    pub until: Option<time::OffsetDateTime>,
}

impl Filter {
    fn matches(&self, v: &Value) -> bool {
        let eq = |want: &Option<String>, field: &str| {
            want.as_deref().is_none_or(|w| v[field].as_str() == Some(w))
        };
        let at = v["time"].as_str().and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        });
        let in_time = match (at, self.since, self.until) {
            (_, None, None) => true,
            (None, _, _) => false,
            (Some(t), since, until) => since.is_none_or(|s| t >= s) && until.is_none_or(|u| t <= u),
        };
        v["type"] == "request"
            && eq(&self.request_id, "kmsRequestId")
            && eq(&self.key_id, "keyId")
            && eq(&self.principal, "principal")
            && in_time
    }
}

/// The request records of `files` matching `filter`, as written (one JSON line each).
/// Lines that are not records are skipped: `verify` is the tool for those.
pub fn show(files: &[PathBuf], filter: &Filter) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read(file)?;
        for line in text.split(|&b| b == b'\n') {
            let Ok(v) = serde_json::from_slice::<Value>(line) else {
                continue;
            };
            if filter.matches(&v) {
                out.push(String::from_utf8_lossy(line).into_owned());
            }
        }
    }
    Ok(out)
}
