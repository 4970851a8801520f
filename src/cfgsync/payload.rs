//! Answer bodies: a node's files and the shared ones serialised into the one buffer the
//! answer is served from, with the shared part serialised and compressed once for everyone.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::ArtifactFile;
use super::gzip::{self, Part, Piece};
use super::materialize::NodeArtifactsCatalog;
use super::render::Weigh;
use super::template::Laid;
use super::text::{Placed, TextPart, escape_with_spans};
use crate::store::Revision;

/// Files every node of an epoch (or of a bundle) gets: serialised once, compressed once.
#[derive(Debug, Default)]
pub(super) struct Shared {
    /// The files as JSON objects joined by commas.
    pub(super) json: Vec<u8>,
    gzip: OnceLock<Piece>,
}

impl Shared {
    pub(super) fn new(files: &[ArtifactFile]) -> Arc<Self> {
        Arc::new(Self {
            json: join_files(files),
            gzip: OnceLock::new(),
        })
    }

    fn piece(&self) -> &Piece {
        self.gzip.get_or_init(|| Piece::new(&self.json))
    }
}

pub(super) fn join_files(files: &[ArtifactFile]) -> Vec<u8> {
    let mut out = Vec::new();
    write_files(&mut out, files);
    out
}

/// Appends `text` to `out` as a JSON string, quotes included.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(out, text).expect("writing a string to memory cannot fail");
}

/// `files` as JSON objects joined by commas, as serde would write each `ArtifactFile`.
pub(super) fn write_files(out: &mut Vec<u8>, files: &[ArtifactFile]) {
    let size: usize = files
        .iter()
        .map(|f| f.path.len() + f.content.len() + 24)
        .sum();
    out.reserve(size);
    for (i, file) in files.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"path\":");
        push_json_str(out, &file.path);
        out.extend_from_slice(b",\"content\":");
        push_json_str(out, &file.content);
        out.push(b'}');
    }
}

/// As [`write_files`], copying the parts of each file that are slices of shared texts from
/// their escaped form; returns where those went.
pub(super) fn write_laid_files(out: &mut Vec<u8>, files: &[Laid]) -> Vec<Placed> {
    let size: usize = files
        .iter()
        .map(|f| f.file.path.len() + f.file.content.len() + 24)
        .sum();
    out.reserve(size);
    let mut placed = Vec::new();
    for (i, Laid { file, spans }) in files.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"path\":");
        push_json_str(out, &file.path);
        out.extend_from_slice(b",\"content\":\"");
        placed.extend(escape_with_spans(out, &file.content, spans));
        out.extend_from_slice(b"\"}");
    }
    placed
}

/// What a body says it is: its epoch, and the version it was rendered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// The epoch (see [`Body::epoch`]).
    pub epoch: Revision,
    /// The version, when there is one (a library materializer has none).
    pub version: Option<Revision>,
}

/// One node's answer body, and where the shared files sit in it.
#[derive(Debug)]
pub struct Body {
    /// `{"schema_version":1,"files":[...],"epoch":N}`.
    pub bytes: Bytes,
    /// The epoch the body carries.
    pub epoch: Revision,
    /// The version (policy or bundle revision) it was rendered from, when there is one.
    pub version: Option<Revision>,
    /// Whether it came from the bundle (whose epoch is the bundle's revision).
    pub(super) from_bundle: bool,
    /// Length of the part before the shared files.
    head: usize,
    shared: Arc<Shared>,
    /// Where slices of shared texts sit in the part before the shared files, in order.
    placed: Vec<Placed>,
}

impl Body {
    pub(super) fn new(node_files: &[u8], shared: Arc<Shared>, stamp: Stamp) -> Self {
        Self::assemble(
            |out| {
                out.extend_from_slice(node_files);
                Vec::new()
            },
            shared,
            stamp,
        )
    }

    /// The body around the node's files, written by `node_files` straight into the one buffer
    /// the answer is served from (a peer list is not copied once more to get there), which
    /// says where slices of shared texts went.
    pub(super) fn assemble(
        node_files: impl FnOnce(&mut Vec<u8>) -> Vec<Placed>,
        shared: Arc<Shared>,
        stamp: Stamp,
    ) -> Self {
        let Stamp { epoch, version } = stamp;
        let mut out = Vec::with_capacity(shared.json.len() + 64);
        out.extend_from_slice(b"{\"schema_version\":1,\"files\":[");
        let start = out.len();
        let placed = node_files(&mut out);
        if out.len() > start && !shared.json.is_empty() {
            out.push(b',');
        }
        let head = out.len();
        out.extend_from_slice(&shared.json);
        out.extend_from_slice(b"],\"epoch\":");
        write!(out, "{epoch}").expect("writing to memory cannot fail");
        if let Some(version) = version {
            write!(out, ",\"version\":{version}").expect("writing to memory cannot fail");
        }
        out.push(b'}');
        Self {
            bytes: Bytes::from(out),
            epoch,
            version,
            from_bundle: false,
            head,
            shared,
            placed,
        }
    }

    /// The body gzip-compressed: the shared files and the shared texts' whole blocks were
    /// compressed once for all nodes; only the rest is compressed here.
    pub fn gzip(&self) -> Bytes {
        let whole = &self.bytes[..];
        let mut parts = Vec::new();
        // The bytes from `plain` to `at` are compressed here, in one run.
        let mut plain = 0;
        for placed in &self.placed {
            let mut at = placed.at;
            for part in placed.text.parts(placed.escaped.clone()) {
                match part {
                    TextPart::Plain(range) => at += range.len(),
                    TextPart::Block(piece) => {
                        parts.push(Part::Plain(&whole[plain..at]));
                        parts.push(Part::Piece(piece));
                        at += piece.len();
                        plain = at;
                    }
                }
            }
        }
        let tail = self.head + self.shared.json.len();
        parts.push(Part::Plain(&whole[plain..self.head]));
        parts.push(Part::Piece(self.shared.piece()));
        parts.push(Part::Plain(&whole[tail..]));
        gzip::join(whole, &parts)
    }
}

/// A payload prepared ahead of time (bundles, library catalogs): the node's files serialised.
#[derive(Debug)]
pub(super) struct Prepared {
    files: Vec<u8>,
    shared: Arc<Shared>,
}

impl Prepared {
    /// The answer body stamped with `stamp`.
    pub(super) fn body(&self, stamp: Stamp, from_bundle: bool) -> Arc<Body> {
        let mut body = Body::new(&self.files, self.shared.clone(), stamp);
        body.from_bundle = from_bundle;
        Arc::new(body)
    }
}

pub(super) fn prepare_catalog(catalog: &NodeArtifactsCatalog) -> HashMap<String, Prepared> {
    let shared = Shared::new(&catalog.shared_files);
    catalog
        .nodes
        .iter()
        .map(|node| {
            let prepared = Prepared {
                files: join_files(&node.files),
                shared: shared.clone(),
            };
            (node.identifier.clone(), prepared)
        })
        .collect()
}

impl Weigh for Arc<Body> {
    fn weight(&self) -> usize {
        self.bytes.len()
    }
}
