//! Text made once per epoch and shared by many nodes' files (a spliced loop's render, the
//! members' IP list): escaped for JSON once, and compressed once, in blocks, for gzip answers.
//!
//! A node's file takes a slice of such a text. Its answer body copies the slice's escaped
//! bytes instead of escaping them again, and its gzip answer reuses every compressed block the
//! slice covers whole, compressing only the partial blocks at the slice's two ends.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::gzip::Piece;

/// Raw bytes per compressed block: small enough that the partial blocks a node compresses
/// itself cost little, large enough that the blocks still compress well on their own.
const BLOCK: usize = 8 << 10;

/// A text shared by an epoch's nodes.
#[derive(Debug)]
pub struct EpochText {
    raw: String,
    /// `raw` escaped as the inside of a JSON string.
    escaped: Vec<u8>,
    /// Where each block starts, in `raw` and in `escaped`; the first is `(0, 0)`.
    starts: Vec<(usize, usize)>,
    /// Each block of `escaped` compressed, made when a gzip answer first needs them.
    blocks: OnceLock<Vec<Piece>>,
}

impl EpochText {
    /// `raw`, escaped once.
    pub fn new(raw: String) -> Arc<Self> {
        let mut escaped = Vec::with_capacity(raw.len() + raw.len() / 8);
        let mut starts = vec![(0, 0)];
        let mut at = 0;
        while at < raw.len() {
            let mut end = (at + BLOCK).min(raw.len());
            while !raw.is_char_boundary(end) {
                end += 1;
            }
            escape_into(&mut escaped, &raw[at..end]);
            at = end;
            if at < raw.len() {
                starts.push((at, escaped.len()));
            }
        }
        Arc::new(Self {
            raw,
            escaped,
            starts,
            blocks: OnceLock::new(),
        })
    }

    /// The text as rendered.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// Where byte `at` of the raw text lands in the escaped text.
    fn escaped_at(&self, at: usize) -> usize {
        let block = self.starts.partition_point(|&(raw, _)| raw <= at) - 1;
        let (raw, escaped) = self.starts[block];
        escaped + escaped_len(&self.raw.as_bytes()[raw..at])
    }

    /// The escaped bytes of raw `range`.
    pub fn escaped(&self, range: Range<usize>) -> Range<usize> {
        self.escaped_at(range.start)..self.escaped_at(range.end)
    }

    /// The escaped text.
    pub fn escaped_bytes(&self) -> &[u8] {
        &self.escaped
    }

    /// Escaped `range` as parts for a gzip stream: the compressed blocks it covers whole, and
    /// the ranges (of the escaped text) to compress around them.
    pub fn parts(&self, range: Range<usize>) -> Vec<TextPart<'_>> {
        let blocks = self.blocks.get_or_init(|| {
            self.block_ranges()
                .map(|r| Piece::new(&self.escaped[r]))
                .collect()
        });
        // Only the blocks at the slice's two ends can be partial.
        let mut parts = Vec::new();
        let mut plain = range.start;
        for (block, r) in self.block_ranges().enumerate() {
            if range.start <= r.start && r.end <= range.end && !r.is_empty() {
                if plain < r.start {
                    parts.push(TextPart::Plain(plain..r.start));
                }
                parts.push(TextPart::Block(&blocks[block]));
                plain = r.end;
            }
        }
        if plain < range.end {
            parts.push(TextPart::Plain(plain..range.end));
        }
        parts
    }

    fn block_ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let ends = self
            .starts
            .iter()
            .skip(1)
            .map(|&(_, e)| e)
            .chain([self.escaped.len()]);
        self.starts
            .iter()
            .map(|&(_, s)| s)
            .zip(ends)
            .map(|(s, e)| s..e)
    }
}

/// A piece of an escaped slice of an [`EpochText`] for a gzip stream.
#[derive(Debug)]
pub enum TextPart<'a> {
    /// Escaped bytes to compress with the node's own.
    Plain(Range<usize>),
    /// A block compressed once for the epoch.
    Block(&'a Piece),
}

/// Appends `text` escaped as the inside of a JSON string, exactly as `serde_json` writes it.
pub fn escape_into(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let mut plain = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..0x20 => {
                out.extend_from_slice(&bytes[plain..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]);
                plain = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain..i]);
        out.extend_from_slice(escape);
        plain = i + 1;
    }
    out.extend_from_slice(&bytes[plain..]);
}

