//! The harness of the integration-test binary: every `#[it::test]` registers itself here, and
//! runs through `libtest-mimic`, so a test that cannot run on this machine (no etcd, no
//! Chromium) is reported as *ignored*, with the reason, and counted in the summary, never as
//! passed. CI sets `BOOTSYNC_REQUIRE_ETCD=1` and `BOOTSYNC_REQUIRE_BROWSER=1`: those tests then
//! run, and fail when their program is missing. `BOOTSYNC_TEST_TIMES=1` prints each test's
//! wall time on stderr, to find what makes the suite slow.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::OnceLock;

use libtest_mimic::{Arguments, Completion, Trial};

/// One registered test.
pub(crate) struct Test {
    /// `module_path!()` of the test.
    pub(crate) path: &'static str,
    /// The function's name.
    pub(crate) name: &'static str,
    /// Programs it needs from the machine.
    pub(crate) needs: &'static [Need],
    /// Runs it; a panic is a failure.
    pub(crate) run: fn(),
}

inventory::collect!(Test);

/// A program some tests need from the machine.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Need {
    /// `etcd` on PATH (Debian's `etcd-server`).
    Etcd,
    /// A Chromium for the status page's browser test.
    Browser,
}

impl Need {
    /// Why the test cannot run here, or `None` when it can (or must: CI requires it).
    fn missing(self) -> Option<&'static str> {
        match self {
            Need::Etcd if !required("BOOTSYNC_REQUIRE_ETCD") && !etcd_available() => {
                Some("needs etcd on PATH (apt-get install etcd-server)")
            }
            Need::Browser if !required("BOOTSYNC_REQUIRE_BROWSER") && chromium().is_none() => {
                Some("needs Chromium (apt-get install chromium)")
            }
            _ => None,
        }
    }
}

fn required(variable: &str) -> bool {
    std::env::var(variable).as_deref() == Ok("1")
}

/// Whether `etcd --version` runs (asked once).
pub(crate) fn etcd_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The Chromium binary: `BOOTSYNC_CHROMIUM`, else the usual Debian paths.
pub(crate) fn chromium() -> Option<PathBuf> {
    std::env::var_os("BOOTSYNC_CHROMIUM")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/bin/chromium",
                "/usr/bin/chromium-browser",
                "/usr/bin/google-chrome",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.is_file())
}

/// The runtime an async test runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Flavor {
    /// One thread, as `#[tokio::test]`.
    CurrentThread,
    /// Two workers: for tests that block a worker or need real parallelism.
    MultiThread,
}

/// Runs an async test to completion on a fresh runtime of `flavor`.
pub(crate) fn block_on(flavor: Flavor, test: impl Future<Output = ()>) {
    let mut builder = match flavor {
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Flavor::MultiThread => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(2);
            builder
        }
    };
    builder
        .enable_all()
        .build()
        .expect("a test runtime starts")
        .block_on(test);
}

/// Runs every registered test (or those the command line selects).
pub(crate) fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // Most tests wait on processes, sockets and deadlines rather than compute: four at a time
    // on two cores overlaps the waiting (`--test-threads N` still decides).
    args.test_threads.get_or_insert(4);
    let mut tests: Vec<&'static Test> = inventory::iter::<Test>.into_iter().collect();
    tests.sort_by_key(|t| (t.path, t.name));
    let trials = tests
        .into_iter()
        .map(|test| {
            let module = test.path.split_once("::").map_or("", |(_, rest)| rest);
            let name = if module.is_empty() {
                test.name.to_string()
            } else {
                format!("{module}::{}", test.name)
            };
            Trial::ignorable_test(name, move || {
                if let Some(reason) = test.needs.iter().find_map(|need| need.missing()) {
                    return Ok(Completion::ignored_with(reason));
                }
                let started = std::time::Instant::now();
                (test.run)();
                if std::env::var_os("BOOTSYNC_TEST_TIMES").is_some() {
                    eprintln!(
                        "time: {:>7.2} s  {}",
                        started.elapsed().as_secs_f64(),
                        test.name
                    );
                }
                Ok(Completion::Completed)
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
