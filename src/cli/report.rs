//! How waiting commands (`status --wait`, `client`) talk while they wait: a line per change on
//! stderr for people, one JSON object per line with `--output json`, nothing with `--quiet`.

use clap::ValueEnum;
use serde_json::{Value, json};

/// Output format of the commands that report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Lines for people.
    Text,
    /// JSON: the result on stdout, progress as JSON lines on stderr.
    Json,
}

/// `text` safe to print on a terminal: every control character but newlines and tabs is
/// written as an escape (`\u{1b}`), so text that came from elsewhere (a step's stderr, a
/// server's message) cannot move the cursor, recolour or retitle the operator's terminal.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Where report lines go (stderr, or a buffer in tests).
type Sink = Box<dyn Fn(String) + Send + Sync>;

/// Writes progress to stderr in the chosen format, skipping repeats of the same message.
pub(crate) struct Reporter {
    output: Output,
    quiet: bool,
    last: std::sync::Mutex<Option<String>>,
    sink: Sink,
}

impl crate::cfgsync::watch::Events for Reporter {
    fn progress(&self, event: &str, text: &str, fields: Value) {
        Reporter::progress(self, event, text, fields);
    }

    fn problem(&self, event: &str, text: &str, fields: Value) {
        Reporter::problem(self, event, text, fields);
    }
}

impl Reporter {
    pub(crate) fn new(output: Output, quiet: bool) -> Self {
        Self::with_sink(output, quiet, Box::new(|line| eprintln!("{line}")))
    }

    fn with_sink(output: Output, quiet: bool, sink: Sink) -> Self {
        Self {
            output,
            quiet,
            last: std::sync::Mutex::new(None),
            sink,
        }
    }

    /// One progress event: `text` for people, `event` + `fields` for machines. A message equal
    /// to the previous one is not repeated, so a long wait prints what changed, not a heartbeat.
    pub(crate) fn progress(&self, event: &str, text: &str, fields: Value) {
        if self.quiet {
            return;
        }
        let mut last = self
            .last
            .lock()
            .expect("the reporter lock is never poisoned");
        if last.as_deref() == Some(text) {
            return;
        }
        *last = Some(text.to_string());
        drop(last);
        self.emit(event, text, fields);
    }

    /// A final problem (giving up, an error): printed even with `--quiet`, as scripts need it.
    pub(crate) fn problem(&self, event: &str, text: &str, fields: Value) {
        self.emit(event, text, fields);
    }

    fn emit(&self, event: &str, text: &str, fields: Value) {
        let line = match self.output {
            Output::Text => printable(text).into_owned(),
            Output::Json => {
                let mut line = json!({"event": event, "message": text});
                if let (Some(line), Value::Object(fields)) = (line.as_object_mut(), fields) {
                    line.extend(fields);
                }
                line.to_string()
            }
        };
        (self.sink)(line);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn capture(output: Output, quiet: bool) -> (Reporter, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reporter = Reporter::with_sink(
            output,
            quiet,
            Box::new(move |l| sink.lock().unwrap().push(l)),
        );
        (reporter, lines)
    }

    #[test]
    fn terminal_escapes_are_shown_not_obeyed() {
        assert_eq!(
            printable("plain\nlines\tand tabs"),
            "plain\nlines\tand tabs"
        );
        assert_eq!(
            printable("\u{1b}[31mred\u{1b}]0;title\u{7}"),
            "\\u{1b}[31mred\\u{1b}]0;title\\u{7}"
        );
        let (r, lines) = capture(Output::Text, false);
        r.problem("error", "boom \u{1b}[2J", json!({}));
        assert!(!lines.lock().unwrap()[0].contains('\u{1b}'));
    }

    #[test]
    fn repeated_progress_is_said_once_and_changes_are_said_again() {
        let (r, lines) = capture(Output::Text, false);
        r.progress("waiting", "waiting for: a", json!({}));
        r.progress("waiting", "waiting for: a", json!({}));
        r.progress("waiting", "waiting for: b", json!({}));
        r.progress("waiting", "waiting for: a", json!({}));
        assert_eq!(
            *lines.lock().unwrap(),
            ["waiting for: a", "waiting for: b", "waiting for: a"]
        );
    }

    #[test]
    fn json_lines_carry_the_event_message_and_fields_and_quiet_keeps_only_problems() {
        let (r, lines) = capture(Output::Json, true);
        r.progress("waiting", "waiting for: a", json!({"n": 1}));
        r.problem("gave_up", "gave up", json!({"waiting_for": ["a"]}));
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 1);
        let line: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(
            line,
            json!({"event": "gave_up", "message": "gave up", "waiting_for": ["a"]})
        );
    }
}
