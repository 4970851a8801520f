//! Shared pieces of the integration tests that are not process support.
#![allow(dead_code)]

pub mod store_suite;
