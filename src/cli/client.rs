//! `bootsync client` (filled in by the cfgsync work).

use clap::Args;

/// Flags of `bootsync client`.
#[derive(Debug, Args)]
pub struct ClientArgs {}

pub(super) async fn run(_args: ClientArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
