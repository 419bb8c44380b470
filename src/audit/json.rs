//! An event's JSON, written by hand rather than by serde_json.
//!
//! A request's line is mostly strings, and serde_json escapes a string one
//! byte at a time: under callgrind that was the largest single cost of a
//! request in the sidecar's own code (docs/performance.md, "Seventh
//! round").
//! Here a string is checked for bytes that need escaping in one pass the
//! compiler vectorises, and copied whole when there are none (nearly
//! always). The output is byte for byte what serde's derive writes
//! (same field order, same omissions, same escapes); debug builds, and so
//! every test, compare each event with serde_json's line.

use std::collections::BTreeMap;

use super::{Decision, Destination, Direction, Event, Request, Response, Source, Svid};

/// Appends `event` as `serde_json::to_vec` writes it; returns the length
/// of `out` once `ts`, the first field, is written.
pub fn write_event(event: &Event, out: &mut Vec<u8>) -> usize {
    let mut o = Object::begin(out);
    o.str(key!("ts"), &event.ts);
    let ts_end = o.out.len();
    if event.seq != 0 {
        o.u64(key!("seq"), event.seq);
    }
    o.key(key!("kind"));
    string(o.out, event.kind.as_str());
    o.opt_str(key!("request_id"), &event.request_id);
    if let Some(Direction::Outbound) = event.direction {
        o.str(key!("direction"), "outbound");
    }
    if let Some(source) = &event.source {
        o.key(key!("source"));
        write_source(source, o.out);
    }
    if let Some(destination) = &event.destination {
        o.key(key!("destination"));
        write_destination(destination, o.out);
    }
    if let Some(request) = &event.request {
        o.key(key!("request"));
        write_request(request, o.out);
    }
    if let Some(decision) = &event.decision {
        o.key(key!("decision"));
        write_decision(decision, o.out);
    }
    if let Some(Response { status }) = &event.response {
        o.key(key!("response"));
        let mut r = Object::begin(o.out);
        r.u64(key!("status"), u64::from(*status));
        r.end();
    }
    if let Some(us) = event.duration_us {
        o.u64(key!("duration_us"), us);
    }
    o.opt_str(key!("version"), &event.version);
    o.opt_str(key!("config_revision"), &event.config_revision);
    o.opt_str(key!("policy_revision"), &event.policy_revision);
    if let Some(svid) = &event.svid {
        o.key(key!("svid"));
        write_svid(svid, o.out);
    }
    if let Some(n) = event.lost {
        o.u64(key!("lost"), n);
    }
    if let Some(n) = event.refused {
        o.u64(key!("refused"), n);
    }
    o.opt_str(key!("detail"), &event.detail);
    if !event.prev.is_empty() {
        o.str(key!("prev"), &event.prev);
    }
    o.end();
    ts_end
}

fn write_source(s: &Source, out: &mut Vec<u8>) {
    let mut o = Object::begin(out);
    o.opt_str(key!("spiffe_id"), &s.spiffe_id);
    o.str(key!("address"), &s.address);
    o.end();
}

fn write_destination(d: &Destination, out: &mut Vec<u8>) {
    let mut o = Object::begin(out);
    o.str(key!("host"), &d.host);
    o.str(key!("address"), &d.address);
    o.opt_str(key!("spiffe_id"), &d.spiffe_id);
    o.str(key!("expected"), &d.expected);
    o.end();
}

fn write_request(r: &Request, out: &mut Vec<u8>) {
    let mut o = Object::begin(out);
    o.str(key!("method"), &r.method);
    o.str(key!("path"), &r.path);
    if let Some(headers) = &r.headers {
        o.key(key!("headers"));
        write_map(headers, o.out);
    }
    o.end();
}

fn write_map(map: &BTreeMap<String, String>, out: &mut Vec<u8>) {
    let mut o = Object::begin(out);
    for (name, value) in map {
        o.comma();
        string(o.out, name);
        o.out.push(b':');
        string(o.out, value);
    }
    o.end();
}

fn write_decision(d: &Decision, out: &mut Vec<u8>) {
    let mut o = Object::begin(out);
    o.bool(key!("allowed"), d.allowed);
    o.str(key!("reason"), &d.reason);
    o.str(key!("policy_revision"), &d.policy_revision);
    if d.dry_run {
        o.bool(key!("dry_run"), true);
    }
    if d.cached {
        o.bool(key!("cached"), true);
    }
    o.end();
}

fn write_svid(s: &Svid, out: &mut Vec<u8>) {
    let mut o = Object::begin(out);
    o.str(key!("spiffe_id"), &s.spiffe_id);
    o.str(key!("not_after"), &s.not_after);
    o.str(key!("sha256"), &s.sha256);
    o.end();
}

/// A key as written: quoted, with its colon (all keys here are plain
/// ASCII, so there is nothing to escape), in one piece to copy.
macro_rules! key {
    ($name:literal) => {
        concat!("\"", $name, "\":")
    };
}
use key;

