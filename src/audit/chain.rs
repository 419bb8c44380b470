//! The hash chain: every line carries `seq`, `prev` (the previous line's
//! `hash`) and its own `hash`, a SHA-256 (or, with `audit.hmac_key_file`, an
//! HMAC-SHA256) of the line's bytes up to `,"hash":...`.

use std::io::Write as _;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::Event;

/// The `prev` of the first event in a new trail.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How line hashes are computed. With a key, someone who can edit the file
/// but does not hold the key cannot recompute a consistent chain.
#[derive(Clone)]
pub enum Hasher {
    Sha256,
    Hmac(Vec<u8>),
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself, not even in a debug log.
        f.write_str(match self {
            Hasher::Sha256 => "Sha256",
            Hasher::Hmac(_) => "Hmac(<key withheld>)",
        })
    }
}

impl Hasher {
    pub fn name(&self) -> &'static str {
        match self {
            Hasher::Sha256 => "sha256",
            Hasher::Hmac(_) => "hmac-sha256",
        }
    }

    pub fn hash(&self, bytes: &[u8]) -> String {
        let mut hex = [0u8; HEX_LEN];
        let len = self.hash_into(bytes, &mut hex);
        // Hex digits are ASCII.
        String::from_utf8_lossy(&hex[..len]).into_owned()
    }

    /// Writes the lowercase hex hash of `bytes` into `hex` and returns its
    /// length: on the writer thread, once per line, without allocating.
    fn hash_into(&self, bytes: &[u8], hex: &mut [u8; HEX_LEN]) -> usize {
        let digest = match self {
            Hasher::Sha256 => Sha256::digest(bytes),
            Hasher::Hmac(key) => match <Hmac<Sha256> as Mac>::new_from_slice(key) {
                Ok(mut mac) => {
                    mac.update(bytes);
                    mac.finalize().into_bytes()
                }
                // HMAC accepts keys of any length; this arm is unreachable
                // in practice and still yields a hash that never verifies.
                Err(_) => return 0,
            },
        };
        match hex::encode_to_slice(digest, hex) {
            Ok(()) => HEX_LEN,
            Err(_) => 0,
        }
    }
}

/// A SHA-256 in hex.
const HEX_LEN: usize = 64;

/// Numbers events and links each to the hash of the one before it.
#[derive(Clone, Debug)]
pub struct Chain {
    seq: u64,
    prev: String,
    hasher: Hasher,
}

impl Chain {
    pub fn new(prev: String) -> Chain {
        Chain::resume(0, prev, Hasher::Sha256)
    }

    /// Continues after the event numbered `seq` whose hash was `prev`.
    pub fn resume(seq: u64, prev: String, hasher: Hasher) -> Chain {
        Chain { seq, prev, hasher }
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn prev(&self) -> &str {
        &self.prev
    }

    pub fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    /// Returns the finished line, newline included. `hash` covers the line
    /// as written up to (not including) `,"hash":...`, with the closing
    /// brace: so it covers `prev`, and a verifier needs no JSON
    /// canonicalisation to recompute it.
    pub fn seal(&mut self, event: Event) -> String {
        let mut line = Vec::new();
        self.seal_into(&Prepared::new(event), &mut line);
        // Built from serde_json output and ASCII: always UTF-8.
        String::from_utf8_lossy(&line).into_owned()
    }

    /// Appends the sealed line for `event` to `out`: the event's own
    /// fields as the sender serialized them, with `seq` and `prev` spliced
    /// into the places serde would have put them.
    pub fn seal_into(&mut self, event: &Prepared, out: &mut Vec<u8>) {
        self.seq += 1;
        let start = out.len();
        let (head, tail) = event.json.split_at(event.ts_end);
        out.extend_from_slice(head);
        // Writing to a Vec cannot fail.
        let _ = write!(out, ",\"seq\":{}", self.seq);
        // `tail` is `,"kind":...}`: everything after `ts` with its brace.
        out.extend_from_slice(&tail[..tail.len().saturating_sub(1)]);
        out.extend_from_slice(b",\"prev\":\"");
        out.extend_from_slice(self.prev.as_bytes());
        out.extend_from_slice(b"\"}");
        let mut hex = [0u8; HEX_LEN];
        let len = self.hasher.hash_into(&out[start..], &mut hex);
        let hash = &hex[..len];
        out.pop();
        out.extend_from_slice(b",\"hash\":\"");
        out.extend_from_slice(hash);
        out.extend_from_slice(b"\"}\n");
        self.prev.clear();
        // Hex digits are ASCII, so this is always the whole hash.
        self.prev
            .push_str(std::str::from_utf8(hash).unwrap_or_default());
    }
}

/// An event serialized by whoever records it, without the `seq` and `prev`
/// only the writer can assign. Serializing on the recording thread keeps
/// the event's many small strings allocated and freed on one thread: freed
/// by the writer, each would take the lock of the arena that made it.
#[derive(Debug)]
pub struct Prepared {
    pub kind: super::Kind,
    /// `{"ts":"...","kind":...}`.
    json: Vec<u8>,
    /// Where the `ts` field ends: `seq` goes here.
    ts_end: usize,
}

impl Prepared {
    pub fn new(mut event: Event) -> Prepared {
        // Omitted when unset; the writer splices in the real ones.
        event.seq = 0;
        event.prev.clear();
        // Sized for a request event, so it is written without regrowing.
        let mut json = Vec::with_capacity(1024);
        let ts_end = super::json::write_event(&event, &mut json);
        debug_assert_eq!(
            String::from_utf8_lossy(&json),
            serde_json::to_string(&event).unwrap_or_default(),
            "the hand-written line differs from serde_json's"
        );
        Prepared {
            kind: event.kind,
            json,
            ts_end,
        }
    }
}
