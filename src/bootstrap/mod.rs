//! The bootstrap reconciler: runs an ordered list of initialisers, each again only when its
//! operator-chosen flag changes, with state in the reserved `__system__` namespace.

pub mod duration;
pub mod engine;
pub mod initialiser;
pub mod lease;
pub mod registry;
pub mod schema;
pub mod spec;
pub mod status;

pub use engine::{Engine, EngineOptions, Gate, HttpGate, Outcome};
pub use initialiser::{InitContext, InitError, Initialiser};
pub use registry::{ParamsError, Registration, Registry};
pub use spec::{Cadence, Spec, SpecError};
