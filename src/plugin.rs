//! Everything a third-party initialiser needs, re-exported so its crate depends on bootsync
//! alone: `use bootsync::plugin::*;`.
//!
//! The derives need to be told where their crates are, because the plugin does not depend on
//! them itself: `#[serde(crate = "bootsync::plugin::serde")]` and
//! `#[schemars(crate = "bootsync::plugin::schemars")]`.
//!
//! ```
//! use bootsync::plugin::*;
//!
//! #[derive(Deserialize, JsonSchema)]
//! #[serde(crate = "bootsync::plugin::serde", deny_unknown_fields)]
//! #[schemars(crate = "bootsync::plugin::schemars", rename = "GreetParams")]
//! pub struct Params {
//!     /// Who to greet.
//!     pub who: String,
//! }
//!
//! pub struct Greet(Params);
//!
//! #[async_trait]
//! impl Initialiser for Greet {
//!     async fn run(&self, ctx: &InitContext) -> Result<(), InitError> {
//!         let key = Key::new("prod", "greetings", &self.0.who);
//!         ctx.store.put(key, json!({"flag": ctx.new_flag()})).await?;
//!         Ok(())
//!     }
//! }
//!
//! impl FromParams for Greet {
//!     const CLASS: &'static str = "example.greet";
//!     const SUMMARY: &'static str = "stores a greeting";
//!     type Params = Params;
//!     fn from_params(params: Params) -> Result<Self, String> {
//!         Ok(Greet(params))
//!     }
//! }
//!
//! register!(Greet);
//! ```

pub use async_trait::async_trait;
pub use schemars::{self, JsonSchema};
pub use serde::{self, Deserialize};
pub use serde_json::{self, Value, json};

pub use crate::bootstrap::{FromParams, InitContext, InitError, Initialiser, Phase, Registration};
pub use crate::register;
pub use crate::store::{Batch, DynStore, Key, Precondition, Store, StoreExt};
