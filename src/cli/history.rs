//! `bootsync history [NAME]`: each initialiser's last runs, oldest first, from `GET /v1/history`.

use clap::Args;

use super::EXIT_OK;
use super::config::Remote;
use super::report::Output;
use crate::api::status::HistoryBody;
use crate::clock::utc;

/// Flags of `bootsync history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    remote: Remote,
    /// Only this initialiser.
    name: Option<String>,
    /// Output format: a table, or the `/v1/history` JSON.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

pub(super) async fn run(args: HistoryArgs) -> anyhow::Result<u8> {
    let body = args
        .remote
        .client()
        .await?
        .history(args.name.as_deref())
        .await?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&body)?),
        Output::Text => print!("{}", super::report::printable(&table(&body))),
    }
    Ok(EXIT_OK)
}

/// Every run of every initialiser in the order they started, one line each.
fn table(body: &HistoryBody) -> String {
    let mut runs: Vec<_> = body
        .initialisers
        .iter()
        .flat_map(|(name, runs)| runs.iter().map(move |run| (name, run)))
        .collect();
    runs.sort_by_key(|(_, run)| run.started_ms);
    let mut out = format!(
        "{:<23} {:<20} {:<17} {:<18} {:>9}  {:<16} ERROR\n",
        "STARTED", "NAME", "FLAG", "RESULT", "DURATION", "HOLDER"
    );
    for (name, run) in runs {
        let flags = format!("{} → {}", run.old_flag.as_deref().unwrap_or("-"), run.flag);
        let error = run.error.as_deref().unwrap_or("");
        // The tail of a chain holds the cause; one line keeps the table a table.
        let error = error.lines().last().unwrap_or("");
        out.push_str(&format!(
            "{:<23} {:<20} {:<17} {:<18} {:>7}ms  {:<16} {error}\n",
            utc(run.started_ms),
            name,
            flags,
            run.result,
            run.duration_ms,
            run.holder,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::system::HistoryEntry;

    fn run(started_ms: u64, result: &str, error: Option<&str>) -> HistoryEntry {
        HistoryEntry {
            started_ms,
            finished_ms: started_ms + 5,
            duration_ms: 5,
            result: result.into(),
            old_flag: Some("v1".into()),
            flag: "v2".into(),
            error: error.map(str::to_string),
            holder: "host-1".into(),
        }
    }

    #[test]
    fn the_table_interleaves_initialisers_in_start_order_with_the_error_cause() {
        let body = HistoryBody {
            revision: 9,
            initialisers: BTreeMap::from([
                (
                    "a".to_string(),
                    vec![run(1_000, "failed", Some("exit 1\nno such table"))],
                ),
                ("b".to_string(), vec![run(500, "succeeded", None)]),
            ]),
        };
        let text = table(&body);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[1].contains(" b ") && lines[1].contains("succeeded"),
            "{text}"
        );
        assert!(
            lines[2].contains(" a ") && lines[2].ends_with("no such table"),
            "{text}"
        );
        assert!(lines[2].contains("v1 → v2"), "{text}");
    }
}
