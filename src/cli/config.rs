//! `bootsync config get|put|delete|list|watch` (filled in by the foundation work).

use clap::Subcommand;

/// Config store operations against a server.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Read one value.
    Get,
}

pub(super) async fn run(_command: ConfigCommand) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
