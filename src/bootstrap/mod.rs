//! The bootstrap reconciler: runs an ordered list of initialisers, each again only when its
//! operator-chosen flag changes, with state in the reserved `__system__` namespace.

pub mod assess;
pub use crate::duration;
pub mod engine;
pub mod initialiser;
pub mod lease;
pub mod registry;
pub mod schema;
pub mod spec;
pub use crate::api::system as status;

pub use assess::{Assessment, Facts, assess};
pub use engine::{Engine, EngineOptions, Gate, HttpGate, Outcome, RunOutcome};
pub use initialiser::{InitContext, InitError, Initialiser, Phase};
pub use registry::{FromParams, ParamsError, Registration, Registry};
pub use spec::{Cadence, Spec, SpecError};
