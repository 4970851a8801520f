//! The bootstrap reconciler: runs an ordered list of initialisers, each again only when its
//! operator-chosen flag changes, with state in the reserved `__system__` namespace.

pub mod initialiser;
pub mod registry;

pub use initialiser::{InitContext, InitError, Initialiser};
pub use registry::{ParamsError, Registration};