/// How long `bytes` is once escaped by [`escape_into`].
fn escaped_len(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .map(|&b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum()
}

/// What a render wrote, for the writer and the objects that write shared text: how much is
/// written so far, where loop iterations started (a spliced loop's epoch render), and which
/// parts of the output are slices of shared texts (a node's render for its answer body).
#[derive(Debug, Default)]
pub struct Ledger {
    written: AtomicUsize,
    marks: Mutex<Vec<(usize, u64)>>,
    spans: Mutex<Vec<Span>>,
}

/// Slices shorter than this are escaped with the rest of the file: not worth a record, and a
/// template that prints a short list over and over cannot pile records up (at most one per
/// this many bytes written).
const MIN_SPAN: usize = 32;

/// A part of a rendered file that is a slice of a shared text.
#[derive(Debug, Clone)]
pub struct Span {
    /// Where the slice starts in the file's content.
    pub at: usize,
    /// The text it is a slice of.
    pub text: Arc<EpochText>,
    /// The slice, in the text's raw bytes.
    pub range: Range<usize>,
}

impl Ledger {
    /// Notes how many bytes the render has written.
    pub fn wrote(&self, len: usize) {
        self.written.store(len, Ordering::Relaxed);
    }

    /// Marks that an iteration starts here, `fuel` instructions into the render.
    pub fn mark(&self, fuel: u64) {
        let at = self.written.load(Ordering::Relaxed);
        lock(&self.marks).push((at, fuel));
    }

    /// Notes that what is written next is `range` of `text`.
    pub fn span(&self, text: &Arc<EpochText>, range: Range<usize>) {
        if range.len() < MIN_SPAN {
            return;
        }
        let at = self.written.load(Ordering::Relaxed);
        let mut spans = lock(&self.spans);
        // A slice made into a value (`peer_ips ~ ''`) is never written: its record goes.
        if spans
            .last()
            .is_some_and(|last| at < last.at + last.range.len())
        {
            spans.pop();
        }
        spans.push(Span {
            at,
            text: text.clone(),
            range,
        });
    }

    /// The marks recorded: where each was in the output, and the instructions taken by then.
    pub fn take_marks(&self) -> Vec<(usize, u64)> {
        std::mem::take(&mut *lock(&self.marks))
    }

    /// The spans recorded.
    pub fn take_spans(&self) -> Vec<Span> {
        std::mem::take(&mut *lock(&self.spans))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `content` escaped into `out` as the inside of a JSON string, with each span's escaped bytes
/// copied from its shared text; returns where in `out` each span's bytes went.
pub fn escape_with_spans(out: &mut Vec<u8>, content: &str, spans: &[Span]) -> Vec<Placed> {
    let mut placed = Vec::with_capacity(spans.len());
    let mut at = 0;
    for span in spans {
        let end = span.at + span.range.len();
        // A span is only trusted where the content holds exactly its bytes.
        if span.at < at
            || content.as_bytes().get(span.at..end)
                != Some(&span.text.raw.as_bytes()[span.range.clone()])
        {
            continue;
        }
        escape_into(out, &content[at..span.at]);
        let escaped = span.text.escaped(span.range.clone());
        placed.push(Placed {
            at: out.len(),
            text: span.text.clone(),
            escaped: escaped.clone(),
        });
        out.extend_from_slice(&span.text.escaped[escaped]);
        at = end;
    }
    escape_into(out, &content[at..]);
    placed
}

/// Where a slice of a shared text's escaped bytes sits in an answer body.
#[derive(Debug, Clone)]
pub struct Placed {
    /// Its offset in the body.
    pub at: usize,
    /// The text.
    pub text: Arc<EpochText>,
    /// The slice of the text's escaped bytes.
    pub escaped: Range<usize>,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn serde_escaped(text: &str) -> Vec<u8> {
        let quoted = serde_json::to_vec(text).unwrap();
        quoted[1..quoted.len() - 1].to_vec()
    }

    proptest! {
        // Each case escapes and compresses tens of kilobytes: fewer cases than the default.
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn escaping_is_serde_json_s(text in any::<String>(), controls in proptest::collection::vec(0u8..0x20, 0..8)) {
            let text: String = text.chars().chain(controls.iter().map(|&c| char::from(c))).chain("\"\\/\u{7f}".chars()).collect();
            let mut out = Vec::new();
            escape_into(&mut out, &text);
            prop_assert_eq!(&out, &serde_escaped(&text));
            prop_assert_eq!(escaped_len(text.as_bytes()), out.len());
        }

        #[test]
        fn slices_escape_and_split_into_blocks_exactly(
            lines in proptest::collection::vec("[a-z\"\\\\\n\u{e9}]{0,40}", 1..2000),
            cut in any::<(prop::sample::Index, prop::sample::Index)>(),
        ) {
            let raw = lines.concat();
            let text = EpochText::new(raw.clone());
            prop_assert_eq!(text.escaped_bytes(), &serde_escaped(&raw)[..]);
            let bounds: Vec<usize> = (0..=raw.len()).filter(|&i| raw.is_char_boundary(i)).collect();
            let (a, b) = (cut.0.get(&bounds), cut.1.get(&bounds));
            let range = *a.min(b)..*a.max(b);
            let escaped = text.escaped(range.clone());
            prop_assert_eq!(&text.escaped_bytes()[escaped.clone()], &serde_escaped(&raw[range])[..]);
            // The parts cover the slice in order, blocks whole.
            let mut covered = escaped.start;
            for part in text.parts(escaped.clone()) {
                match part {
                    TextPart::Plain(r) => { prop_assert_eq!(r.start, covered); covered = r.end; }
                    TextPart::Block(piece) => covered += piece.len(),
                }
            }
            prop_assert_eq!(covered, escaped.end);
        }
    }
}
