//! `cfgsync-bundle`: loads a static artifact bundle into cfgsync's serving state, replacing the
//! previous one as a whole.

use async_trait::async_trait;
use serde::Deserialize;

use crate::bootstrap::{InitContext, InitError, Initialiser};
use crate::cfgsync::rollout::VersionKind;
use crate::cfgsync::{NodeArtifactsBundle, install};

/// Params of `cfgsync-bundle`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "CfgsyncBundleParams")]
struct Params {
    /// The bundle file (YAML or JSON), relative to the spec file.
    bundle_file: String,
    /// Succeed only once the bundle's rollout (its `rollout:` section) has reached every node,
    /// and fail with the reason when it halts or is rolled back; the run's `timeout` must
    /// cover the whole rollout.
    #[serde(default)]
    wait_for_rollout: bool,
    /// Install even while another rollout is under way (which ends that rollout).
    #[serde(default)]
    force: bool,
}

/// The `cfgsync-bundle` class.
struct CfgsyncBundle(Params);

#[async_trait]
impl Initialiser for CfgsyncBundle {
    async fn run(&self, ctx: &InitContext) -> Result<(), InitError> {
        let bundle = NodeArtifactsBundle::load(&ctx.resolve(&self.0.bundle_file))?;
        let installed = install::install_bundle(ctx.store.as_ref(), &bundle, self.0.force).await?;
        install::settle(
            ctx.store.as_ref(),
            VersionKind::Bundle,
            installed,
            self.0.wait_for_rollout,
        )
        .await?;
        Ok(())
    }
}

crate::register!(
    CfgsyncBundle(Params),
    "cfgsync-bundle",
    "loads a static artifact bundle"
);

#[cfg(test)]
mod tests {
    use super::super::testing::sandbox;
    use super::*;
    use crate::cfgsync::state;
    use crate::store::{CFGSYNC_NAMESPACE, Key};

    #[tokio::test]
    async fn installs_a_valid_bundle_and_refuses_an_invalid_one() {
        let (dir, ctx, store) = sandbox(&[(
            "b.yaml",
            "nodes:\n  - identifier: n1\n    files: [{path: a, content: x}]\n",
        )]);
        CfgsyncBundle(Params {
            bundle_file: "b.yaml".into(),
            wait_for_rollout: false,
            force: false,
        })
        .run(&ctx)
        .await
        .unwrap();
        let stored = store
            .get(&Key::new(CFGSYNC_NAMESPACE, state::BUNDLE, state::CURRENT))
            .await
            .unwrap();
        assert_eq!(stored.unwrap().value["nodes"][0]["identifier"], "n1");
        std::fs::write(
            dir.path().join("bad.yaml"),
            "nodes:\n  - identifier: n1\n    files: [{path: ../a, content: x}]\n",
        )
        .unwrap();
        let err = CfgsyncBundle(Params {
            bundle_file: "bad.yaml".into(),
            wait_for_rollout: false,
            force: false,
        })
        .run(&ctx.with_flags(Some("v1"), "v2"))
        .await
        .unwrap_err();
        assert!(err.to_string().contains(".."), "{err}");
    }
}
