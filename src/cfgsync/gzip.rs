//! gzip for `/node` answers, built from parts so that what every node shares is compressed
//! once per epoch, not once per node or per request.
//!
//! A deflate stream may be cut into pieces, each compressed by its own compressor and ended
//! with a sync flush (byte-aligned, not final), and the pieces concatenated: a decoder sees one
//! stream. The shared files' piece is compressed once; a node's answer is its own head piece,
//! the shared piece, and a final tail piece, wrapped in one gzip header and trailer whose CRC
//! is combined from the pieces' CRCs.

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress};

/// One compressed piece: raw deflate ending on a byte boundary, with the CRC and length of
/// the bytes it holds.
#[derive(Debug, Clone)]
pub struct Piece {
    deflate: Bytes,
    crc: crc32fast::Hasher,
    len: usize,
}

/// Compression level: fast; payloads are text with long repeats and the CPU matters more.
const LEVEL: u32 = 3;

fn deflate(data: &[u8], last: bool) -> Vec<u8> {
    let mut compressor = Compress::new(Compression::new(LEVEL), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 128);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        let consumed = compressor.total_in() as usize;
        let status = compressor
            .compress_vec(&data[consumed..], &mut out, flush)
            .expect("deflate into a vector cannot fail");
        let all_in = compressor.total_in() as usize == data.len();
        // A sync flush is complete once it left room unused; a finish says so.
        let complete = if last {
            matches!(status, flate2::Status::StreamEnd)
        } else {
            all_in && out.len() < out.capacity()
        };
        if complete {
            return out;
        }
        out.reserve(out.capacity().max(1024));
    }
}

impl Piece {
    /// Compresses `data` as a middle piece.
    pub fn new(data: &[u8]) -> Self {
        let mut crc = crc32fast::Hasher::new();
        crc.update(data);
        Self {
            deflate: Bytes::from(deflate(data, false)),
            crc,
            len: data.len(),
        }
    }

    /// Bytes this piece holds in memory.
    pub fn weight(&self) -> usize {
        self.deflate.len()
    }
}

/// gzip of `head ++ middle ++ tail`, compressing only `head` and `tail` here.
pub fn around(head: &[u8], middle: &Piece, tail: &[u8]) -> Bytes {
    let first = Piece::new(head);
    let last = deflate(tail, true);
    let mut crc = first.crc.clone();
    crc.combine(&middle.crc);
    let mut tail_crc = crc32fast::Hasher::new();
    tail_crc.update(tail);
    crc.combine(&tail_crc);
    let total = first.len + middle.len + tail.len();
    let mut out =
        BytesMut::with_capacity(18 + first.deflate.len() + middle.deflate.len() + last.len());
    // Header: magic, deflate, no flags, no mtime, no extra flags, unknown OS.
    out.put_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    out.put_slice(&first.deflate);
    out.put_slice(&middle.deflate);
    out.put_slice(&last);
    out.put_u32_le(crc.finalize());
    out.put_u32_le(total as u32);
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
        let gz = around(head, &middle, tail);
        let mut whole = head.to_vec();
        whole.extend_from_slice(&shared);
        whole.extend_from_slice(tail);
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
        let gz = around(b"", &Piece::new(b""), b"");
        assert_eq!(gunzip(&gz), b"");
        let gz = around(b"abc", &Piece::new(b""), b"");
        assert_eq!(gunzip(&gz), b"abc");
    }
}
