//! The hash chain: every line carries `seq`, `prev` (the previous line's
//! `hash`) and its own `hash`, a SHA-256 (or, with `audit.hmac_key_file`, an
//! HMAC-SHA256) of the line's bytes up to `,"hash":...`.

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
        match self {
            Hasher::Sha256 => hex::encode(Sha256::digest(bytes)),
            Hasher::Hmac(key) => match <Hmac<Sha256> as Mac>::new_from_slice(key) {
                Ok(mut mac) => {
                    mac.update(bytes);
                    hex::encode(mac.finalize().into_bytes())
                }
                // HMAC accepts keys of any length; this arm is unreachable
                // in practice and still yields a hash that never verifies.
                Err(_) => String::new(),
            },
        }
    }
}

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
    pub fn seal(&mut self, mut event: Event) -> String {
        self.seq += 1;
        event.seq = self.seq;
        event.prev = std::mem::take(&mut self.prev);
        let mut body = serde_json::to_string(&event).unwrap_or_else(|e| {
            // Serialising plain strings and numbers cannot fail; if it ever
            // did, the line still records that an event existed.
            format!(
                r#"{{"ts":{:?},"seq":{},"kind":"serialization_error","detail":{:?},"prev":{:?}}}"#,
                event.ts,
                event.seq,
                e.to_string(),
                event.prev
            )
        });
        let hash = self.hasher.hash(body.as_bytes());
        body.pop();
        body.push_str(",\"hash\":\"");
        body.push_str(&hash);
        body.push_str("\"}\n");
        self.prev = hash;
        body
    }
}
