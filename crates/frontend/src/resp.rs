//! RESP2 framing: an incremental, bounded parser for client commands and the reply
//! encoders. Pure: no IO, no async; the door ([`crate::resp_door`]) feeds it bytes.
//!
//! # Format
//!
//! - A command is an array of bulk strings: `*<n>\r\n` then `n` times `$<len>\r\n<bytes>\r\n`
//!   (what redis-cli and redis-benchmark send).
//! - Or an **inline** command: one text line (`\n` or `\r\n` ended) split on whitespace,
//!   with `"double quoted"` tokens (backslash escapes `\"` and `\\`) for values with spaces:
//!   `echo "PUT apple red" | nc 127.0.0.1 6380`.
//!
//! # Limits
//!
//! [`Limits`] bounds the array length, each bulk string and every header or inline line.
//! Breaking one is a [`ProtocolError`]: the door answers it with `-ERR ...` and closes that
//! connection, because the rest of the stream cannot be re-synchronised (as redis does).
//! [`parse`] returns `Ok(None)` until a whole command is buffered, and never reads past
//! what it consumed, so it can be called again on the remaining bytes.

use std::fmt;

/// Bounds on what a client may send.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most arguments in one command.
    pub max_args: usize,
    /// Largest bulk string (a value plus nothing: keys are smaller).
    pub max_bulk: usize,
    /// Longest header or inline line.
    pub max_line: usize,
}

/// A stream that is not RESP (or breaks a limit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// Malformed input.
    Invalid(String),
    /// A bulk string, array or line beyond its limit.
    TooLarge(String),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Invalid(why) => write!(f, "Protocol error: {why}"),
            ProtocolError::TooLarge(why) => write!(f, "Protocol error: {why} too large"),
        }
    }
}

/// A parsed command: its arguments (possibly none, for an empty inline line) and the
/// number of bytes it used.
pub type Parsed = (Vec<Vec<u8>>, usize);

/// Parses one command from the front of `buf`. `Ok(None)`: need more bytes.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<Parsed>, ProtocolError> {
    match buf.first() {
        None => Ok(None),
        Some(b'*') => parse_array(buf, limits),
        Some(_) => parse_inline(buf, limits),
    }
}

/// The line starting at `at` (without its `\r\n`) and the offset after it.
fn line<'a>(
    buf: &'a [u8],
    at: usize,
    limits: &Limits,
) -> Result<Option<(&'a [u8], usize)>, ProtocolError> {
    let rest = &buf[at..];
    match rest.iter().position(|&b| b == b'\n') {
        Some(i) if i > limits.max_line => Err(ProtocolError::TooLarge("line".into())),
        Some(i) => {
            let l = &rest[..i];
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            Ok(Some((l, at + i + 1)))
        }
        None if rest.len() > limits.max_line => Err(ProtocolError::TooLarge("line".into())),
        None => Ok(None),
    }
}

fn number(l: &[u8], what: &str) -> Result<i64, ProtocolError> {
    std::str::from_utf8(l)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| ProtocolError::Invalid(format!("invalid {what}")))
}

fn parse_array(buf: &[u8], limits: &Limits) -> Result<Option<Parsed>, ProtocolError> {
    let Some((head, mut at)) = line(buf, 0, limits)? else {
        return Ok(None);
    };
    let n = number(&head[1..], "multibulk length")?;
    if n > limits.max_args as i64 {
        return Err(ProtocolError::TooLarge("multibulk length".into()));
    }
    let mut args = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n.max(0) {
        let Some((h, after)) = line(buf, at, limits)? else {
            return Ok(None);
        };
        if h.first() != Some(&b'$') {
            return Err(ProtocolError::Invalid(format!(
                "expected '$', got '{}'",
                h.first().map(|&b| b as char).unwrap_or(' ')
            )));
        }
        let len = number(&h[1..], "bulk length")?;
        if len < 0 {
            return Err(ProtocolError::Invalid("invalid bulk length".into()));
        }
        let len = len as usize;
        if len > limits.max_bulk {
            return Err(ProtocolError::TooLarge("bulk string".into()));
        }
        if buf.len() < after + len + 2 {
            return Ok(None);
        }
        if &buf[after + len..after + len + 2] != b"\r\n" {
            return Err(ProtocolError::Invalid(
                "bulk string not followed by CRLF".into(),
            ));
        }
        args.push(buf[after..after + len].to_vec());
        at = after + len + 2;
    }
    Ok(Some((args, at)))
}

fn parse_inline(buf: &[u8], limits: &Limits) -> Result<Option<Parsed>, ProtocolError> {
    let Some((l, used)) = line(buf, 0, limits)? else {
        return Ok(None);
    };
    let args = split_inline(l)?;
    if args.len() > limits.max_args {
        return Err(ProtocolError::TooLarge("inline command".into()));
    }
    Ok(Some((args, used)))
}

