//! cfgsync's serving state in the reserved `__cfgsync__` namespace of the store: registrations,
//! the bundle and the policy. Everything a server knows lives here, so restarts lose nothing
//! and several servers on one store agree.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bundle::NodeArtifactsBundle;
use super::policy::Policy;
use crate::store::{self, CFGSYNC_NAMESPACE, Key, Revision, Store, StoreExt};

/// Type of registration records (key = node identifier).
pub const REGISTRATION: &str = "registration";
/// Type of the installed bundle (key [`CURRENT`]).
pub const BUNDLE: &str = "bundle";
/// Type of the installed policy (key [`CURRENT`]).
pub const POLICY: &str = "policy";
/// The key of the one installed bundle or policy.
pub const CURRENT: &str = "current";

/// A stored registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistrationRecord {
    /// The node identifier.
    pub identifier: String,
    /// The IP the node registered with.
    pub ip: IpAddr,
    /// Its metadata (`null` when none).
    #[serde(default)]
    pub metadata: Value,
    /// First registration, Unix milliseconds.
    pub first_seen_ms: u64,
    /// Latest registration, Unix milliseconds.
    pub last_seen_ms: u64,
    /// The address the registration request came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// SHA-256 (hex) of the node's secret in strict mode; the secret itself is never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sha256: Option<String>,
    /// Where the node sorts among the members, when it is not its identifier: a replacement
    /// takes the place (and so the `index`) of the node it replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// The node this one replaced (`bootsync nodes replace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

impl RegistrationRecord {
    /// The key members are ordered by: the slot it took over, else its identifier.
    pub fn order(&self) -> &str {
        self.slot.as_deref().unwrap_or(&self.identifier)
    }
}

/// The key of a node's registration.
pub fn registration_key(identifier: &str) -> Key {
    Key::new(CFGSYNC_NAMESPACE, REGISTRATION, identifier)
}

/// Installs a bundle, replacing any previous one as a whole.
pub async fn install_bundle(
    store: &dyn Store,
    bundle: &NodeArtifactsBundle,
) -> Result<Revision, store::Error> {
    let value = serde_json::to_value(bundle)
        .map_err(|e| store::Error::backend("encoding the bundle", e))?;
    store
        .put(Key::new(CFGSYNC_NAMESPACE, BUNDLE, CURRENT), value)
        .await
}

/// Installs a registration policy, replacing any previous one.
pub async fn install_policy(store: &dyn Store, policy: &Policy) -> Result<Revision, store::Error> {
    let value = serde_json::to_value(policy)
        .map_err(|e| store::Error::backend("encoding the policy", e))?;
    store
        .put(Key::new(CFGSYNC_NAMESPACE, POLICY, CURRENT), value)
        .await
}

/// Checks a value written straight into `__cfgsync__` (through `/v1`) as the server would
/// check the same thing loaded from a file: a bundle or policy is validated whole, a
/// registration must decode and name its own key. Every problem is listed.
pub fn check_write(key: &Key, value: &serde_json::Value) -> Result<(), Vec<String>> {
    if key.namespace != CFGSYNC_NAMESPACE {
        return Ok(());
    }
    fn decode<T: serde::de::DeserializeOwned>(key: &Key, value: &Value) -> Result<T, Vec<String>> {
        serde_json::from_value(value.clone()).map_err(|err| vec![format!("{key}: {err}")])
    }
    match key.kind.as_str() {
        BUNDLE => decode::<NodeArtifactsBundle>(key, value)?.validate(),
        POLICY => decode::<Policy>(key, value)?.compile().map(|_| ()),
        REGISTRATION => {
            let record: RegistrationRecord = decode(key, value)?;
            if record.identifier == key.key {
                Ok(())
            } else {
                Err(vec![format!(
                    "{key}: the record names {:?}, not its own key",
                    record.identifier
                )])
            }
        }
        super::admission::ADMISSION => Err(vec![format!(
            "{key}: the admission ledger is kept by the server; delete it to have it counted afresh"
        )]),
        _ => Ok(()),
    }
}
