//! Redaction applied before anything is written: card numbers masked to
//! the first 6 and last 4 digits (PCI DSS 3.3), credential headers never
//! written at all.

use std::borrow::Cow;
use std::collections::BTreeMap;

use http::HeaderMap;

/// Headers whose values are credentials: never written, in the audit trail
/// or in logs, whatever `audit.redact_headers` says.
pub const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];

/// What a withheld header value is written as, so a reader can see the
/// header was present without learning its value.
pub const WITHHELD: &str = "[redacted]";

/// The header names whose values are withheld: the fixed list plus
/// `audit.redact_headers`, lowercased once.
#[derive(Clone, Debug, Default)]
pub struct HeaderPolicy {
    extra: Vec<String>,
}

impl HeaderPolicy {
    pub fn new(extra: &[String]) -> HeaderPolicy {
        HeaderPolicy {
            extra: extra
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect(),
        }
    }

    pub fn is_withheld(&self, name: &str) -> bool {
        SECRET_HEADERS.iter().any(|s| s.eq_ignore_ascii_case(name))
            || self.extra.iter().any(|s| s.eq_ignore_ascii_case(name))
    }

    /// The headers as they may be written: withheld values replaced, card
    /// numbers masked in the rest, repeated headers joined with `, `.
    /// Non-UTF-8 values are written lossily, after masking, so a PAN cannot
    /// hide behind an invalid byte.
    pub fn redact(&self, headers: &HeaderMap) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in headers {
            let shown = if self.is_withheld(name.as_str()) {
                WITHHELD.to_string()
            } else {
                redact_pans(&header_text(value)).into_owned()
            };
            out.entry(name.as_str().to_owned())
                .and_modify(|v| {
                    if v != WITHHELD {
                        v.push_str(", ");
                        v.push_str(&shown);
                    }
                })
                .or_insert(shown);
        }
        out
    }
}

/// A header line as text: borrowed when it is visible ASCII, as nearly
/// every one is (`to_str` checks that faster than the UTF-8 decoder walks
/// it), else decoded with invalid UTF-8 replaced. The audit trail and the
/// policy input both show header values this way.
pub(crate) fn header_text(line: &http::HeaderValue) -> Cow<'_, str> {
    match line.to_str() {
        Ok(ascii) => Cow::Borrowed(ascii),
        Err(_) => String::from_utf8_lossy(line.as_bytes()),
    }
}

/// Masks payment card numbers (13-19 digits, optionally separated by single
/// spaces, dashes or `+` (a form-encoded space), passing the Luhn check),
/// keeping the first 6 and last 4 digits as PCI DSS 3.3 allows.
///
/// A run of digit groups is checked at every group boundary, not only as a
/// whole: `4111 1111 1111 1111 2026` still holds a card number. A number
/// glued to other digits with no separator is not a card number to anyone
/// reading it, and is left alone (order ids stay readable).
pub fn redact_pans(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    // Most texts (paths, reasons, header values) hold too few digits for a
    // card number at all: answer those without the scan's buffers. Counted
    // without a branch per byte so that the loop vectorises: every request
    // passes its path, its decision's reason and its logged headers here.
    let digits: usize = bytes
        .chunks(255)
        .map(|chunk| {
            let n = chunk
                .iter()
                .fold(0u8, |n, b| n + u8::from(b.wrapping_sub(b'0') < 10));
            usize::from(n)
        })
        .sum();
    // Trace ids, UUIDs and hashes have the digits but not in one run: hex
    // letters break it up. Answered without the scan's buffers too.
    if digits < MIN_PAN_DIGITS || longest_run(bytes) < MIN_PAN_DIGITS {
        return Cow::Borrowed(text);
    }
    scan(text)
}

/// [`redact_pans`] without its shortcuts.
fn scan(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    let mut digits: Vec<u8> = Vec::new();
    // Digit indices where a group starts (0, and after each separator).
    let mut starts: Vec<usize> = Vec::new();
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        digits.clear();
        starts.clear();
        starts.push(0);
        let mut j = i;
        let mut end = i;
        while j < bytes.len() {
            if bytes[j].is_ascii_digit() {
                digits.push(bytes[j] - b'0');
                j += 1;
                end = j;
            } else if matches!(bytes[j], b' ' | b'-' | b'+')
                && j + 1 < bytes.len()
                && bytes[j + 1].is_ascii_digit()
            {
                starts.push(digits.len());
                j += 1;
            } else {
                break;
            }
        }
        if let Some(masked) = mask_run(&digits, &starts) {
            let s = out.get_or_insert_with(String::new);
            s.push_str(&text[copied..i]);
            s.push_str(&masked);
            copied = end;
        }
        i = end;
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut s) => {
            s.push_str(&text[copied..]);
            Cow::Owned(s)
        }
    }
}

/// The shortest card number.
const MIN_PAN_DIGITS: usize = 13;

/// The most digits in one run as [`redact_pans`] gathers them: digits, and
/// single separators each followed by a digit. No card number fits in
/// fewer than [`MIN_PAN_DIGITS`].
fn longest_run(bytes: &[u8]) -> usize {
    let (mut longest, mut run) = (0, 0);
    // Just past a separator: the run goes on only if a digit comes next.
    let mut after_separator = false;
    for &b in bytes {
        if b.is_ascii_digit() {
            run += 1;
            after_separator = false;
        } else if !after_separator && matches!(b, b' ' | b'-' | b'+') {
            after_separator = true;
        } else {
            longest = longest.max(run);
            run = 0;
            after_separator = false;
        }
    }
    longest.max(run)
}

