//! One initialiser run under its timeout, with panics caught: however it ends, the engine gets
//! an explicit outcome and the other initialisers carry on.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bootstrap::InitContext;
use crate::bootstrap::spec::Entry;
use crate::store::Revision;
use crate::telemetry::error_chain;

/// How a post-gate run ended, flag write included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// It succeeded and its flag is stored at this revision.
    Succeeded(Revision),
    /// It returned an error (with its cause chain).
    Failed(String),
    /// It did not finish within its timeout and was cancelled.
    TimedOut(Duration),
    /// It panicked (with the panic's message).
    Panicked(String),
    /// It succeeded, but its flag could not be stored (why); it runs again.
    StateWriteFailed(String),
}

impl RunOutcome {
    /// The `result` label of the run metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Succeeded(_) => "succeeded",
            Self::Failed(_) => "failed",
            Self::TimedOut(_) => "timed_out",
            Self::Panicked(_) => "panicked",
            Self::StateWriteFailed(_) => "state_write_failed",
        }
    }

    /// What the status record keeps as the last error.
    pub fn error(&self) -> Option<String> {
        match self {
            Self::Succeeded(_) => None,
            Self::Failed(why) => Some(why.clone()),
            Self::TimedOut(after) => Some(format!("timed out after {after:?}")),
            Self::Panicked(message) => Some(format!("panicked: {message}")),
            Self::StateWriteFailed(why) => Some(format!("the flag could not be stored: {why}")),
        }
    }
}

/// How the initialiser itself ended, before any flag is written.
pub(super) type Ran = Result<(), RunOutcome>;

/// Runs `entry` with the context `context` builds around a cancellation token that fires on
/// timeout.
pub(super) async fn run_guarded(
    entry: &Entry,
    context: impl FnOnce(CancellationToken) -> InitContext,
) -> Ran {
    let cancel = CancellationToken::new();
    let ctx = context(cancel.clone());
    let initialiser = entry.initialiser.clone();
    let mut task = tokio::spawn(
        async move {
            initialiser
                .run(&ctx)
                .await
                .map_err(|err| error_chain(err.as_ref()))
        }
        .in_current_span(),
    );
    match tokio::time::timeout(entry.timeout, &mut task).await {
        Ok(Ok(result)) => result.map_err(RunOutcome::Failed),
        Ok(Err(join)) if join.is_panic() => {
            Err(RunOutcome::Panicked(panic_message(join.into_panic())))
        }
        Ok(Err(_)) => Err(RunOutcome::Failed("the run was cancelled".into())),
        Err(_) => {
            cancel.cancel();
            task.abort();
            Err(RunOutcome::TimedOut(entry.timeout))
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