/// An object being written: braces, commas, and keys.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    fn begin(out: &'a mut Vec<u8>) -> Object<'a> {
        out.push(b'{');
        Object { out, empty: true }
    }

    fn comma(&mut self) {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
    }

    /// `key` as [`key!`] makes it.
    fn key(&mut self, key: &str) {
        self.comma();
        self.out.extend_from_slice(key.as_bytes());
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        string(self.out, value);
    }

    fn opt_str(&mut self, key: &str, value: &Option<String>) {
        if let Some(value) = value {
            self.str(key, value);
        }
    }

    fn u64(&mut self, key: &str, value: u64) {
        self.key(key);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    fn bool(&mut self, key: &str, value: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

/// `s` as a JSON string, escaped as serde_json escapes: `"` and `\`, and
/// control characters (the short forms where JSON has one, else `\u00XX`
/// in lowercase hex). Everything else, non-ASCII included, is copied.
pub fn string(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    // No early exit, so the check runs on whole vectors.
    let clean = bytes.iter().fold(true, |clean, &b| {
        clean & (b >= 0x20 && b != b'"' && b != b'\\')
    });
    if clean {
        out.extend_from_slice(bytes);
    } else {
        escape_into(out, bytes);
    }
    out.push(b'"');
}

fn escape_into(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0C => out.extend_from_slice(b"\\f"),
            0x00..=0x1F => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0x0F)]);
            }
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Kind;

    fn serde(event: &Event) -> String {
        serde_json::to_string(event).unwrap()
    }

    fn ours(event: &Event) -> String {
        let mut out = Vec::new();
        write_event(event, &mut out);
        String::from_utf8(out).unwrap()
    }

    /// Every byte that JSON treats specially, and some that it does not.
    const AWKWARD: &str = "a\"b\\c/d\u{0}\u{1}\u{8}\u{9}\u{a}\u{c}\u{d}\u{1f}\u{7f} é€😀 '<>&";

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut every_byte = String::new();
        for c in (0u8..0x80).map(char::from) {
            every_byte.push(c);
        }
        for s in ["", "plain", AWKWARD, &every_byte, "\u{2028}\u{2029}"] {
            let mut out = Vec::new();
            string(&mut out, s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }

    #[test]
    fn every_field_set_is_written_as_serde_writes_it() {
        let mut headers = BTreeMap::new();
        headers.insert("host".to_owned(), "payments".to_owned());
        headers.insert("x-odd".to_owned(), AWKWARD.to_owned());
        let event = Event {
            ts: "2026-11-30T10:00:00.123Z".into(),
            seq: 42,
            kind: Kind::Request,
            request_id: Some(AWKWARD.into()),
            direction: Some(Direction::Outbound),
            source: Some(Source {
                spiffe_id: Some("spiffe://pay.example/ns/shop/sa/checkout".into()),
                address: "127.0.0.1:4000".into(),
            }),
            destination: Some(Destination {
                host: "ledger".into(),
                address: "127.0.0.1:9000".into(),
                spiffe_id: Some(AWKWARD.into()),
                expected: "an ID in trust domain pay.example".into(),
            }),
            request: Some(Request {
                method: "GET".into(),
                path: AWKWARD.into(),
                headers: Some(headers),
            }),
            decision: Some(Decision {
                allowed: false,
                reason: AWKWARD.into(),
                policy_revision: "abc".into(),
                dry_run: true,
                cached: true,
            }),
            response: Some(Response { status: 503 }),
            duration_us: Some(u64::MAX),
            version: Some("0.1.0".into()),
            config_revision: Some("c".into()),
            policy_revision: Some("p".into()),
            svid: Some(Svid {
                spiffe_id: "spiffe://pay.example/ns/pay/sa/payments".into(),
                not_after: "2026-12-01T00:00:00Z".into(),
                sha256: "00ff".into(),
            }),
            lost: Some(0),
            refused: Some(7),
            detail: Some(AWKWARD.into()),
            prev: "f00d".into(),
        };
        assert_eq!(ours(&event), serde(&event));
    }

    #[test]
    fn unset_fields_are_left_out_as_serde_leaves_them_out() {
        let mut event = Event::blank();
        assert_eq!(ours(&event), serde(&event));
        event.source = Some(Source::default());
        event.request = Some(Request {
            method: String::new(),
            path: String::new(),
            headers: Some(BTreeMap::new()),
        });
        event.decision = Some(Decision {
            allowed: true,
            reason: String::new(),
            policy_revision: String::new(),
            dry_run: false,
            cached: false,
        });
        event.destination = Some(Destination::default());
        assert_eq!(ours(&event), serde(&event));
    }

    #[test]
    fn every_kind_is_named_as_serde_names_it() {
        for kind in Kind::ALL {
            let event = Event::blank();
            let event = Event { kind, ..event };
            assert_eq!(ours(&event), serde(&event), "{kind:?}");
        }
    }
}
