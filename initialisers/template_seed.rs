//! `template-seed`: fills `__template__` from a seed file; a flag change adds only missing keys
//! unless `overwrite` is set.

use async_trait::async_trait;
use serde::Deserialize;

use crate::bootstrap::{InitContext, InitError, Initialiser};
use crate::store::TEMPLATE_NAMESPACE;

/// Params of `template-seed`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "TemplateSeedParams")]
struct Params {
    /// JSON or YAML file shaped `{type: {key: value}}`, relative to the spec file.
    seed_file: String,
    /// Replace existing keys on a flag change (default: only add missing ones).
    #[serde(default)]
    overwrite: bool,
}

/// The `template-seed` class.
struct TemplateSeed(Params);

#[async_trait]
impl Initialiser for TemplateSeed {
    async fn run(&self, ctx: &InitContext) -> Result<(), InitError> {
        let seed = super::load_seed(&ctx.resolve(&self.0.seed_file))?;
        // A first run writes everything; a flag change is a migration that adds what is new.
        let all = ctx.old_flag().is_none() || self.0.overwrite;
        let written = super::fill(&ctx.store, TEMPLATE_NAMESPACE, &seed, all).await?;
        tracing::info!(written, overwrite = all, "seeded the template");
        Ok(())
    }
}

crate::register!(
    TemplateSeed(Params),
    "template-seed",
    "fills __template__ from a seed file"
);

#[cfg(test)]
mod tests {
    use super::super::testing::sandbox;
    use serde_json::json;

    use super::*;
    use crate::store::{Key, StoreExt};

    #[tokio::test]
    async fn first_run_writes_all_then_a_flag_change_adds_only_missing_keys() {
        let (dir, ctx, store) = sandbox(&[("seed.yaml", "flows:\n  a: 1\n  b: 2\n")]);
        let init = TemplateSeed(Params {
            seed_file: "seed.yaml".into(),
            overwrite: false,
        });
        init.run(&ctx).await.unwrap();
        assert_eq!(
            store
                .values(TEMPLATE_NAMESPACE, "flows")
                .await
                .unwrap()
                .len(),
            2
        );
        store
            .put(Key::new(TEMPLATE_NAMESPACE, "flows", "a"), json!("edited"))
            .await
            .unwrap();
        std::fs::write(
            dir.path().join("seed.yaml"),
            "flows:\n  a: 1\n  b: 2\n  c: 3\n",
        )
        .unwrap();
        init.run(&ctx.with_flags(Some("v1"), "v2")).await.unwrap();
        let values = store.values(TEMPLATE_NAMESPACE, "flows").await.unwrap();
        assert_eq!(values["a"], json!("edited"), "an existing key is kept");
        assert_eq!(values["c"], json!(3), "a missing key is added");
        let overwrite = TemplateSeed(Params {
            seed_file: "seed.yaml".into(),
            overwrite: true,
        });
        overwrite
            .run(&ctx.with_flags(Some("v2"), "v3"))
            .await
            .unwrap();
        assert_eq!(
            store.values(TEMPLATE_NAMESPACE, "flows").await.unwrap()["a"],
            json!(1)
        );
    }

    #[tokio::test]
    async fn a_seed_of_the_wrong_shape_is_refused_and_writes_nothing() {
        let files = [("seed.json", r#"{"flows": {"a": 1}, "bad": [1, 2]}"#)];
        let (_dir, ctx, store) = sandbox(&files);
        let init = TemplateSeed(Params {
            seed_file: "seed.json".into(),
            overwrite: false,
        });
        let err = init.run(&ctx).await.unwrap_err().to_string();
        assert!(
            err.contains("seed.json") && err.contains("\"bad\" is not a map"),
            "{err}"
        );
        assert_eq!(store.revision().await.unwrap(), 0);
    }

    #[test]
    fn unknown_params_are_refused() {
        let err = super::super::testing::construct::<TemplateSeed>(
            json!({"seed_file": "x", "colour": 1}),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
