//! The adapter-facing library API: registration snapshots in, per-node artifacts out.

use std::sync::{Arc, Mutex};

use super::{ArtifactFile, NodeRegistration};

/// The error a materializer returns.
pub type DynCfgsyncError = Box<dyn std::error::Error + Send + Sync>;

/// Every registered node, sorted by identifier, taken at one store revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegistrationSnapshot {
    nodes: Vec<NodeRegistration>,
    version: u64,
}

impl RegistrationSnapshot {
    /// A snapshot of `nodes` (sorted here) at store revision `version`.
    pub fn new(mut nodes: Vec<NodeRegistration>, version: u64) -> Self {
        nodes.sort_by(|a, b| a.identifier.cmp(&b.identifier));
        Self { nodes, version }
    }

    /// The nodes, sorted by identifier.
    pub fn iter(&self) -> std::slice::Iter<'_, NodeRegistration> {
        self.nodes.iter()
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node registered.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The store revision the snapshot was taken at; equal versions mean equal snapshots.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The nodes as a slice.
    pub fn nodes(&self) -> &[NodeRegistration] {
        &self.nodes
    }
}

/// One node's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeArtifacts {
    /// The node.
    pub identifier: String,
    /// Its own files (shared files are added by the server).
    pub files: Vec<ArtifactFile>,
}

/// Every node's files plus files shared by all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeArtifactsCatalog {
    /// Per-node files.
    pub nodes: Vec<NodeArtifacts>,
    /// Appended to every node's payload.
    pub shared_files: Vec<ArtifactFile>,
}

impl NodeArtifactsCatalog {
    /// A catalog without shared files.
    pub fn new(nodes: Vec<NodeArtifacts>) -> Self {
        Self {
            nodes,
            shared_files: Vec::new(),
        }
    }

    /// Adds files appended to every payload.
    pub fn with_shared_files(mut self, shared_files: Vec<ArtifactFile>) -> Self {
        self.shared_files = shared_files;
        self
    }
}

/// Turns the whole registered set into artifacts, or says it is not ready yet (`Ok(None)`).
pub trait RegistrationSnapshotMaterializer: Send + Sync + 'static {
    /// Called once per change of the registered set.
    fn materialize_snapshot(
        &self,
        registrations: &RegistrationSnapshot,
    ) -> Result<Option<NodeArtifactsCatalog>, DynCfgsyncError>;
}

/// Builds one node's artifacts at a time, seeing the whole snapshot.
pub trait NodeArtifactsMaterializer: Send + Sync + 'static {
    /// `Ok(None)` means this node is not ready yet.
    fn materialize_node(
        &self,
        node: &NodeRegistration,
        registrations: &RegistrationSnapshot,
    ) -> Result<Option<NodeArtifacts>, DynCfgsyncError>;
}

/// Adapts a [`NodeArtifactsMaterializer`] to the snapshot interface: ready once every node is.
#[derive(Debug)]
pub struct PerNode<M>(pub M);

impl<M: NodeArtifactsMaterializer> RegistrationSnapshotMaterializer for PerNode<M> {
    fn materialize_snapshot(
        &self,
        registrations: &RegistrationSnapshot,
    ) -> Result<Option<NodeArtifactsCatalog>, DynCfgsyncError> {
        let mut nodes = Vec::with_capacity(registrations.len());
        for node in registrations.iter() {
            match self.0.materialize_node(node, registrations)? {
                Some(artifacts) => nodes.push(artifacts),
                None => return Ok(None),
            }
        }
        Ok(Some(NodeArtifactsCatalog::new(nodes)))
    }
}

type CachedResult = Option<Arc<NodeArtifactsCatalog>>;

/// Remembers the last result by snapshot version, so repeated calls with an unchanged snapshot
/// cost a comparison — not a re-serialisation of the snapshot as a cache key.
pub struct CachedSnapshotMaterializer<M> {
    inner: M,
    last: Mutex<Option<(u64, CachedResult)>>,
}

impl<M> std::fmt::Debug for CachedSnapshotMaterializer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CachedSnapshotMaterializer")
    }
}

impl<M: RegistrationSnapshotMaterializer> CachedSnapshotMaterializer<M> {
    /// Wraps `inner`.
    pub fn new(inner: M) -> Self {
        Self {
            inner,
            last: Mutex::new(None),
        }
    }

    /// The catalog for `registrations`, computed only when its version changed.
    pub fn catalog(
        &self,
        registrations: &RegistrationSnapshot,
    ) -> Result<CachedResult, DynCfgsyncError> {
        let mut last = self.last.lock().expect("materializer cache lock poisoned");
        if let Some((version, result)) = last.as_ref()
            && *version == registrations.version()
        {
            return Ok(result.clone());
        }
        let result = self
            .inner
            .materialize_snapshot(registrations)?
            .map(Arc::new);
        *last = Some((registrations.version(), result.clone()));
        Ok(result)
    }
}

impl<M: RegistrationSnapshotMaterializer> RegistrationSnapshotMaterializer
    for CachedSnapshotMaterializer<M>
{
    fn materialize_snapshot(
        &self,
        registrations: &RegistrationSnapshot,
    ) -> Result<Option<NodeArtifactsCatalog>, DynCfgsyncError> {
        Ok(self.catalog(registrations)?.map(|c| (*c).clone()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Counting(AtomicUsize);
    impl RegistrationSnapshotMaterializer for Counting {
        fn materialize_snapshot(
            &self,
            registrations: &RegistrationSnapshot,
        ) -> Result<Option<NodeArtifactsCatalog>, DynCfgsyncError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok((registrations.len() >= 2).then(NodeArtifactsCatalog::default))
        }
    }

    fn node(id: &str) -> NodeRegistration {
        NodeRegistration::new(id, "127.0.0.1".parse().unwrap())
    }

    #[test]
    fn snapshots_are_sorted_by_identifier() {
        let snap = RegistrationSnapshot::new(vec![node("b"), node("a")], 1);
        assert_eq!(
            snap.iter()
                .map(|n| n.identifier.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn the_cache_materialises_once_per_snapshot_version() {
        let cached = CachedSnapshotMaterializer::new(Counting(AtomicUsize::new(0)));
        let snap = RegistrationSnapshot::new(vec![node("a"), node("b")], 7);
        for _ in 0..5 {
            assert!(cached.catalog(&snap).unwrap().is_some());
        }
        assert_eq!(cached.inner.0.load(Ordering::SeqCst), 1);
        let next = RegistrationSnapshot::new(vec![node("a")], 8);
        assert!(cached.catalog(&next).unwrap().is_none());
        assert_eq!(cached.inner.0.load(Ordering::SeqCst), 2);
    }
}
