//! `exec`: runs a command once per flag with `BOOTSYNC_OLD_FLAG` and `BOOTSYNC_NEW_FLAG` set;
//! a non-zero exit fails with the tail of its stderr. Its output is streamed, and only the
//! tail is kept, however much a step writes.

use std::collections::BTreeMap;
use std::process::Stdio;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::bootstrap::{FromParams, InitContext, InitError, Initialiser};

/// How much of its output (stderr, else stdout) a failure carries.
const TAIL: usize = 2048;

/// Params of `exec`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "ExecParams")]
struct Params {
    /// The program and its arguments (no shell: use `["sh", "-c", "..."]` for one).
    command: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Working directory, relative to the spec file (default: the spec file's directory).
    #[serde(default)]
    cwd: Option<String>,
}

struct Exec(Params);

/// Reads `pipe` to its end, keeping only its last [`TAIL`] bytes.
async fn tail_of(mut pipe: impl AsyncRead + Unpin) -> std::io::Result<String> {
    let mut kept = Vec::with_capacity(2 * TAIL);
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = pipe.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * TAIL {
            kept.drain(..kept.len() - TAIL);
        }
    }
    let start = kept.len().saturating_sub(TAIL);
    Ok(String::from_utf8_lossy(&kept[start..]).trim().to_string())
}

#[async_trait]
impl Initialiser for Exec {
    async fn run(&self, ctx: &InitContext) -> Result<(), InitError> {
        let (program, args) = self
            .0
            .command
            .split_first()
            .expect("checked non-empty at load");
        let cwd = self
            .0
            .cwd
            .as_ref()
            .map_or_else(|| ctx.spec_dir.clone(), |c| ctx.resolve(c));
        let mut command = tokio::process::Command::new(program);
        die_with_parent(&mut command);
        let mut child = command
            .args(args)
            .envs(&self.0.env)
            .env("BOOTSYNC_OLD_FLAG", ctx.old_flag().unwrap_or(""))
            .env("BOOTSYNC_NEW_FLAG", ctx.new_flag())
            .env("BOOTSYNC_INSTANCE", &ctx.name)
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A timeout or shutdown drops the future: the command must not outlive it.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {program:?} in {}: {e}", cwd.display()))?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let finished = async {
            let (status, stdout, stderr) = tokio::join!(
                child.wait(),
                tail_of(stdout.expect("piped")),
                tail_of(stderr.expect("piped")),
            );
            Ok::<_, std::io::Error>((status?, stdout?, stderr?))
        };
        let (status, stdout, stderr) = tokio::select! {
            finished = finished => finished?,
            () = ctx.cancel.cancelled() => return Err("cancelled; the command was killed".into()),
        };
        if status.success() {
            return Ok(());
        }
        let shown = match (stderr.is_empty(), stdout.is_empty()) {
            (false, _) => format!("; stderr: {stderr}"),
            (true, false) => format!("; stdout: {stdout}"),
            (true, true) => String::new(),
        };
        Err(format!("{program:?} exited with {status}{shown}").into())
    }
}

/// Makes the command die when the reconciler dies, even by SIGKILL: an orphaned step would
/// otherwise finish unobserved while a restarted or standby reconciler runs it again.
///
/// The one `unsafe` in bootsync: a death signal can only be asked for by the child itself,
/// between fork and exec, and `pre_exec` is how std runs code there.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(command: &mut tokio::process::Command) {
    use rustix::process::{Signal, set_parent_process_death_signal};
    // SAFETY: the closure runs in the forked child before exec and only makes one prctl
    // system call, which is async-signal-safe; it allocates nothing and touches no memory
    // shared with the parent.
    unsafe {
        command.pre_exec(|| {
            set_parent_process_death_signal(Some(Signal::KILL)).map_err(std::io::Error::from)
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut tokio::process::Command) {}

impl FromParams for Exec {
    const CLASS: &'static str = "exec";
    const SUMMARY: &'static str = "runs a command once per flag";
    type Params = Params;

    fn from_params(params: Params) -> Result<Self, String> {
        if params.command.is_empty() || params.command[0].is_empty() {
            return Err("command must name a program".into());
        }
        Ok(Self(params))
    }
}

crate::register!(Exec);

#[cfg(test)]
mod tests {
    use super::super::testing::sandbox;
    use serde_json::json;

    use super::*;

    fn exec(script: &str) -> Box<dyn Initialiser> {
        super::super::testing::construct::<Exec>(
            json!({"command": ["sh", "-c", script], "env": {"EXTRA": "x"}}),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn passes_the_old_and_new_flags_and_runs_in_the_spec_dir() {
        let (dir, ctx, _) = sandbox(&[]);
        exec("echo \"[$BOOTSYNC_OLD_FLAG]>$BOOTSYNC_NEW_FLAG $EXTRA\" > out")
            .run(&ctx)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).unwrap(),
            "[]>v1 x\n"
        );
        exec("echo \"$BOOTSYNC_OLD_FLAG>$BOOTSYNC_NEW_FLAG\" > out")
            .run(&ctx.with_flags(Some("v1"), "v2"))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).unwrap(),
            "v1>v2\n"
        );
    }

    /// The error of a step running `script`, which must fail.
    async fn failure_of(script: &str) -> String {
        let (_dir, ctx, _) = sandbox(&[]);
        exec(script).run(&ctx).await.unwrap_err().to_string()
    }

    #[tokio::test]
    async fn a_failure_carries_the_exit_status_and_stderr_tail() {
        let err = failure_of("echo migration broke >&2; exit 3").await;
        assert!(
            err.contains("3") && err.contains("migration broke"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn only_the_tail_of_a_flood_of_output_is_kept() {
        // 20 MB on each stream, then a last line on stderr and a failure.
        let err = failure_of(
            "head -c 20000000 /dev/zero; head -c 20000000 /dev/zero >&2; echo the end >&2; exit 5",
        )
        .await;
        assert!(
            err.ends_with("the end"),
            "{}",
            &err[err.len().saturating_sub(80)..]
        );
        assert!(err.len() < TAIL + 200, "{} bytes kept", err.len());
    }

    #[tokio::test]
    async fn a_silent_stderr_shows_the_tail_of_stdout() {
        let err = failure_of("echo nothing on stderr; exit 2").await;
        assert!(err.contains("stdout: nothing on stderr"), "{err}");
    }

    #[tokio::test]
    async fn cancellation_kills_the_command() {
        let (dir, ctx, _) = sandbox(&[]);
        let cancel = ctx.cancel.clone();
        let run = tokio::spawn(async move {
            exec("sleep 30; touch late")
                .run(&ctx)
                .await
                .map_err(|e| e.to_string())
        });
        cancel.cancel();
        let result = tokio::time::timeout(std::time::Duration::from_secs(10), run)
            .await
            .expect("cancellation did not stop the run")
            .unwrap();
        assert!(result.unwrap_err().contains("cancelled"));
        assert!(!dir.path().join("late").exists());
    }

    #[test]
    fn an_empty_command_is_refused_at_load() {
        assert!(super::super::testing::construct::<Exec>(json!({"command": []})).is_err());
        assert!(
            super::super::testing::construct::<Exec>(json!({"command": ["true"], "shell": true}))
                .is_err()
        );
    }
}
