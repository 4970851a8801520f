//! gzip for `/node` answers, built from parts so that what many nodes share is compressed
//! once per epoch, not once per node or per request.
//!
//! A deflate stream may be cut into pieces, each compressed by its own compressor and ended
//! with a sync flush (byte-aligned, not final), and the pieces concatenated: a decoder sees one
//! stream. The shared files, and the blocks of texts shared by many nodes' files
//! (`cfgsync::text`), are compressed once; a node's answer compresses only its own bytes
//! between them, and ends with a final empty block, in one gzip header and trailer.

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress};

/// One compressed piece: raw deflate ending on a byte boundary.
#[derive(Debug, Clone)]
pub struct Piece {
    deflate: Bytes,
    len: usize,
}

/// Compression level of what is compressed once for many answers: worth a better ratio.
const SHARED_LEVEL: u32 = 6;
/// Compression level of a node's own bytes, compressed per answer: the fastest.
const NODE_LEVEL: u32 = 1;
/// Own bytes shorter than this are stored, not compressed: a compressor costs more to set up
/// than such a run saves on the wire.
const STORE_BELOW: usize = 512;
/// An empty final block (fixed Huffman codes, end of block): ends the stream.
const END: [u8; 2] = [0x03, 0x00];

/// Appends `data` compressed at `level`, ending with a sync flush: byte-aligned, not final.
fn deflate(out: &mut Vec<u8>, data: &[u8], level: u32) {
    let mut compressor = Compress::new(Compression::new(level), false);
    out.reserve(data.len() / 2 + 128);
    loop {
        let consumed = compressor.total_in() as usize;
        compressor
            .compress_vec(&data[consumed..], out, FlushCompress::Sync)
            .expect("deflate into a vector cannot fail");
        // A sync flush is complete once it left room unused.
        if compressor.total_in() as usize == data.len() && out.len() < out.capacity() {
            return;
        }
        out.reserve(out.capacity().max(1024));
    }
}

/// Appends `data` as stored (uncompressed) deflate blocks.
fn store(out: &mut Vec<u8>, data: &[u8]) {
    for chunk in data.chunks(u16::MAX as usize) {
        let len = chunk.len() as u16;
        // Not final, stored, padded to the byte; then the length and its complement.
        out.push(0);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
}

impl Piece {
    /// Compresses `data` as a middle piece.
    pub fn new(data: &[u8]) -> Self {
        let mut out = Vec::new();
        deflate(&mut out, data, SHARED_LEVEL);
        Self {
            deflate: Bytes::from(out),
            len: data.len(),
        }
    }

    /// Bytes this piece holds in memory.
    pub fn weight(&self) -> usize {
        self.deflate.len()
    }

    /// Bytes it decompresses to.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A part of a body for [`join`].
#[derive(Debug)]
pub enum Part<'a> {
    /// Bytes compressed here.
    Plain(&'a [u8]),
    /// Bytes compressed before.
    Piece(&'a Piece),
}

/// gzip of `whole`, given as `parts` in order (which together hold exactly `whole`),
/// compressing only the plain ones here.
pub fn join(whole: &[u8], parts: &[Part<'_>]) -> Bytes {
    let mut deflated = Vec::new();
    let mut held = 0;
    for part in parts {
        match part {
            Part::Plain([]) => {}
            Part::Plain(data) if data.len() < STORE_BELOW => {
                store(&mut deflated, data);
                held += data.len();
            }
            Part::Plain(data) => {
                deflate(&mut deflated, data, NODE_LEVEL);
                held += data.len();
            }
            Part::Piece(piece) => {
                deflated.extend_from_slice(&piece.deflate);
                held += piece.len;
            }
        }
    }
    debug_assert_eq!(held, whole.len(), "the parts hold the whole");
    deflated.extend_from_slice(&END);
    let mut out = BytesMut::with_capacity(18 + deflated.len());
    // Header: magic, deflate, no flags, no mtime, no extra flags, unknown OS.
    out.put_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    out.put_slice(&deflated);
    out.put_u32_le(crc32fast::hash(whole));
    out.put_u32_le(whole.len() as u32);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .expect("valid gzip");
        out
    }

    #[test]
    fn pieces_joined_decode_to_the_whole() {
        let shared: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("10.0.{}.{}\n", i / 256, i % 256).into_bytes())
            .collect();
        let middle = Piece::new(&shared);
        let head = b"{\"schema_version\":1,\"files\":[{\"path\":\"a\",\"content\":\"x\"},";
        let tail = b"],\"epoch\":7}";
        let mut whole = head.to_vec();
        whole.extend_from_slice(&shared);
        whole.extend_from_slice(tail);
        let gz = join(
            &whole,
            &[Part::Plain(head), Part::Piece(&middle), Part::Plain(tail)],
        );
        assert_eq!(gunzip(&gz), whole);
        assert!(
            gz.len() < whole.len() / 3,
            "{} of {}",
            gz.len(),
            whole.len()
        );
    }

    #[test]
    fn empty_pieces_are_fine() {
        let gz = join(b"", &[Part::Plain(b""), Part::Piece(&Piece::new(b""))]);
        assert_eq!(gunzip(&gz), b"");
        let gz = join(
            b"abc",
            &[Part::Plain(b"abc"), Part::Piece(&Piece::new(b""))],
        );
        assert_eq!(gunzip(&gz), b"abc");
        assert_eq!(gunzip(&join(b"", &[])), b"");
        // Own runs long and short, compressed and stored, around a piece.
        let long: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let middle = Piece::new(b"middle");
        let mut whole = long.clone();
        whole.extend_from_slice(b"middle");
        whole.extend_from_slice(b"x");
        whole.extend_from_slice(&long);
        let parts = [
            Part::Plain(&long),
            Part::Piece(&middle),
            Part::Plain(b"x"),
            Part::Plain(&long[..]),
        ];
        assert_eq!(gunzip(&join(&whole, &parts)), whole);
    }
}
