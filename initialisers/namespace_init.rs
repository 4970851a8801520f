//! `namespace-init`: fills a namespace from the whole `__template__` or a seed file; fails
//! cleanly while the template is still empty so the reconciler retries.

use async_trait::async_trait;
use serde::Deserialize;

use crate::bootstrap::{FromParams, InitContext, InitError, Initialiser};
use crate::store::{TEMPLATE_NAMESPACE, is_reserved, validate_namespace};

/// Where the content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(rename = "NamespaceInitSource")]
enum Source {
    /// The whole `__template__` namespace.
    Template,
    /// The `seed_file` param.
    SeedFile,
}

/// Params of `namespace-init`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(rename = "NamespaceInitParams")]
struct Params {
    /// The namespace to fill (not a reserved one).
    namespace: String,
    /// `template` (default) or `seed-file`.
    #[serde(default = "default_source")]
    source: Source,
    /// The seed file when `source: seed-file`, relative to the spec file.
    #[serde(default)]
    seed_file: Option<String>,
    /// Replace existing keys on a flag change (default: only add missing ones).
    #[serde(default)]
    overwrite: bool,
}

fn default_source() -> Source {
    Source::Template
}

/// Why a `namespace-init` run cannot proceed.
#[derive(Debug, thiserror::Error)]
enum NamespaceInitError {
    #[error(
        "the template namespace {TEMPLATE_NAMESPACE} is empty; seed it first (template-seed), retrying"
    )]
    TemplateEmpty,
}

struct NamespaceInit(Params);

impl NamespaceInit {
    fn check(params: &Params) -> Result<(), String> {
        validate_namespace(&params.namespace).map_err(|e| e.to_string())?;
        // Reserved namespaces belong to bootsync's own state; filling one from a template is a
        // mistake that would be invisible on the change stream.
        if is_reserved(&params.namespace) {
            return Err(format!("namespace {:?} is reserved", params.namespace));
        }
        match (params.source, &params.seed_file) {
            (Source::SeedFile, None) => Err("source: seed-file needs seed_file".into()),
            (Source::Template, Some(_)) => {
                Err("seed_file is only used with source: seed-file".into())
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Initialiser for NamespaceInit {
    async fn run(&self, ctx: &InitContext) -> Result<(), InitError> {
        let params = &self.0;
        let seed = match (&params.source, &params.seed_file) {
            (Source::SeedFile, Some(file)) => super::load_seed(&ctx.resolve(file))?,
            _ => {
                let template = ctx.store.namespace(TEMPLATE_NAMESPACE).await?;
                if template.types.is_empty() {
                    return Err(NamespaceInitError::TemplateEmpty.into());
                }
                template.values()
            }
        };
        let all = ctx.old_flag().is_none() || params.overwrite;
        let written = super::fill(&ctx.store, &params.namespace, &seed, all).await?;
        tracing::info!(namespace = %params.namespace, written, "filled the namespace");
        Ok(())
    }
}

impl FromParams for NamespaceInit {
    const CLASS: &'static str = "namespace-init";
    const SUMMARY: &'static str = "fills a namespace from __template__ or a seed file";
    type Params = Params;

    fn from_params(params: Params) -> Result<Self, String> {
        Self::check(&params)?;
        Ok(Self(params))
    }
}

crate::register!(NamespaceInit);

#[cfg(test)]
mod tests {
    use super::super::testing::sandbox;
    use serde_json::json;

    use super::*;
    use crate::store::{Key, StoreExt};

    #[tokio::test]
    async fn fails_while_the_template_is_empty_then_copies_every_type() {
        let (_dir, ctx, store) = sandbox(&[]);
        let init = NamespaceInit(Params {
            namespace: "prod".into(),
            source: Source::Template,
            seed_file: None,
            overwrite: false,
        });
        let err = init.run(&ctx).await.unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        store
            .put(Key::new(TEMPLATE_NAMESPACE, "flows", "a"), json!(1))
            .await
            .unwrap();
        store
            .put(Key::new(TEMPLATE_NAMESPACE, "prompts", "p"), json!("hi"))
            .await
            .unwrap();
        init.run(&ctx).await.unwrap();
        let tree = store.namespace("prod").await.unwrap().values();
        assert_eq!(tree["flows"]["a"], json!(1));
        assert_eq!(tree["prompts"]["p"], json!("hi"));
    }

    #[test]
    fn params_are_checked_when_the_spec_is_loaded() {
        for (params, expected) in [
            (json!({"namespace": "__system__"}), "reserved"),
            (
                json!({"namespace": "prod", "source": "seed-file"}),
                "needs seed_file",
            ),
            (json!({"namespace": "bad name"}), "namespace"),
            (json!({"namespace": "prod", "sauce": "template"}), "sauce"),
        ] {
            let err = super::super::testing::construct::<NamespaceInit>(params)
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains(expected), "{err}");
        }
    }
}
