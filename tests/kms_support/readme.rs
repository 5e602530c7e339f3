//! README blocks run as written: a section's `sh` blocks, taken from the README the
//! reader sees, run by `bash` in a process group of their own, so a block that leaves
//! a server running (its last command) cannot outlive a failed test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::repo;

/// The `n`th (from 0) ```` ```sh ```` block of the README section headed `heading`
/// (a whole line, e.g. `"## Running it for real"`). The section ends at the next
/// `##` or `###` heading, so a block is never taken from the section after.
pub fn sh_block(heading: &str, n: usize) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let at = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no README section {heading:?}"))
        + 1;
    let body = &readme[at + heading.len()..];
    let end = ["\n## ", "\n### "]
        .iter()
        .filter_map(|h| body.find(h))
        .min()
        .unwrap_or(body.len());
    let section = &body[..end];
    let mut rest = section;
    for i in 0..=n {
        let start = rest
            .find("```sh\n")
            .unwrap_or_else(|| panic!("{heading:?} has no sh block #{i}"))
            + "```sh\n".len();
        let len = rest[start..].find("\n```").expect("unterminated sh block");
        if i == n {
            return rest[start..start + len].to_owned();
        }
        rest = &rest[start + len..];
    }
    unreachable!("the loop returns at i == n")
}

/// Replaces the one occurrence of `from` in `block` (a test's only license to change
/// a README block: addresses and paths that differ on the test machine).
pub fn substitute(block: &str, from: &str, to: &str) -> String {
    assert_eq!(
        block.matches(from).count(),
        1,
        "expected {from:?} once in the block:\n{block}"
    );
    block.replace(from, to)
}

/// `bash -euo pipefail -c script` in `dir`, with `path_first` ahead of the PATH, in a
/// process group of its own (see [`Group`]).
pub fn bash(script: &str, dir: &Path, path_first: &[PathBuf]) -> Command {
    let mut path: Vec<PathBuf> = path_first.to_vec();
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", std::env::join_paths(path).expect("PATH"));
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd
}

/// Kills a whole process group when dropped: a README block runs in `bash`, whose
/// last command (a server) is bash's child, and must not outlive a failed test.
pub struct Group(pub u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            // An already finished group is fine: nothing to say.
            .stderr(Stdio::null())
            .status();
    }
}

/// What a block that runs to its end printed.
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` (from [`bash`]) to its end, at most `within`; its output goes to files,
/// so a chatty block cannot fill a pipe and stall.
pub fn run_to_end(mut cmd: Command, within: Duration) -> Ran {
    let out = tempfile::tempfile().expect("stdout file");
    let err = tempfile::tempfile().expect("stderr file");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"));
    let mut child = cmd.spawn().expect("spawn bash");
    let group = Group(child.id());
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() >= deadline {
            drop(group);
            let _ = child.wait();
            panic!(
                "the block did not finish within {within:?}; it printed:\n{}\n{}",
                read_all(&out),
                read_all(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(group);
    Ran {
        status,
        stdout: read_all(&out),
        stderr: read_all(&err),
    }
}

fn read_all(mut f: &std::fs::File) -> String {
    use std::io::{Read, Seek};
    let mut s = String::new();
    f.seek(std::io::SeekFrom::Start(0)).expect("seek");
    f.read_to_string(&mut s).expect("read");
    s
}
