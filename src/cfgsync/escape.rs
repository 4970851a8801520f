//! JSON string writing for payload bodies, eight bytes at a time.
//!
//! A peer-list file is mostly bytes that need no escaping, and escaping it byte by byte was
//! the largest cost of rendering one. This writer looks at a word at a time for the three
//! things JSON escapes (a quote, a backslash, a control character) and copies clean runs
//! whole. Its output is byte for byte what `serde_json` writes for the same string.

const LOW: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// Whether any byte of `word` is a quote, a backslash or below 0x20.
fn needs_escape(word: u64) -> bool {
    let below_space = word.wrapping_sub(LOW * 0x20) & !word;
    let quote = word ^ (LOW * u64::from(b'"'));
    let backslash = word ^ (LOW * u64::from(b'\\'));
    let is_quote = quote.wrapping_sub(LOW) & !quote;
    let is_backslash = backslash.wrapping_sub(LOW) & !backslash;
    (below_space | is_quote | is_backslash) & HIGH != 0
}

/// What each byte becomes: 0 for itself, `u` for `\u00XX`, or the letter after the backslash.
const ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = b'u';
        byte += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Appends `s` to `out` as a JSON string, quotes included.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + bytes.len() / 8 + 2);
    out.push(b'"');
    let mut clean = 0; // start of the run not yet copied
    let mut i = 0;
    while i < bytes.len() {
        // Skip whole words that need nothing...
        while let Some(chunk) = bytes.get(i..i + 8) {
            let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
            if needs_escape(word) {
                break;
            }
            i += 8;
        }
        // ...then look at the next bytes one by one: a stretch long enough that text dense
        // with escapes (a list of quoted addresses) does not pay for a word test every time.
        let end = (i + 32).min(bytes.len());
        for (at, &byte) in bytes[..end].iter().enumerate().skip(i) {
            let escape = ESCAPE[usize::from(byte)];
            if escape == 0 {
                continue;
            }
            out.extend_from_slice(&bytes[clean..at]);
            if escape == b'u' {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            } else {
                out.push(b'\\');
                out.push(escape);
            }
            clean = at + 1;
        }
        i = end;
    }
    out.extend_from_slice(&bytes[clean..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(s: &str) -> String {
        let mut out = Vec::new();
        push_json_str(&mut out, s);
        String::from_utf8(out).expect("the output is UTF-8")
    }

    #[test]
    fn writes_what_serde_json_writes() {
        let mut cases: Vec<String> = vec![
            String::new(),
            "plain".into(),
            "exactly8".into(),
            "\"quoted\" and \\back\\slashed\\".into(),
            "line\nbreak\r\ttab\u{8}\u{c}".into(),
            "héllo wörld — ☃ 𝄞 and more text".into(),
            "\u{7f} del, / slash, ' apostrophe".into(),
        ];
        // Every control character, at every offset within a word.
        for c in 0u8..0x20 {
            for pad in 0..9 {
                cases.push(format!("{}{}tail", "x".repeat(pad), char::from(c)));
            }
        }
        for special in ['"', '\\', 'é', '\u{1f}'] {
            for pad in 0..17 {
                cases.push(format!(
                    "{}{special}{}",
                    "a".repeat(pad),
                    "b".repeat(17 - pad)
                ));
            }
        }
        for case in &cases {
            assert_eq!(
                ours(case),
                serde_json::to_string(case).unwrap(),
                "for {case:?}"
            );
        }
    }

    #[test]
    fn bytes_just_above_the_escape_range_pass_unchanged() {
        // The word check must not flag 0x20..0x7f neighbours of the escaped bytes.
        let s: String = (0x20u8..0x7f).map(char::from).collect();
        assert_eq!(ours(&s), serde_json::to_string(&s).unwrap());
    }
}
