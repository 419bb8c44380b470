//! The single normalised request path that the policy evaluates and the
//! upstream receives.
//!
//! Authorization bypasses in proxies come from the policy deciding on one
//! path while the service resolves another (`/v1/reports/../payments`, `%2F`,
//! `//`, `\`, `;` parameters). Normalising once, and refusing whatever cannot
//! be normalised without guessing how the service will read it, closes that
//! gap: the caller must forward exactly the string returned here.

use thiserror::Error;

/// Longest path accepted, in bytes. Longer paths are refused rather than
/// truncated, because a truncated path is a different path.
pub const MAX_PATH_LEN: usize = 8 * 1024;

/// Why a path was refused. The messages go into a 400 body, so they name the
/// cause without echoing the caller's bytes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PathError {
    #[error("the request path is empty")]
    Empty,
    #[error("the request path must start with '/'")]
    NotOriginForm,
    #[error("the request path is longer than {} bytes", MAX_PATH_LEN)]
    TooLong,
    #[error("the request path contains a malformed percent-escape")]
    BadEscape,
    #[error("the request path contains an encoded slash (%2F)")]
    EncodedSlash,
    #[error("the request path contains an encoded backslash (%5C)")]
    EncodedBackslash,
    #[error("the request path contains a backslash")]
    Backslash,
    #[error("the request path contains a NUL byte")]
    Nul,
    #[error("the request path contains a control character")]
    ControlChar,
    #[error("the request path contains a non-ASCII byte")]
    NonAscii,
    #[error("the request path uses '..' to climb above the root")]
    AboveRoot,
    #[error("the request path has a '.' or '..' segment with ';' parameters")]
    DotSegmentWithParams,
    #[error("the request path has an empty segment with ';' parameters")]
    ParamsOnEmptySegment,
}

