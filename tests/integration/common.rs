//! Shared helpers: paths to fixtures, running the binary.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Every fixture photo: JPEGs (one with EXIF rotation), RGBA and grey PNGs.
pub const PHOTOS: [&str; 8] = [
    "chelsea.jpg",
    "chelsea_exif6.jpg",
    "coffee.jpg",
    "dog.jpg",
    "eagle.jpg",
    "giraffe.jpg",
    "astronaut_rgba.png",
    "camera_gray.png",
];

pub fn root() -> PathBuf {
    // The tests belong to the cli package (cli/); fixtures, models and docs are at the top.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ sits in the repository")
        .to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

pub fn image(name: &str) -> PathBuf {
    fixture("images").join(name)
}

/// The `graft` binary with a private, empty embedding cache.
pub fn graft(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_graft"));
    c.env("GRAFT_CACHE", cache);
    // The test binaries run in parallel: one inference thread each, whatever the board.
    c.env("GRAFT_THREADS", "1");
    c
}

/// Runs `c` with nobody reading its stdout (the reader gone before it writes, as in
/// `graft ... | head -0`); returns its exit status and stderr.
#[cfg(any(feature = "serial", feature = "fleet"))]
pub fn with_stdout_closed(mut c: Command) -> (std::process::ExitStatus, String) {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().expect("run graft");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for graft");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs and insists on success, returning stdout.
pub fn ok(mut c: Command) -> String {
    let out = c.output().expect("run graft");
    assert!(
        out.status.success(),
        "graft failed ({:?}): {}\nstdout: {}",
        c.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs and insists on a clean failure: exit code 1, one `graft: error:` line naming `needle`,
/// no panic, nothing on stdout.
pub fn fails(mut c: Command, needle: &str) -> String {
    let out: Output = c.output().expect("run graft");
    let what = format!("{:?}", c.get_args().collect::<Vec<_>>());
    failed_cleanly(&out, &what, needle)
}

/// [`fails`] on a finished run (`what` names it in messages).
pub fn failed_cleanly(out: &Output, what: &str, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(stderr.starts_with("graft: error: "), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout not empty: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

pub fn json_lines(s: &str) -> Vec<serde_json::Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// Runs `c` to the end, but kills it and fails the test if it is still running after `limit`:
/// for bugs whose symptom is a hang (a FIFO read, a symlink loop). The limit is a generous bound
/// on "never finishes", not a speed requirement.
pub fn run_within(mut c: Command, limit: Duration) -> Output {
    let what = format!("{:?}", c.get_args().collect::<Vec<_>>());
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run graft");
    // Drain both pipes while waiting, so a chatty child never blocks on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "{what} still running after {limit:?} (hangs); stderr so far: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Runs graft with its address space capped at `limit` bytes (`setrlimit(RLIMIT_AS)`), on the
/// CPU: an allocation past the cap fails as it would on a board without that much memory,
/// where the defect aborted the process. A plain `classify` needs well under 1 GiB.
pub fn capped(cache: &Path, limit: u64) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut c = graft(cache);
    c.args(["--device", "cpu"]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}
