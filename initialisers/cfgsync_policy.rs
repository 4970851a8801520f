//! `cfgsync-policy`: installs the registration policy of the declarative materializer.

use async_trait::async_trait;
use serde::Deserialize;

use crate::bootstrap::{InitContext, InitError, Initialiser};
use crate::cfgsync::rollout::VersionKind;
use crate::cfgsync::{Policy, install};

/// Params of `cfgsync-policy`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "CfgsyncPolicyParams")]
struct Params {
    /// The policy file (YAML or JSON), relative to the spec file.
    policy_file: String,
    /// Succeed only once the policy's rollout (its `rollout:` section) has reached every node,
    /// and fail with the reason when it halts or is rolled back; the run's `timeout` must
    /// cover the whole rollout.
    #[serde(default)]
    wait_for_rollout: bool,
    /// Install even while another rollout is under way (which ends that rollout).
    #[serde(default)]
    force: bool,
}

/// The `cfgsync-policy` class.
struct CfgsyncPolicy(Params);

#[async_trait]
impl Initialiser for CfgsyncPolicy {
    async fn run(&self, ctx: &InitContext) -> Result<(), InitError> {
        let compiled = Policy::load(&ctx.resolve(&self.0.policy_file))?;
        let installed =
            install::install_policy(ctx.store.as_ref(), compiled.policy(), self.0.force).await?;
        install::settle(
            ctx.store.as_ref(),
            VersionKind::Policy,
            installed,
            self.0.wait_for_rollout,
        )
        .await?;
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
            wait_for_rollout: false,
            force: false,
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
