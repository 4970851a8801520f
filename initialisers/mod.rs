//! The core initialisers, one file each, registered through `inventory` exactly as a third
//! party registers its own.
