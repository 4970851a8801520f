//! `acme.create-admin`: an initialiser written outside bootsync and registered with
//! `register!`, exactly as the core ones are. It depends on bootsync alone.

use bootsync::plugin::*;

/// Params of `acme.create-admin`. The schema derive puts them in `acme-bootsync schema spec`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(crate = "bootsync::plugin::serde", deny_unknown_fields)]
#[schemars(crate = "bootsync::plugin::schemars", rename = "AcmeCreateAdminParams")]
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
    async fn run(&self, ctx: &InitContext) -> Result<(), InitError> {
        let key = Key::new(&self.0.namespace, "users", &self.0.user);
        if ctx.store.get(&key).await?.is_some() {
            return Ok(());
        }
        let value = json!({"role": "admin", "created_by_flag": ctx.new_flag()});
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

impl FromParams for CreateAdmin {
    const CLASS: &'static str = "acme.create-admin";
    const SUMMARY: &'static str = "creates the first admin user";
    type Params = Params;

    fn from_params(params: Params) -> Result<Self, String> {
        if params.user.trim().is_empty() {
            return Err("user must not be empty".into());
        }
        Ok(CreateAdmin(params))
    }
}

register!(CreateAdmin);

/// Referencing this from `main` makes the linker keep this crate's object code, and with it
/// the registration above.
pub fn link() {}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bootsync::store::Limits;
    use bootsync::store::memory::MemoryStore;

    use super::*;

    fn admin(user: &str) -> CreateAdmin {
        CreateAdmin(Params {
            namespace: "prod".into(),
            user: user.into(),
        })
    }

    #[tokio::test]
    async fn it_creates_the_admin_once_and_leaves_it_on_a_flag_bump() {
        let store: DynStore = Arc::new(MemoryStore::new(Limits::default()));
        let ctx = InitContext::for_test(store.clone(), ".");
        admin("root")
            .run(&ctx.with_flags(None, "v1"))
            .await
            .unwrap();
        admin("root")
            .run(&ctx.with_flags(Some("v1"), "v2"))
            .await
            .unwrap();
        let entry = store
            .get(&Key::new("prod", "users", "root"))
            .await
            .unwrap()
            .expect("created");
        assert_eq!(
            entry.value["created_by_flag"], "v1",
            "the bump left it alone"
        );
        assert_eq!(entry.create_revision, entry.mod_revision, "written once");
    }

    #[test]
    fn an_empty_user_is_refused_when_the_spec_is_read() {
        let construct = Registration::of::<CreateAdmin>().construct;
        let err = construct(json!({"namespace": "prod", "user": " "}))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("user must not be empty"), "{err}");
    }
}
