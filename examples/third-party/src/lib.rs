//! `acme.create-admin`: an initialiser written outside bootsync, registered with
//! `inventory::submit!` exactly as the core ones are.

use async_trait::async_trait;
use bootsync::bootstrap::registry::{ParamsError, from_params};
use bootsync::bootstrap::{InitContext, InitError, Initialiser, Registration};
use bootsync::inventory;
use bootsync::store::{Batch, Key, Precondition};
use serde::Deserialize;

/// Params of `acme.create-admin`. The schema derive puts them in `acme-bootsync schema spec`.
#[derive(Debug, Clone, Deserialize, bootsync::schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(crate = "bootsync::schemars", rename = "AcmeCreateAdminParams")]
pub struct Params {
    /// Namespace to create the admin record in.
    pub namespace: String,
    /// The admin's user name.
    pub user: String,
}

/// Creates an admin record once; a later flag bump leaves an existing record alone.
pub struct CreateAdmin(Params);

#[async_trait]
impl Initialiser for CreateAdmin {
    async fn run(
        &self,
        ctx: &InitContext,
        _old: Option<&str>,
        new_flag: &str,
    ) -> Result<(), InitError> {
        let key = Key::new(&self.0.namespace, "users", &self.0.user);
        if ctx.store.get(&key).await?.is_some() {
            return Ok(());
        }
        let value = serde_json::json!({"role": "admin", "created_by_flag": new_flag});
        ctx.store
            .apply(
                Batch::new()
                    .check(key.clone(), Precondition::Absent)
                    .put(key, value),
            )
            .await?;
        Ok(())
    }
}

fn construct(params: serde_json::Value) -> Result<Box<dyn Initialiser>, ParamsError> {
    from_params(params, CreateAdmin)
}

inventory::submit! {
    Registration::new("acme.create-admin", "creates the first admin user", construct)
        .with_params_schema(bootsync::bootstrap::schema::params_schema::<Params>)
}

/// Referencing this from `main` makes the linker keep this crate's object code, and with it
/// the inventory registration above.
pub fn link() {}
