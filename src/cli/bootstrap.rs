//! `bootsync run|bootstrap|check|plan|status` (filled in by the reconciler work).

use clap::Args;

/// Flags of `bootsync run`.
#[derive(Debug, Args)]
pub struct RunArgs {}
/// Flags of `bootsync bootstrap`.
#[derive(Debug, Args)]
pub struct BootstrapArgs {}
/// Flags of `bootsync check`.
#[derive(Debug, Args)]
pub struct CheckArgs {}
/// Flags of `bootsync plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {}
/// Flags of `bootsync status`.
#[derive(Debug, Args)]
pub struct StatusArgs {}

pub(super) async fn run(_args: RunArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
pub(super) async fn bootstrap(_args: BootstrapArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
pub(super) async fn check(_args: CheckArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
pub(super) async fn plan(_args: PlanArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
pub(super) async fn status(_args: StatusArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not built yet")
}
