//! `bootsync nodes list|remove|replace`: the registered nodes, from `/v1/nodes`.

use clap::{Args, Subcommand};

use super::EXIT_OK;
use super::config::Remote;
use super::report::Output;
use crate::api::cfgsync::NodesBody;
use crate::clock::{now_ms, utc};

/// `bootsync nodes …`.
#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// Every registered node: identifier, IP, index, first and last seen, and whether it
    /// fetched the current epoch.
    List(ListArgs),
    /// Removes a node's registration; it gets 404 (409 in a frozen set) until it registers again.
    Remove {
        #[command(flatten)]
        remote: Remote,
        /// The node's identifier.
        identifier: String,
    },
    /// Puts NEW in OLD's place: the same index and position in every peer list, even in a
    /// frozen set; every other node sees one new epoch.
    Replace(ReplaceArgs),
}

/// Flags of `bootsync nodes list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    remote: Remote,
    /// Output format: a table, or the `/v1/nodes` JSON.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Flags of `bootsync nodes replace`.
#[derive(Debug, Args)]
pub struct ReplaceArgs {
    #[command(flatten)]
    remote: Remote,
    /// The node to replace.
    old: String,
    /// The identifier taking its place.
    new: String,
    /// The new node's IP (default: the old node's), so peers learn it in the same epoch.
    #[arg(long)]
    ip: Option<std::net::IpAddr>,
}

pub(super) async fn run(command: NodesCommand) -> anyhow::Result<u8> {
    match command {
        NodesCommand::List(ListArgs { remote, output }) => {
            let body = remote.client().await?.nodes().await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&body)?),
                Output::Text => print!("{}", super::report::printable(&table(&body, now_ms()))),
            }
        }
        NodesCommand::Remove { remote, identifier } => {
            let revision = remote.client().await?.remove_node(&identifier).await?;
            println!("removed {identifier} at revision {revision}");
        }
        NodesCommand::Replace(args) => {
            let client = args.remote.client().await?;
            let revision = client.replace_node(&args.old, &args.new, args.ip).await?;
            println!("{} replaced {} at revision {revision}", args.new, args.old);
        }
    }
    Ok(EXIT_OK)
}

fn table(body: &NodesBody, now: u64) -> String {
    let mut out = format!(
        "{:<5} {:<24} {:<16} {:<23} {:<23} {}\n",
        "INDEX", "IDENTIFIER", "IP", "FIRST SEEN", "LAST SEEN", "CURRENT"
    );
    for node in &body.nodes {
        let index = node.index.map_or("-".to_string(), |i| i.to_string());
        let current = match (node.current, node.fetched_epoch) {
            (true, _) => "yes".to_string(),
            (false, Some(epoch)) => format!("no (has {epoch})"),
            (false, None) => "no".to_string(),
        };
        let replaced = node
            .replaces
            .as_deref()
            .map_or(String::new(), |old| format!(", replaced {old}"));
        out.push_str(&format!(
            "{index:<5} {:<24} {:<16} {:<23} {:<23} {current}{replaced}\n",
            node.identifier,
            node.ip,
            utc(node.first_seen_ms),
            utc(node.last_seen_ms),
        ));
    }
    out.push_str(&format!(
        "{} node(s); epoch {}; {} removed; at {}\n",
        body.nodes.len(),
        body.epoch.map_or("-".to_string(), |e| e.to_string()),
        body.removed.len(),
        utc(now)
    ));
    out
}