/// Splits an inline line into tokens; `"..."` groups, with `\"` and `\\` escapes. Pure.
pub fn split_inline(l: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < l.len() {
        if l[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let mut tok = Vec::new();
        if l[i] == b'"' {
            i += 1;
            loop {
                match l.get(i) {
                    None => {
                        return Err(ProtocolError::Invalid(
                            "unbalanced quotes in request".into(),
                        ))
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < l.len() => {
                        tok.push(l[i + 1]);
                        i += 2;
                    }
                    Some(&b) => {
                        tok.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            while i < l.len() && !l[i].is_ascii_whitespace() {
                tok.push(l[i]);
                i += 1;
            }
        }
        out.push(tok);
    }
    Ok(out)
}

/// `+<s>\r\n`.
pub fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `-<msg>\r\n`; line breaks in `msg` become spaces so the reply stays one line.
pub fn error(out: &mut Vec<u8>, msg: &str) {
    out.push(b'-');
    out.extend(
        msg.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// `:<n>\r\n`.
pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(format!(":{n}\r\n").as_bytes());
}

/// `$<len>\r\n<bytes>\r\n`, or the nil bulk `$-1\r\n`.
pub fn bulk(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => out.extend_from_slice(b"$-1\r\n"),
        Some(b) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// `*<n>\r\n`; the caller appends the `n` elements.
pub fn array_header(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(format!("*{n}\r\n").as_bytes());
}

/// The prefix a `KEYS` / `SCAN MATCH` pattern stands for: only `prefix*` (or `*`) is
/// supported, since walkv scans by prefix. `None` for any other glob. Pure.
pub fn pattern_prefix(pattern: &[u8]) -> Option<&[u8]> {
    let p = pattern.strip_suffix(b"*")?;
    if p.iter().any(|b| matches!(b, b'*' | b'?' | b'[' | b'\\')) {
        return None;
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_args: 8,
        max_bulk: 16,
        max_line: 64,
    };

    fn args(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn parses_a_multibulk_command_and_reports_its_length() {
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n*1\r\n$4\r\nPING\r\n";
        let (a, used) = parse(buf, &L).unwrap().unwrap();
        assert_eq!(a, args(&["SET", "k", "v1"]));
        let (b, used2) = parse(&buf[used..], &L).unwrap().unwrap();
        assert_eq!(b, args(&["PING"]));
        assert_eq!(used + used2, buf.len());
    }

    #[test]
    fn every_prefix_of_a_command_is_incomplete_not_an_error() {
        let buf = b"*2\r\n$3\r\nGET\r\n$5\r\nhello\r\n";
        for cut in 0..buf.len() {
            assert_eq!(parse(&buf[..cut], &L), Ok(None), "cut at {cut}");
        }
        assert!(parse(buf, &L).unwrap().is_some());
    }

    #[test]
    fn inline_commands_split_on_whitespace_and_quotes() {
        let (a, used) = parse(b"PUT apple red\nGET apple\r\n", &L).unwrap().unwrap();
        assert_eq!(a, args(&["PUT", "apple", "red"]));
        assert_eq!(used, 14);
        let (a, _) = parse(b"SET k \"two words \\\"q\\\"\"\r\n", &L)
            .unwrap()
            .unwrap();
        assert_eq!(a, args(&["SET", "k", "two words \"q\""]));
        assert_eq!(parse(b"\r\n", &L).unwrap().unwrap().0.len(), 0);
        assert!(matches!(
            parse(b"SET \"open\n", &L),
            Err(ProtocolError::Invalid(_))
        ));
    }

    #[test]
    fn limits_are_enforced_without_waiting_for_the_data() {
        assert!(matches!(
            parse(b"*9\r\n", &L),
            Err(ProtocolError::TooLarge(_))
        ));
        assert!(matches!(
            parse(b"*1\r\n$17\r\n", &L),
            Err(ProtocolError::TooLarge(_))
        ));
        assert!(matches!(
            parse(&[b'a'; 100], &L),
            Err(ProtocolError::TooLarge(_))
        ));
        assert!(matches!(
            parse(b"*1\r\n$x\r\n", &L),
            Err(ProtocolError::Invalid(_))
        ));
        assert!(matches!(
            parse(b"*1\r\n:1\r\n", &L),
            Err(ProtocolError::Invalid(_))
        ));
        assert!(matches!(
            parse(b"*1\r\n$1\r\nab\r\n", &L),
            Err(ProtocolError::Invalid(_))
        ));
    }

    #[test]
    fn encoders_produce_resp2() {
        let mut out = Vec::new();
        simple(&mut out, "OK");
        error(&mut out, "ERR bad\nline");
        integer(&mut out, 3);
        bulk(&mut out, Some(b"v"));
        bulk(&mut out, None);
        array_header(&mut out, 2);
        assert_eq!(
            out,
            b"+OK\r\n-ERR bad line\r\n:3\r\n$1\r\nv\r\n$-1\r\n*2\r\n"
        );
    }

    #[test]
    fn only_trailing_star_patterns_are_prefixes() {
        assert_eq!(pattern_prefix(b"user:*"), Some(&b"user:"[..]));
        assert_eq!(pattern_prefix(b"*"), Some(&b""[..]));
        assert_eq!(pattern_prefix(b"a*b*"), None);
        assert_eq!(pattern_prefix(b"a?*"), None);
        assert_eq!(pattern_prefix(b"exact"), None);
    }
}
