//! JSON strings and integers for the hand-written encoders: the WAL line
//! ([`crate::record::encode_into`]), the snapshot's key lines, and the byte counts that keep
//! frames and pages under their limits ([`str_len`]).
//!
//! Promises: [`write_str`] produces exactly the bytes `serde_json` writes for the same
//! string (the same escapes, lower-case `\u00xx` for other control characters, nothing else
//! escaped), and [`str_len`] is the length of that. Tests check both against `serde_json`
//! for every ASCII byte and for mixed strings. So a file or frame written here reads back
//! with `serde_json`, and one written by `serde_json` measures the same.
//!
//! Why not `serde_json::to_writer`: it tests a string one byte at a time, and a 100-byte
//! value was most of the cost of a WAL line and of a snapshot line. Here eight bytes are
//! tested at once (a word-at-a-time check for `"`, `\` and bytes below 0x20) and runs that
//! need no escaping are copied whole.

/// `0x01` in every byte of a word.
const ONES: u64 = u64::from_le_bytes([0x01; 8]);
/// `0x80` in every byte of a word.
const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);

/// Whether any byte of `w` is below 0x20, `"` or `\`: the bytes JSON escapes. Exact as a
/// yes/no answer (the classic "has a byte less than n" and "has a zero byte" tests, which
/// can misplace a flag but never raise one for a word without such a byte); bytes of 0x80
/// and above (UTF-8 continuation and lead bytes) never count.
#[inline]
fn needs_escape(w: u64) -> bool {
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    (below_space | has_zero(w ^ (ONES * u64::from(b'"'))) | has_zero(w ^ (ONES * u64::from(b'\\'))))
        != 0
}

/// The escape letter for each byte JSON escapes (`u` for `\u00xx`), 0 for the rest.
static ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
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

/// Appends `s` as a JSON string, quotes included, byte for byte as `serde_json` writes it.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // Bytes before `plain_from` are written; from there on, up to the next escape, they
    // need no escaping and go in one copy.
    let mut plain_from = 0;
    for_each_escape(bytes, |i| {
        if plain_from < i {
            out.extend_from_slice(&bytes[plain_from..i]);
        }
        let b = bytes[i];
        match ESCAPE[usize::from(b)] {
            b'u' => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
            letter => out.extend_from_slice(&[b'\\', letter]),
        }
        plain_from = i + 1;
    });
    out.extend_from_slice(&bytes[plain_from..]);
    out.push(b'"');
}

/// Calls `f` with the index of every byte of `bytes` that JSON escapes, in order: eight
/// bytes at a time where none is, one at a time through a word that has one.
#[inline]
fn for_each_escape(bytes: &[u8], mut f: impl FnMut(usize)) {
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in &mut words {
        if needs_escape(u64::from_le_bytes(word.try_into().expect("eight bytes"))) {
            for (j, &b) in word.iter().enumerate() {
                if ESCAPE[usize::from(b)] != 0 {
                    f(at + j);
                }
            }
        }
        at += 8;
    }
    for (j, &b) in words.remainder().iter().enumerate() {
        if ESCAPE[usize::from(b)] != 0 {
            f(at + j);
        }
    }
}

/// Bytes [`write_str`] appends for `s`: its length as a JSON string, quotes included.
pub fn str_len(s: &str) -> usize {
    let bytes = s.as_bytes();
    let mut len = 2 + bytes.len();
    for_each_escape(bytes, |i| {
        len += if ESCAPE[usize::from(bytes[i])] == b'u' {
            5
        } else {
            1
        };
    });
    len
}

/// Appends `n` in decimal, as JSON writes an integer.
pub fn write_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strings of every length up to 40 from an alphabet of plain, escaped, control and
    /// multi-byte characters, so escapes fall at every position of an eight-byte word.
    fn mixed_strings() -> Vec<String> {
        let alphabet = [
            'a', 'Z', ' ', '/', '~', '\u{7f}', '\u{1}', '\u{1f}', '\0', '"', '\\', '\n', '\r',
            '\t', '\u{8}', '\u{c}', 'ü', '€', '😀',
        ];
        let mut x: u32 = 12345;
        let mut strings = Vec::new();
        for len in 0..40 {
            for _ in 0..25 {
                strings.push(
                    (0..len)
                        .map(|_| {
                            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                            alphabet[(x >> 16) as usize % alphabet.len()]
                        })
                        .collect(),
                );
            }
        }
        // One escape in a long plain run, at each offset of the word around it.
        for at in 0..17 {
            let mut s = "x".repeat(32);
            s.insert(at, '"');
            strings.push(s);
        }
        strings
    }

    fn written(s: &str) -> Vec<u8> {
        let mut out = b"prefix".to_vec();
        write_str(&mut out, s);
        out.split_off(6)
    }

    #[test]
    fn every_ascii_byte_is_written_as_serde_json_writes_it() {
        for b in 0u8..=0x7f {
            let s = (b as char).to_string();
            let expected = serde_json::to_vec(&s).unwrap();
            assert_eq!(written(&s), expected, "byte {b:#x}");
            assert_eq!(str_len(&s), expected.len(), "byte {b:#x}");
            // The same byte inside a word-sized run, where the fast path looks first.
            let long = format!("abcdefghij{s}klmnopqrst");
            let expected = serde_json::to_vec(&long).unwrap();
            assert_eq!(written(&long), expected, "byte {b:#x} in a run");
            assert_eq!(str_len(&long), expected.len(), "byte {b:#x} in a run");
        }
    }

    #[test]
    fn mixed_strings_are_written_and_measured_as_serde_json_does() {
        for s in mixed_strings() {
            let expected = serde_json::to_vec(&s).unwrap();
            assert_eq!(written(&s), expected, "{s:?}");
            assert_eq!(str_len(&s), expected.len(), "{s:?}");
        }
    }

    #[test]
    fn the_word_test_flags_exactly_the_words_with_an_escaped_byte() {
        // Every byte value at every position of a word of otherwise plain bytes.
        for b in 0u8..=0xff {
            for at in 0..8 {
                let mut word = [b'a'; 8];
                word[at] = b;
                let expected = b < 0x20 || b == b'"' || b == b'\\';
                assert_eq!(
                    needs_escape(u64::from_le_bytes(word)),
                    expected,
                    "byte {b:#x} at {at}"
                );
            }
        }
    }

    #[test]
    fn integers_are_written_as_serde_json_writes_them() {
        for n in [0, 7, 10, 99, 12345, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            write_u64(&mut out, n);
            assert_eq!(out, serde_json::to_vec(&n).unwrap());
        }
    }
}
