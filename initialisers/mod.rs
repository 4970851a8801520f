//! The core initialisers, one file each, registered through `inventory` exactly as a third
//! party registers its own.

mod cfgsync_bundle;
mod cfgsync_policy;
mod exec;
mod namespace_init;
mod template_seed;
mod wait_for;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::store::{self, Batch, DynStore, Key, Precondition};

/// A seed file's content: `{type: {key: value}}`.
type Seed = BTreeMap<String, BTreeMap<String, Value>>;

/// Why a seed file cannot be used.
#[derive(Debug, thiserror::Error)]
enum SeedError {
    /// It does not parse or is not shaped `{type: {key: value}}`.
    #[error("seed file {path}: {problem}")]
    Shape { path: String, problem: String },
}

/// Reads a JSON or YAML seed file shaped `{type: {key: value}}`, naming what is wrong and where.
fn load_seed(path: &Path) -> Result<Seed, SeedError> {
    let shape = |problem: String| SeedError::Shape {
        path: path.display().to_string(),
        problem,
    };
    let raw: Value = crate::files::parse_file(path).map_err(|e| shape(e.problems.join("; ")))?;
    let Value::Object(types) = raw else {
        return Err(shape("must be a map of {type: {key: value}}".into()));
    };
    let mut seed = Seed::new();
    for (kind, keys) in types {
        store::validate_type(&kind).map_err(|e| shape(format!("type {kind:?}: {e}")))?;
        let Value::Object(keys) = keys else {
            return Err(shape(format!(
                "type {kind:?} is not a map of {{key: value}}"
            )));
        };
        for key in keys.keys() {
            store::validate_key(key).map_err(|e| shape(format!("{kind}/{key}: {e}")))?;
        }
        seed.insert(kind, keys.into_iter().collect());
    }
    Ok(seed)
}

/// Most writes per batch when filling a namespace (below the store's batch limit).
const CHUNK: usize = 500;

/// Writes `seed` into `namespace`: every key when `all`, else only keys absent now (with an
/// `Absent` precondition so a concurrent writer is never clobbered). Returns keys written.
async fn fill(
    store: &DynStore,
    namespace: &str,
    seed: &Seed,
    all: bool,
) -> Result<usize, store::Error> {
    let existing = if all {
        Default::default()
    } else {
        store.namespace(namespace).await?.types
    };
    let mut ops: Vec<(Key, Value, bool)> = Vec::new();
    for (kind, keys) in seed {
        for (key, value) in keys {
            let present = existing.get(kind).is_some_and(|k| k.contains_key(key));
            if all || !present {
                ops.push((
                    Key::new(namespace, kind.clone(), key.clone()),
                    value.clone(),
                    !all,
                ));
            }
        }
    }
    let written = ops.len();
    for chunk in ops.chunks(CHUNK / 2) {
        let mut batch = Batch::new();
        for (key, value, guard) in chunk {
            if *guard {
                batch = batch.check(key.clone(), Precondition::Absent);
            }
            batch = batch.put(key.clone(), value.clone());
        }
        store.apply(batch).await?;
    }
    Ok(written)
}

#[cfg(test)]
pub(crate) mod testing {
    //! A context over a memory store, and each class's registered constructor, for the
    //! initialisers' unit tests.
    use std::sync::Arc;

    use serde_json::Value;
    use tempfile::TempDir;

    use crate::bootstrap::{FromParams, InitContext, Initialiser, ParamsError, Registration};
    use crate::store::{DynStore, Limits, memory::MemoryStore};

    /// A spec directory holding `files`, a context whose spec lives there (a first run for
    /// `v1`), and the context's memory store.
    pub(crate) fn sandbox(files: &[(&str, &str)]) -> (TempDir, InitContext, DynStore) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let store: DynStore = Arc::new(MemoryStore::new(Limits::default()));
        let ctx = InitContext::for_test(store.clone(), dir.path());
        (dir, ctx, store)
    }

    /// Builds `T` from params as the spec reader does.
    pub(crate) fn construct<T: FromParams>(
        params: Value,
    ) -> Result<Box<dyn Initialiser>, ParamsError> {
        (Registration::of::<T>().construct)(params)
    }
}