/// Normalises the path component of an origin-form request target (the
/// caller has already cut the query off at the first `?`).
///
/// The result is the one path to authorize and to forward: percent-encoded
/// unreserved characters decoded, remaining escapes in uppercase hex,
/// duplicate slashes merged, dot segments removed, a trailing slash kept.
pub fn normalize(raw: &str) -> Result<String, PathError> {
    if raw.is_empty() {
        return Err(PathError::Empty);
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if raw.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    if is_normal(raw.as_bytes()) {
        return Ok(raw.to_owned());
    }
    let decoded = decode_unreserved(raw)?;
    resolve_segments(&decoded)
}

/// Whether `raw` (starting with '/') is its own normal form, which nearly
/// every real request path is: no escape, no `;`, no byte the slow path
/// refuses, no empty segment but a trailing one, no dot segment. One pass
/// over the bytes, where the slow path decodes, splits and joins (a test
/// checks the two agree).
fn is_normal(raw: &[u8]) -> bool {
    let mut segment_start = 1;
    for (i, &b) in raw.iter().enumerate().skip(1) {
        match b {
            b'/' => {
                if matches!(&raw[segment_start..i], b"" | b"." | b"..") {
                    return false;
                }
                segment_start = i + 1;
            }
            b'%' | b';' | b'\\' => return false,
            0x20..=0x7E => {}
            _ => return false,
        }
    }
    // The last segment may be empty (a trailing slash, or the root).
    !matches!(&raw[segment_start..], b"." | b"..")
}

/// Decodes escapes of unreserved characters and refuses the bytes and escapes
/// that services disagree about. Every other escape stays encoded, so nothing
/// is ever decoded twice and reserved characters keep their meaning.
fn decode_unreserved(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'%' {
            check_raw_byte(b)?;
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let hi = bytes.get(i + 1).copied().and_then(hex_value);
        let lo = bytes.get(i + 2).copied().and_then(hex_value);
        let (Some(hi), Some(lo)) = (hi, lo) else {
            return Err(PathError::BadEscape);
        };
        let value = (hi << 4) | lo;
        match value {
            // Decoding these would add a segment boundary the policy never
            // saw; keeping them encoded lets some services split on them anyway.
            b'/' => return Err(PathError::EncodedSlash),
            b'\\' => return Err(PathError::EncodedBackslash),
            0 => return Err(PathError::Nul),
            0x01..=0x1F | 0x7F => return Err(PathError::ControlChar),
            v if is_unreserved(v) => out.push(char::from(v)),
            _ => {
                out.push('%');
                out.push(upper_hex_digit(hi));
                out.push(upper_hex_digit(lo));
            }
        }
        i += 3;
    }
    Ok(out)
}

fn check_raw_byte(b: u8) -> Result<(), PathError> {
    match b {
        0 => Err(PathError::Nul),
        0x01..=0x1F | 0x7F => Err(PathError::ControlChar),
        // Windows-style servers and some frameworks treat '\' as '/'.
        b'\\' => Err(PathError::Backslash),
        0x80..=0xFF => Err(PathError::NonAscii),
        _ => Ok(()),
    }
}

/// Merges duplicate slashes and removes dot segments (RFC 3986 section
/// 5.2.4), refusing instead of clamping a `..` that would leave the root:
/// such a request is an attack or a bug, and the service might resolve it
/// against something other than our root.
fn resolve_segments(decoded: &str) -> Result<String, PathError> {
    // `normalize` checked the leading '/' and decoding keeps raw bytes.
    let rest = decoded.strip_prefix('/').ok_or(PathError::NotOriginForm)?;
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let is_last = segments.peek().is_none();
        check_params(segment)?;
        match segment {
            "" | "." => trailing_slash = is_last,
            ".." => {
                if kept.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = is_last;
            }
            _ => {
                kept.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &kept {
        out.push('/');
        out.push_str(segment);
    }
    if kept.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// Servlet containers strip `;` parameters before resolving dot segments, so
/// `/a/..;x/b` reaches them as `/b` and `/;x/b` as `//b` (then `/b`), while
/// the policy would see an ordinary segment. An encoded `;` is treated the
/// same because some stacks decode before stripping parameters.
fn check_params(segment: &str) -> Result<(), PathError> {
    let Some(end) = params_start(segment) else {
        return Ok(());
    };
    match segment.get(..end) {
        Some("." | "..") => Err(PathError::DotSegmentWithParams),
        Some("") => Err(PathError::ParamsOnEmptySegment),
        _ => Ok(()),
    }
}

fn params_start(segment: &str) -> Option<usize> {
    // Escapes are uppercase by now, so "%3B" is the only encoded spelling.
    match (segment.find(';'), segment.find("%3B")) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn upper_hex_digit(nibble: u8) -> char {
    char::from(b"0123456789ABCDEF"[usize::from(nibble & 0x0F)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_paths_normalise_to_exact_output() {
        let rows: &[(&str, &str)] = &[
            ("/v1/payments", "/v1/payments"),
            ("/", "/"),
            ("/v1/reports/../payments", "/v1/payments"),
            ("/v1/reports/%2e%2e/payments", "/v1/payments"),
            ("/v1/reports/%2E%2e/payments", "/v1/payments"),
            ("/v1/reports/.%2E/payments", "/v1/payments"),
            ("/v1/reports/%2e/payments", "/v1/reports/payments"),
            ("//v1///payments", "/v1/payments"),
            ("//", "/"),
            ("/v1/%70ayments", "/v1/payments"),
            ("/%41%2d%2E%5f%7E%30%7a", "/A-._~0z"),
            ("/v1/a;b=c/x", "/v1/a;b=c/x"),
            ("/v1/payments;jsessionid=1", "/v1/payments;jsessionid=1"),
            ("/v1/%e2%82%ac", "/v1/%E2%82%AC"),
            ("/a%20b%3fc%23d", "/a%20b%3Fc%23d"),
            // An encoded '%' stays encoded, so nothing is decoded twice.
            ("/a%25b", "/a%25b"),
            ("/v1/%252e%252e/x", "/v1/%252e%252e/x"),
            ("/a/./b/.", "/a/b/"),
            ("/v1/payments/", "/v1/payments/"),
            ("/v1/payments//", "/v1/payments/"),
            ("/v1/x/..", "/v1/"),
            ("/v1/x/../", "/v1/"),
            ("/v1/x/%2e", "/v1/x/"),
            ("/.", "/"),
            ("/a/..", "/"),
            ("/a//..", "/"),
            ("/.../x", "/.../x"),
            ("/v1/..a/.b", "/v1/..a/.b"),
        ];
        for (input, want) in rows {
            assert_eq!(normalize(input).as_deref(), Ok(*want), "input {input:?}");
        }
    }

    #[test]
    fn refused_paths_give_exact_error() {
        use PathError::*;
        let rows: &[(&str, PathError)] = &[
            ("", Empty),
            ("relative", NotOriginForm),
            ("*", NotOriginForm),
            ("%zz", NotOriginForm),
            ("http://h/x", NotOriginForm),
            ("/%zz", BadEscape),
            ("/%4", BadEscape),
            ("/%4/", BadEscape),
            ("/%", BadEscape),
            ("/%g0", BadEscape),
            ("/v1/pay%2fments", EncodedSlash),
            ("/v1/pay%2Fments", EncodedSlash),
            ("/v1\\payments", Backslash),
            ("/v1/pay%5cments", EncodedBackslash),
            ("/v1/pay%5Cments", EncodedBackslash),
            ("/v1/%00", Nul),
            ("/v1/\0", Nul),
            ("/v1/\x01", ControlChar),
            ("/v1/\t", ControlChar),
            ("/v1/\x7f", ControlChar),
            ("/v1/%1f", ControlChar),
            ("/v1/%7F", ControlChar),
            ("/v1/caf\u{e9}", NonAscii),
            ("/../etc", AboveRoot),
            ("/..", AboveRoot),
            ("/%2e%2e/etc", AboveRoot),
            ("//../etc", AboveRoot),
            ("/v1/../../x", AboveRoot),
            ("/a/../..", AboveRoot),
            ("/v1/..;/payments", DotSegmentWithParams),
            ("/v1/..;jsessionid=x/payments", DotSegmentWithParams),
            ("/v1/.;x/payments", DotSegmentWithParams),
            ("/v1/%2e%2e;/payments", DotSegmentWithParams),
            ("/v1/..%3b/payments", DotSegmentWithParams),
            ("/v1/..;", DotSegmentWithParams),
            ("/;x/admin", ParamsOnEmptySegment),
            ("/v1/%3Bx/admin", ParamsOnEmptySegment),
        ];
        for (input, want) in rows {
            assert_eq!(normalize(input), Err(*want), "input {input:?}");
        }
    }

    #[test]
    fn length_limit_is_inclusive() {
        let at_limit = format!("/{}", "a".repeat(MAX_PATH_LEN - 1));
        assert_eq!(normalize(&at_limit).as_deref(), Ok(at_limit.as_str()));
        let over = format!("/{}", "a".repeat(MAX_PATH_LEN));
        assert_eq!(normalize(&over), Err(PathError::TooLong));
    }

    #[test]
    fn error_messages_name_the_cause() {
        assert_eq!(
            PathError::TooLong.to_string(),
            "the request path is longer than 8192 bytes"
        );
        assert!(PathError::EncodedSlash
            .to_string()
            .contains("encoded slash"));
    }

    /// splitmix64: deterministic, so a failure reproduces from the seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// '/' and then up to `max_parts - 1` pieces from `alphabet`.
        fn path(&mut self, alphabet: &[&str], max_parts: usize) -> String {
            let mut path = String::from("/");
            for _ in 0..self.below(max_parts) {
                path.push_str(alphabet[self.below(alphabet.len())]);
            }
            path
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_normalisation() {
        const ALPHABET: &[&str] = &[
            "/", ".", "..", "%2e", "%2F", "a", "b-~_", ";", "%41", "//", "\\", " ", "\u{7f}",
            "\u{1}", "é", "%", "%3B", "?",
        ];
        let mut rng = Rng(0x5EED_C0FF_EE00_0002);
        let mut fast = 0;
        for _ in 0..20_000 {
            let path = rng.path(ALPHABET, 10);
            if is_normal(path.as_bytes()) {
                fast += 1;
                let full = decode_unreserved(&path).and_then(|d| resolve_segments(&d));
                assert_eq!(full.as_ref(), Ok(&path), "{path:?}");
            }
        }
        for path in ["/", "/a", "/a/", "/v1/payments/pay_1001", "/a.b/..c/.d"] {
            assert!(is_normal(path.as_bytes()), "{path:?}");
        }
        for path in [
            "//", "/.", "/..", "/a/./b", "/a/../b", "/a//b", "/a/.", "/%41", "/a;b",
        ] {
            assert!(!is_normal(path.as_bytes()), "{path:?}");
        }
        assert!(fast > 2000, "only {fast} paths took the fast path");
    }

    #[test]
    fn random_paths_keep_invariants() {
        const ALPHABET: &[&str] = &["/", ".", "..", "%2e", "%2F", "a", ";", "%41", "//"];
        let mut rng = Rng(0x5EED_C0FF_EE00_0001);
        let mut accepted = 0;
        for _ in 0..5000 {
            let path = rng.path(ALPHABET, 12);
            let Ok(out) = normalize(&path) else { continue };
            accepted += 1;
            assert_eq!(
                normalize(&out).as_ref(),
                Ok(&out),
                "not idempotent: {path:?}"
            );
            assert!(out.starts_with('/'), "{path:?} -> {out:?}");
            for bad in [
                "//", "/./", "/../", "%2F", "%2f", "%5C", "%2e", "%2E", "%41",
            ] {
                assert!(!out.contains(bad), "{path:?} -> {out:?} contains {bad:?}");
            }
            for bad in ["/..", "/."] {
                assert!(!out.ends_with(bad), "{path:?} -> {out:?} ends with {bad:?}");
            }
        }
        // Guards against a generator that only produces refused paths.
        assert!(accepted > 500, "only {accepted} paths accepted");
    }
}