/// The run with the middle digits of every Luhn-valid 13-19 digit window
/// between group boundaries starred (separators dropped), or `None` when it
/// holds no card number.
fn mask_run(digits: &[u8], starts: &[usize]) -> Option<String> {
    if digits.len() < MIN_PAN_DIGITS {
        return None;
    }
    // A group ends where the next one starts, and at the end of the run.
    let ends: Vec<usize> = starts[1..]
        .iter()
        .copied()
        .chain(std::iter::once(digits.len()))
        .collect();
    let mut hidden = vec![false; digits.len()];
    let mut any = false;
    for &start in starts {
        for &end in &ends {
            if end > start
                && (MIN_PAN_DIGITS..=19).contains(&(end - start))
                && luhn(&digits[start..end])
            {
                any = true;
                for h in &mut hidden[start + 6..end - 4] {
                    *h = true;
                }
            }
        }
    }
    any.then(|| {
        digits
            .iter()
            .zip(&hidden)
            .map(|(d, &h)| if h { '*' } else { char::from(b'0' + d) })
            .collect()
    })
}

pub(crate) fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(k, &d)| {
            let d = u32::from(d);
            if k % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pans_are_masked() {
        assert_eq!(
            redact_pans("/v1/cards/4111111111111111/charge"),
            "/v1/cards/411111******1111/charge"
        );
        assert_eq!(redact_pans("4111-1111-1111-1111"), "411111******1111");
        assert_eq!(
            redact_pans("pan=5500 0000 0000 0004&x=1"),
            "pan=550000******0004&x=1"
        );
        // Not Luhn-valid, or too short: an order id, left alone.
        assert_eq!(
            redact_pans("/v1/orders/4111111111111112"),
            "/v1/orders/4111111111111112"
        );
        assert_eq!(
            redact_pans("/v1/payments/123456789012"),
            "/v1/payments/123456789012"
        );
        // The shortest card number, alone in the text: exactly as many
        // digits as the quick check lets through.
        assert_eq!(redact_pans("pan=4222222222222"), "pan=422222***2222");
    }

    /// The quick digit count goes in chunks of 255 bytes: a card number
    /// whose digits fall on both sides of a chunk boundary, or a text
    /// with its digits spread over several chunks, still counts them all.
    #[test]
    fn the_digit_count_spans_chunks() {
        for start in 240..256 {
            let text = format!("{}4111111111111111{}", "a".repeat(start), "b".repeat(300));
            let want = format!("{}411111******1111{}", "a".repeat(start), "b".repeat(300));
            assert_eq!(redact_pans(&text), want, "card at byte {start}");
        }
        let spread = format!("{}4111{}111111111111", "x".repeat(250), "-");
        assert!(redact_pans(&spread).contains("411111******1111"));
        // 600 digit-free bytes and one digit short of a card: borrowed.
        let short = format!("{}411111111111", "y".repeat(600));
        assert!(matches!(redact_pans(&short), Cow::Borrowed(_)));
    }

    /// Digits enough for a card number, but never 13 in one run: the
    /// text comes back as it was, borrowed. One more digit in a run and
    /// the scan runs (and finds a card where there is one).
    #[test]
    fn trace_ids_and_uuids_are_not_scanned() {
        for text in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "550e8400-e29b-41d4-a716-446655440000",
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "1234 5678 9012 a 1234",
        ] {
            assert!(
                matches!(redact_pans(text), Cow::Borrowed(t) if t == text),
                "{text}"
            );
        }
        assert_eq!(longest_run(b"1234 5678 9012 a 1234"), 12);
        assert_eq!(longest_run(b"1-2--3 4+5"), 3);
        assert_eq!(longest_run(b"4111-1111-1111-1111x"), 16);
        assert_eq!(longest_run(b"-5"), 1);
        assert_eq!(
            redact_pans("ab 4111 1111 1111 1111 cd"),
            "ab 411111******1111 cd"
        );
    }

    proptest::proptest! {
        /// The shortcuts change how fast, never what: over texts made of
        /// digits, separators and a letter, with card numbers spliced in.
        #[test]
        fn the_shortcuts_answer_as_the_scan_does(
            text in "[0-9 +a-]{0,60}",
            card in proptest::option::of("4111[ -]?1111[ -]?1111[ -]?1111"),
            at in 0usize..60,
        ) {
            let mut text = text;
            if let Some(card) = card {
                text.insert_str(at.min(text.len()), &card);
            }
            proptest::prop_assert_eq!(redact_pans(&text), scan(&text));
        }
    }

    #[test]
    fn pans_beside_other_digit_groups_are_masked() {
        let out = redact_pans("pan=4111 1111 1111 1111 2026");
        assert!(out.starts_with("pan=411111******1111"), "{out}");
        let out = redact_pans("id 12-4111-1111-1111-1111");
        assert!(out.contains("411111******1111"), "{out}");
        // Too long and glued together: not a card number, left alone.
        assert_eq!(
            redact_pans("41111111111111111111111"),
            "41111111111111111111111"
        );
    }

    #[test]
    fn secret_headers_are_withheld_and_pans_masked() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer s3cr3t".parse().unwrap());
        h.insert("cookie", "sid=abc".parse().unwrap());
        h.insert("x-tenant-token", "t0ken".parse().unwrap());
        h.insert("x-card", "4111 1111 1111 1111".parse().unwrap());
        let out = HeaderPolicy::new(&["X-Tenant-Token".into()]).redact(&h);
        assert_eq!(out["authorization"], WITHHELD);
        assert_eq!(out["cookie"], WITHHELD);
        assert_eq!(out["x-tenant-token"], WITHHELD);
        assert_eq!(out["x-card"], "411111******1111");
    }
}
