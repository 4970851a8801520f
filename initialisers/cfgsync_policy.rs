//! `cfgsync-policy`: installs the registration policy of the declarative materializer.

use async_trait::async_trait;
use serde::Deserialize;

use crate::bootstrap::{InitContext, InitError, Initialiser};
use crate::cfgsync::{Policy, state};

/// Params of `cfgsync-policy`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "CfgsyncPolicyParams")]
struct Params {
    /// The policy file (YAML or JSON), relative to the spec file.
    policy_file: String,
}

/// The `cfgsync-policy` class.
struct CfgsyncPolicy(Params);

#[async_trait]
impl Initialiser for CfgsyncPolicy {
    async fn run(&self, ctx: &InitContext) -> Result<(), InitError> {
        let compiled = Policy::load(&ctx.resolve(&self.0.policy_file))?;
        let revision = state::install_policy(ctx.store.as_ref(), compiled.policy()).await?;
        tracing::info!(revision, "installed the cfgsync policy");
        Ok(())
    }
}

crate::register!(
    CfgsyncPolicy(Params),
    "cfgsync-policy",
    "installs a cfgsync registration policy"
);

#[cfg(test)]
mod tests {
    use super::super::testing::sandbox;
    use super::*;

    #[tokio::test]
    async fn a_template_error_fails_the_run_naming_the_file() {
        let (_dir, ctx, store) = sandbox(&[(
            "p.yaml",
            "expect_nodes: 2\nfiles:\n  - path: a\n    template: \"{% for %}\"\n",
        )]);
        let err = CfgsyncPolicy(Params {
            policy_file: "p.yaml".into(),
        })
        .run(&ctx)
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("p.yaml") && err.to_string().contains("template error"),
            "{err}"
        );
        assert_eq!(store.revision().await.unwrap(), 0);
    }
}
