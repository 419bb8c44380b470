//! The policy decision cache: a decision reused for a later request that
//! the policy cannot tell apart from the one that produced it.
//!
//! # The soundness rule
//!
//! A Rego decision is a pure function of the snapshot (modules and data,
//! fixed for the snapshot's lifetime) and of the parts of `input` the
//! policy reads, *provided* it calls nothing whose result depends on
//! anything else. So at load the source text of every module (tests too:
//! they are loaded into the same engine) is scanned, and:
//!
//! * every reference to the input document goes through the identifier
//!   `input`: as a rule body term, a function argument, an `import input...`
//!   or the expression after a `with ... as`. For each such token the
//!   static part of its reference (`.name` and `["literal"]` segments) is
//!   the read path; the scan stops at the first segment it cannot read
//!   statically (`[x]`, `[0]`, a call, whitespace), so a recorded path is
//!   always a prefix of what is really read and its value covers it.
//!   Comments and string literals are skipped; `x.input` and `my_input`
//!   are other names. The target of `with input... as` is not a read: it
//!   replaces the input within a scope (the expression after `as` is still
//!   scanned).
//! * the key of a request is the value found at each read path (or an
//!   explicit "absent"), encoded unambiguously; the full key is stored,
//!   never only a hash, so a collision cannot hand one request another's
//!   decision.
//!
//! Caching is off for a snapshot, with the reason kept for `/policy` and
//! the load log, when:
//!
//! * a read path overlaps a per-request field ([`VOLATILE`]: the request
//!   time, the request id we generate, the peer's address and port): a
//!   path inside one (`input.attributes.source.address.socketAddress`), or
//!   one containing one (`input`, `input.attributes`,
//!   `import input.attributes as a`). Keying on them would make every
//!   request a miss, and ignoring them would be wrong.
//! * a module mentions, anywhere, even in a comment, a builtin whose
//!   result is not a function of its arguments ([`NON_DETERMINISTIC`]):
//!   the clock, randomness, the network, the runtime environment, and our
//!   `io.jwt.decode_verify`, which checks `exp`/`nbf` against the clock.
//!   A text match is cruder than a call graph, and never misses a call.
//! * a module has a `$"..."` template string: its `{...}` parts would be
//!   code the scan takes for string contents (regorus 0.14 refuses them;
//!   this guards a later upgrade).
//! * `policy.decision_cache` is 0.
//!
//! Per request, an input carrying a body (`parsed_body`/`truncated_body`)
//! is evaluated and not cached: bodies are large and nearly always unique,
//! so they would only churn the cache and its memory.
//!
//! Errors and timeouts are never cached: the next request evaluates again.
//!
//! # Bounding
//!
//! Two generations, each of at most half the capacity: entries go into the
//! young one; when it is full it becomes the old one and the previous old
//! one is dropped. A hit in the old generation moves the entry back into
//! the young one, so what is in use survives a turnover and what is not
//! ages out, at the cost of one map and no per-entry bookkeeping.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use regorus::Value;

use super::input::{self, Field, RequestFacts};
use super::Decision;

/// `policy.decision_cache` when the configuration does not set it.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Input paths whose values differ on (nearly) every request.
pub const VOLATILE: &[&[&str]] = &[
    &["input", "attributes", "request", "time"],
    &["input", "attributes", "request", "http", "id"],
    &["input", "attributes", "source", "address"],
];

/// Builtins (and our extensions) whose result depends on more than their
/// arguments. regorus 0.14 memoizes the first four per query for the same
/// reason (`builtins::must_cache`); the rest are OPA's that read the
/// network or the clock, listed in case a later regorus adds them.
pub const NON_DETERMINISTIC: &[&str] = &[
    "time.now_ns",
    "rand.intn",
    "uuid.rfc4122",
    "opa.runtime",
    "http.send",
    "net.lookup_ip_addr",
    "io.jwt.decode_verify",
    "crypto.x509.parse_and_verify_certificates",
];

/// Top-level input keys that only a request with a body has
/// ([`super::input::add_body`]).
const BODY_KEYS: &[&str] = &["parsed_body", "truncated_body"];

/// How one decision was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheUse {
    /// Returned from the cache, without evaluating.
    Hit,
    /// Evaluated, and stored for the next request with the same key.
    Miss,
    /// Evaluated and not stored: caching is off for this snapshot, the
    /// request carries a body, or the decision did not come from
    /// [`super::PolicySnapshot::evaluate`].
    #[default]
    Uncacheable,
}

impl CacheUse {
    /// The `result` label of `portcullis_policy_decision_cache_total`.
    pub fn label(self) -> &'static str {
        match self {
            CacheUse::Hit => "hit",
            CacheUse::Miss => "miss",
            CacheUse::Uncacheable => "uncacheable",
        }
    }
}

/// A path into the input document, `input` first.
pub type Path = Vec<String>;

/// What the load-time scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    /// Minimal read paths: sorted, none a prefix of another.
    pub reads: Vec<Path>,
    /// Why decisions cannot be cached; `None` when they can.
    pub disabled: Option<String>,
    /// `reads` covers every read of the input. False when a module has a
    /// template string, whose reads the scan cannot see; caching is off
    /// then, and the policy is shown the whole document.
    pub reads_complete: bool,
}

/// The decision cache of one policy snapshot. A reload builds a new
/// snapshot with a new, empty cache; nothing carries over.
pub struct DecisionCache {
    analysis: Analysis,
    /// `analysis.reads` without the leading `input`, as the values they
    /// look up and the fields they start in, made once rather than per
    /// request.
    lookups: Vec<input::Lookup>,
    capacity: usize,
    /// `None` when caching is off.
    store: Option<Mutex<Generations>>,
}

impl std::fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache")
            .field("enabled", &self.enabled())
            .field("capacity", &self.capacity)
            .field("entries", &self.len())
            .finish_non_exhaustive()
    }
}

impl DecisionCache {
    pub fn new(analysis: Analysis, capacity: usize) -> Arc<DecisionCache> {
        let store = (analysis.disabled.is_none() && capacity > 0)
            .then(|| Mutex::new(Generations::new(capacity)));
        let lookups = analysis
            .reads
            .iter()
            .map(|p| {
                input::Lookup::new(p.iter().skip(1).map(|s| Value::from(s.as_str())).collect())
            })
            .collect();
        Arc::new(DecisionCache {
            analysis,
            lookups,
            capacity,
            store,
        })
    }

    pub fn enabled(&self) -> bool {
        self.store.is_some()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The analysis the cache was built on (kept when the cache is off, so
    /// a new capacity does not need a new scan).
    pub fn analysis(&self) -> &Analysis {
        &self.analysis
    }

    /// The input document for `facts` as the policy is shown it on the
    /// request path: only the fields it reads when the scan accounts for
    /// every read and each read is of a field [`input::Slot::of`] places,
    /// else the whole document. Built per evaluation, whether or not
    /// caching is on: the scan is the same either way.
    pub fn document(&self, facts: &RequestFacts) -> Value {
        self.analysis
            .reads_complete
            .then(|| input::build_fields(facts, &self.lookups))
            .flatten()
            .unwrap_or_else(|| input::build_input(facts))
    }

    /// Why caching is on or off, for people.
    pub fn reason(&self) -> String {
        if self.capacity == 0 {
            return "turned off (policy.decision_cache = 0)".to_owned();
        }
        match &self.analysis.disabled {
            Some(why) => why.clone(),
            None => format!(
                "the policy reads only input fields that repeat across requests ({}) \
                 and calls no clock, random or network builtin",
                self.reads_display().join(", ")
            ),
        }
    }

    pub fn reads_display(&self) -> Vec<String> {
        self.analysis
            .reads
            .iter()
            .map(|p| display_path(p))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.store.as_ref().map_or(0, |s| lock(s).len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `decision_cache` object of `/policy`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "enabled": self.enabled(),
            "reason": self.reason(),
            "entries": self.len(),
            "capacity": self.capacity,
            "reads": self.reads_display(),
        })
    }

    /// The key of `input`, or `None` when it must be evaluated and not
    /// stored.
    pub fn key(&self, input: &Value) -> Option<Vec<u8>> {
        self.store.as_ref()?;
        if let Value::Object(top) = input {
            if BODY_KEYS.iter().any(|k| top.contains_key(&Value::from(*k))) {
                return None;
            }
        }
        let mut key = Vec::with_capacity(256);
        for lookup in &self.lookups {
            encode_at(input, &lookup.path, 0, &mut key);
        }
        Some(key)
    }

    /// The same key as [`key`](Self::key) gives for the document built from
    /// `facts` (without a body), made from the read fields alone. `None`
    /// when caching is off or a read path needs the whole document.
    pub fn key_for(&self, facts: &RequestFacts) -> Option<Vec<u8>> {
        self.store.as_ref()?;
        let mut key = Vec::with_capacity(256);
        for input::Lookup { path, slot } in &self.lookups {
            let (slot, depth) = (*slot)?;
            let field = slot.field(facts);
            // A string or the header map read whole is encoded straight
            // from the request, without making its value first.
            match field {
                Field::Str(s) | Field::Constant(s) if depth == path.len() => {
                    key.push(b'V');
                    key.push(b's');
                    push_str(&mut key, s);
                }
                Field::Headers(shown) if depth == path.len() => {
                    key.push(b'V');
                    encode_headers(&shown, &mut key);
                }
                // The bytes `encode_value` writes for these values, written
                // from the path and query without making the values: on a
                // hit they would be made only to be encoded.
                Field::FullPath if depth == path.len() => {
                    key.extend_from_slice(b"Vs");
                    match facts.query {
                        Some(q) => {
                            push_len(&mut key, facts.path.len() + 1 + q.len());
                            key.extend_from_slice(facts.path.as_bytes());
                            key.push(b'?');
                            key.extend_from_slice(q.as_bytes());
                        }
                        None => push_str(&mut key, facts.path),
                    }
                }
                Field::ParsedPath if depth == path.len() => {
                    key.extend_from_slice(b"V[");
                    push_len(&mut key, input::raw_path_segments(facts.path).count());
                    for segment in input::path_segments(facts.path) {
                        key.push(b's');
                        push_str(&mut key, &segment);
                    }
                }
                _ => encode_at(&field.value(facts), &path[depth..], depth, &mut key),
            }
        }
        Some(key)
    }

    pub fn get(&self, key: &[u8]) -> Option<Decision> {
        // The guard is a temporary of this statement: the decision is
        // cloned after the lock is released.
        let hit = lock(self.store.as_ref()?).get(key)?;
        Some(Decision::clone(&hit))
    }

    pub fn insert(&self, key: Vec<u8>, decision: &Decision) {
        if let Some(store) = &self.store {
            lock(store).insert(key, Arc::new(decision.clone()));
        }
    }
}

/// A poisoned lock only means a panic elsewhere while the maps were being
/// updated; each map is still a valid map, and a lost entry is a miss.
fn lock(m: &Mutex<Generations>) -> std::sync::MutexGuard<'_, Generations> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// === impl Generations ===

struct Generations {
    young: HashMap<Vec<u8>, Arc<Decision>>,
    old: HashMap<Vec<u8>, Arc<Decision>>,
    /// Entries per generation; the two together never exceed the capacity.
    per_generation: usize,
    /// With a capacity of 1 there is no room for an old generation.
    keep_old: bool,
}

impl Generations {
    fn new(capacity: usize) -> Generations {
        Generations {
            young: HashMap::new(),
            old: HashMap::new(),
            per_generation: (capacity / 2).max(1),
            keep_old: capacity >= 2,
        }
    }

    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    fn get(&mut self, key: &[u8]) -> Option<Arc<Decision>> {
        if let Some(d) = self.young.get(key) {
            return Some(d.clone());
        }
        let (key, d) = self.old.remove_entry(key)?;
        self.insert(key, d.clone());
        Some(d)
    }

    fn insert(&mut self, key: Vec<u8>, decision: Arc<Decision>) {
        if !self.young.contains_key(&key) && self.young.len() >= self.per_generation {
            let young = std::mem::take(&mut self.young);
            self.old = if self.keep_old { young } else { HashMap::new() };
        }
        self.old.remove(&key);
        self.young.insert(key, decision);
    }
}

// === the key ===

/// Appends the value at `path` below `value`, tagged and length-prefixed so
/// that no two different lookups share an encoding. When the walk meets a
/// non-object before the end, the whole value there is encoded: the policy
/// can only derive from it what it contains. `value` is itself `skipped`
/// segments below the document's root, so that depths are counted from the
/// root whichever way the key is made.
fn encode_at(value: &Value, path: &[Value], skipped: usize, out: &mut Vec<u8>) {
    let mut at = value;
    for (depth, segment) in (skipped..).zip(path) {
        match at {
            Value::Object(map) => match map.get(segment) {
                Some(next) => at = next,
                None => {
                    out.push(b'A');
                    push_len(out, depth);
                    return;
                }
            },
            other => {
                out.push(b'P');
                push_len(out, depth);
                encode_value(other, out);
                return;
            }
        }
    }
    out.push(b'V');
    encode_value(at, out);
}

/// `n` in LEB128: seven bits a byte, the high bit set on all but the last.
/// A prefix code, so the key stays unambiguous, and one byte for the
/// lengths a key is made of instead of eight (a key is hashed and compared
/// whole on every lookup).
fn push_len(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    push_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// What [`encode_value`] writes for the document's header object: names
/// in the object's (byte) order, each value as the document has it.
fn encode_headers(shown: &input::InputHeaders, out: &mut Vec<u8>) {
    let entries = shown.entries();
    out.push(b'o');
    push_len(out, entries.len());
    for (name, value) in entries {
        out.push(b's');
        push_str(out, name.as_str());
        out.push(b's');
        push_str(out, &value);
    }
}

fn encode_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.push(b'n'),
        Value::Bool(false) => out.push(b'f'),
        Value::Bool(true) => out.push(b't'),
        // The exact decimal text: shortest round-trip for floats, so two
        // different numbers never share it.
        Value::Number(n) => {
            out.push(b'#');
            push_str(out, &n.format_decimal());
        }
        Value::String(s) => {
            out.push(b's');
            push_str(out, s);
        }
        Value::Array(items) => {
            out.push(b'[');
            push_len(out, items.len());
            for item in items.iter() {
                encode_value(item, out);
            }
        }
        Value::Set(items) => {
            out.push(b'{');
            push_len(out, items.len());
            for item in items.iter_sorted() {
                encode_value(item, out);
            }
        }
        Value::Object(map) => {
            out.push(b'o');
            push_len(out, map.len());
            for (k, v) in map.iter_sorted() {
                encode_value(k, out);
                encode_value(v, out);
            }
        }
        Value::Undefined => out.push(b'u'),
    }
}

/// `input.attributes.request.http.headers`, with segments that are not
/// identifiers in brackets: `input.parsed_query["a-b"]`.
pub fn display_path(path: &[String]) -> String {
    let mut s = String::new();
    for (i, seg) in path.iter().enumerate() {
        if i > 0 && is_ident(seg) {
            s.push('.');
            s.push_str(seg);
        } else if i > 0 {
            let quoted = serde_json::to_string(seg).unwrap_or_default();
            let _ = write!(s, "[{quoted}]");
        } else {
            s.push_str(seg);
        }
    }
    s
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

// === the analysis ===

/// Scans `modules` (file name, source text) as the module doc describes.
pub fn analyze<'a>(modules: impl IntoIterator<Item = (&'a str, &'a str)>) -> Analysis {
    let mut reads: Vec<(Path, String)> = Vec::new();
    let mut disabled: Option<String> = None;
    let mut reads_complete = true;
    for (name, text) in modules {
        let tokens = tokenize(text);
        let template = template_string(name, &tokens);
        reads_complete &= template.is_none();
        if disabled.is_none() {
            disabled = non_deterministic(name, text, &tokens).or(template);
        }
        for (path, line) in input_reads(&tokens) {
            reads.push((path, format!("{name}:{line}")));
        }
    }
    if disabled.is_none() {
        disabled = reads
            .iter()
            .find_map(|(path, at)| volatile_overlap(path, at));
    }
    let mut paths: Vec<Path> = reads.into_iter().map(|(p, _)| p).collect();
    paths.sort();
    paths.dedup();
    // Sorted, a path's prefixes come before it; keeping only paths with no
    // kept prefix leaves the minimal set.
    let mut minimal: Vec<Path> = Vec::with_capacity(paths.len());
    for p in paths {
        if !minimal.iter().any(|m| p.starts_with(m)) {
            minimal.push(p);
        }
    }
    Analysis {
        reads: minimal,
        disabled,
        reads_complete,
    }
}

fn volatile_overlap(path: &[String], at: &str) -> Option<String> {
    let shown = display_path(path);
    for v in VOLATILE {
        let inside = path.len() >= v.len() && path.iter().zip(v.iter()).all(|(a, b)| a == b);
        let contains = path.len() < v.len() && path.iter().zip(v.iter()).all(|(a, b)| a == b);
        let volatile = v.join(".");
        if inside {
            return Some(format!(
                "the policy reads {shown} ({at}), which is {volatile}, different on every request"
            ));
        }
        if contains {
            let what = if path.len() == 1 {
                "the whole input document".to_owned()
            } else {
                shown.clone()
            };
            return Some(format!(
                "the policy reads {what} ({at}), which includes {volatile}, \
                 different on every request"
            ));
        }
    }
    None
}

/// Recent OPA releases have template strings (`$"hello {input.user}"`)
/// whose `{...}` parts are code; regorus 0.14 does not, and the scan reads
/// them as plain strings. Should a later regorus accept them, a `$` glued to a string
/// turns caching off rather than hide a read.
fn template_string(name: &str, tokens: &[Token]) -> Option<String> {
    tokens.windows(2).find_map(|w| {
        (w[0].kind == Kind::Punct(b'$') && w[1].glued && matches!(w[1].kind, Kind::Str(_))).then(
            || {
                format!(
                    "{name}:{} has a template string ($\"...\"), whose input reads the scan \
                     cannot see",
                    w[0].line
                )
            },
        )
    })
}

fn non_deterministic(name: &str, text: &str, tokens: &[Token]) -> Option<String> {
    // Also matched with whitespace and comments removed, in case the
    // parser accepts `time . now_ns()`.
    // `["now_ns"]` is rendered `.now_ns`, in case a call through a
    // bracketed name resolves to the builtin.
    let mut compact = String::with_capacity(text.len());
    let mut i = 0;
    while let Some(t) = tokens.get(i) {
        match (&t.kind, tokens.get(i + 1), tokens.get(i + 2)) {
            (Kind::Punct(b'['), Some(lit), Some(close)) if close.kind == Kind::Punct(b']') => {
                if let Kind::Str(Some(s)) = &lit.kind {
                    compact.push('.');
                    compact.push_str(s);
                    i += 3;
                    continue;
                }
                compact.push('[');
            }
            (Kind::Ident(s) | Kind::Other(s), _, _) => compact.push_str(s),
            (Kind::Punct(c), _, _) => compact.push_str(punct_str(*c)),
            (Kind::Str(_), _, _) => compact.push_str("\"\""),
        }
        i += 1;
    }
    NON_DETERMINISTIC
        .iter()
        .find(|f| text.contains(**f) || compact.contains(**f))
        .map(|f| {
            format!(
                "{name} mentions {f}, whose result depends on more than the input \
                 (clock, randomness, network or environment)"
            )
        })
}

fn punct_str(c: u8) -> &'static str {
    match c {
        b'.' => ".",
        b'[' => "[",
        b']' => "]",
        _ => " ",
    }
}

/// The static read path of every `input` reference, with its line.
fn input_reads(tokens: &[Token]) -> Vec<(Path, u32)> {
    let mut reads = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if t.kind != Kind::Ident("input") {
            continue;
        }
        let prev = i.checked_sub(1).and_then(|p| tokens.get(p));
        // `x.input` is a field named input. Only when the dot is glued to
        // the name: otherwise it counts as a root, which at worst turns
        // caching off.
        if t.glued && prev.is_some_and(|p| p.kind == Kind::Punct(b'.')) {
            continue;
        }
        let with_target = prev.is_some_and(|p| p.kind == Kind::Ident("with"));
        let mut path = vec!["input".to_owned()];
        let mut j = i + 1;
        loop {
            match (tokens.get(j), tokens.get(j + 1), tokens.get(j + 2)) {
                (Some(dot), Some(name), _)
                    if dot.kind == Kind::Punct(b'.') && dot.glued && name.glued =>
                {
                    let Kind::Ident(n) = name.kind else { break };
                    path.push(n.to_owned());
                    j += 2;
                }
                (Some(open), Some(lit), Some(close))
                    if open.kind == Kind::Punct(b'[')
                        && open.glued
                        && close.kind == Kind::Punct(b']') =>
                {
                    let Kind::Str(Some(s)) = &lit.kind else { break };
                    path.push(s.clone());
                    j += 3;
                }
                _ => break,
            }
        }
        if !with_target {
            reads.push((path, t.line));
        }
    }
    reads
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind<'a> {
    Ident(&'a str),
    /// A string or raw string literal, decoded; `None` when its escapes do
    /// not decode (the parser refuses it anyway).
    Str(Option<String>),
    Punct(u8),
    /// Numbers and anything else the scan does not need to understand.
    Other(&'a str),
}

#[derive(Debug)]
struct Token<'a> {
    kind: Kind<'a>,
    /// Nothing (no whitespace, no comment) between it and the previous
    /// token.
    glued: bool,
    line: u32,
}

/// Rego's lexical structure, as far as the scan needs it: `#` comments to
/// the end of the line, `"..."` strings with JSON escapes, `` `...` `` raw
/// strings, ASCII identifiers, numbers, single-character punctuation.
fn tokenize(text: &str) -> Vec<Token<'_>> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    let mut line = 1u32;
    let mut glued = false;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\n' => {
                line += 1;
                glued = false;
                i += 1;
            }
            b' ' | b'\t' | b'\r' => {
                glued = false;
                i += 1;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                glued = false;
            }
            b'"' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    // Skips the escaped byte, so `\"` does not end the string.
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                if bytes.get(i) == Some(&b'"') {
                    i += 1;
                }
                i = i.min(bytes.len());
                let lit = text.get(start..i).unwrap_or("");
                tokens.push(Token {
                    kind: Kind::Str(serde_json::from_str::<String>(lit).ok()),
                    glued,
                    line,
                });
                glued = true;
            }
            b'`' => {
                let start = i + 1;
                i += 1;
                let token_line = line;
                while i < bytes.len() && bytes[i] != b'`' {
                    if bytes[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
                let lit = text.get(start..i).map(str::to_owned);
                i = (i + 1).min(bytes.len());
                tokens.push(Token {
                    kind: Kind::Str(lit),
                    glued,
                    line: token_line,
                });
                glued = true;
            }
            _ if c.is_ascii_alphabetic() || c == b'_' || c.is_ascii_digit() => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let word = text.get(start..i).unwrap_or("");
                let kind = if c.is_ascii_digit() {
                    Kind::Other(word)
                } else {
                    Kind::Ident(word)
                };
                tokens.push(Token { kind, glued, line });
                glued = true;
            }
            _ if c.is_ascii() => {
                tokens.push(Token {
                    kind: Kind::Punct(c),
                    glued,
                    line,
                });
                glued = true;
                i += 1;
            }
            _ => {
                // A non-ASCII character outside a string: not Rego syntax;
                // skip the whole UTF-8 sequence.
                let start = i;
                i += 1;
                while i < bytes.len() && (bytes[i] & 0xC0) == 0x80 {
                    i += 1;
                }
                tokens.push(Token {
                    kind: Kind::Other(text.get(start..i).unwrap_or("")),
                    glued,
                    line,
                });
                glued = true;
            }
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySnapshot;
    use std::time::Duration;

    fn analyze_one(text: &str) -> Analysis {
        analyze([("p.rego", text)])
    }

    fn reads(text: &str) -> Vec<String> {
        let a = analyze_one(text);
        assert_eq!(a.disabled, None, "{text}");
        a.reads.iter().map(|p| display_path(p)).collect()
    }

    fn disabled_because(text: &str) -> String {
        match analyze_one(text).disabled {
            Some(why) => why,
            None => panic!("caching stayed on for {text:?}"),
        }
    }

    const HEAD: &str = "package t\nimport rego.v1\n";

    #[test]
    fn non_volatile_reads_are_cacheable_with_their_paths() {
        let text = format!(
            "{HEAD}allow if input.attributes.request.http.method == \"GET\"\n\
             allow if input.parsed_path[0] == \"v1\"\n\
             allow if input.attributes.request.http.headers[h] == \"x\"\n\
             allow if input[\"source\"][\"trust_domain\"] == data.td\n\
             allow if input.source.trust_domain.x == 1\n\
             allow if input.parsed_query[`a-b`]\n"
        );
        assert_eq!(
            reads(&text),
            [
                "input.attributes.request.http.headers",
                "input.attributes.request.http.method",
                "input.parsed_path",
                "input.parsed_query[\"a-b\"]",
                "input.source.trust_domain",
            ]
        );
    }

    #[test]
    fn each_volatile_read_turns_caching_off_and_names_it() {
        let cases = [
            ("allow if count(input) > 0", "the whole input document"),
            ("allow if walk(input, _)", "the whole input document"),
            ("x := input.attributes\nallow if x", "input.attributes"),
            (
                "allow if input.attributes.request",
                "input.attributes.request",
            ),
            ("allow if input.attributes.source.principal", ""),
            (
                "allow if input.attributes.request.http[k]",
                "input.attributes.request.http",
            ),
            (
                "allow if input.attributes.request.time",
                "input.attributes.request.time",
            ),
            (
                "allow if input.attributes.request.http.id",
                "input.attributes.request.http.id",
            ),
            (
                "allow if input[\"attributes\"][\"request\"][\"time\"] != \"\"",
                "input.attributes.request.time",
            ),
            // Escapes are decoded before comparing.
            (
                "allow if input[\"attrib\\u0075tes\"][\"request\"].time",
                "input.attributes.request.time",
            ),
            (
                "allow if input.attributes.source.address.socketAddress.portValue > 1024",
                "input.attributes.source.address.socketAddress.portValue",
            ),
            (
                "import input.attributes as a\nallow if a.destination",
                "input.attributes",
            ),
            (
                "import input\nallow if input.parsed_path",
                "the whole input document",
            ),
            (
                "allow if f(input)\nf(x) := true",
                "the whole input document",
            ),
            ("allow if input .attributes", "the whole input document"),
        ];
        for (body, named) in cases {
            let text = format!("{HEAD}{body}\n");
            let a = analyze_one(&text);
            if named.is_empty() {
                assert_eq!(a.disabled, None, "{body}");
                continue;
            }
            let why = a.disabled.unwrap_or_else(|| panic!("stayed on: {body}"));
            assert!(why.contains(named), "{body}: {why}");
            assert!(why.contains("p.rego:3"), "{body}: {why}");
        }
    }

    #[test]
    fn non_deterministic_builtins_turn_caching_off() {
        for (body, named) in [
            ("allow if time.now_ns() > 0", "time.now_ns"),
            (
                "allow if io.jwt.decode_verify(input.parsed_path[0], {\"secret\": \"s\"})[0]",
                "io.jwt.decode_verify",
            ),
            ("allow if rand.intn(\"x\", 2) == 1", "rand.intn"),
            ("allow if uuid.rfc4122(\"k\")", "uuid.rfc4122"),
            ("allow if opa.runtime().env", "opa.runtime"),
            ("allow if http.send({})", "http.send"),
            // Mentioned in a comment: conservative.
            (
                "# we used to call time.now_ns() here\nallow if input.parsed_path",
                "time.now_ns",
            ),
            ("allow if time . now_ns() > 0", "time.now_ns"),
            ("allow if time[\"now_ns\"]() > 0", "time.now_ns"),
            (
                "allow if $\"{input.attributes}\" != \"\"",
                "template string",
            ),
        ] {
            let why = disabled_because(&format!("{HEAD}{body}\n"));
            assert!(
                why.contains(named) && why.contains("p.rego"),
                "{body}: {why}"
            );
        }
        // Deterministic neighbours stay cacheable.
        reads(&format!(
            "{HEAD}allow if time.parse_rfc3339_ns(\"2026-01-01T00:00:00Z\") > 0\n\
             allow if io.jwt.decode(input.parsed_path[0])[1].sub == \"a\"\n\
             allow if uuid.parse(\"x\")\nallow if print(\"x\")\nallow if trace(\"x\")\n"
        ));
    }

    #[test]
    fn comments_strings_and_other_names_are_not_reads() {
        let text = format!(
            "{HEAD}# input.attributes.request.time and input\n\
             inputs := {{\"a\": 1}}\n\
             my_input := inputs.a\n\
             obj := {{\"input\": \"input.attributes\", \"x\": `input[\"attributes\"]\n input`}}\n\
             esc := \"\\\"input\\\" # input\"\n\
             allow if obj.input == my_input # input\n\
             allow if data.input.x\n\
             allow if input.parsed_path[0] == \"input\"\n"
        );
        assert_eq!(reads(&text), ["input.parsed_path"]);
    }

    #[test]
    fn with_targets_are_not_reads_but_their_values_are() {
        let test = "package t_test\nimport rego.v1\n\
                    test_a if data.t.allow with input as {\"parsed_path\": [\"v1\"]}\n\
                    test_b if data.t.allow with input.attributes.request.time as \"x\"\n\
                    test_c if data.t.allow with input[\"attributes\"] as {}\n";
        let policy = format!("{HEAD}allow if input.parsed_path[0] == \"v1\"\n");
        let a = analyze([("p.rego", policy.as_str()), ("p_test.rego", test)]);
        assert_eq!(a.disabled, None);
        assert_eq!(
            a.reads,
            [vec!["input".to_owned(), "parsed_path".to_owned()]]
        );

        let leaks = format!("{HEAD}allow if data.t.inner with input as input\ninner := true\n");
        assert!(disabled_because(&leaks).contains("the whole input document"));
        let leaks =
            format!("{HEAD}allow if data.t.inner with input.x as input.attributes.request.time\n");
        assert!(disabled_because(&leaks).contains("input.attributes.request.time"));
    }

    #[test]
    fn a_read_path_covers_those_below_it() {
        let text = format!(
            "{HEAD}allow if input.source.path\nallow if input.source\nallow if input.source.x.y\n\
             allow if input.parsed_path\nallow if input.parsed_path\n"
        );
        assert_eq!(reads(&text), ["input.parsed_path", "input.source"]);
    }

    fn v(json: &str) -> Value {
        Value::from_json_str(json).unwrap()
    }

    /// An analysis that found `reads` and nothing that turns caching off.
    fn known(reads: Vec<Path>) -> Analysis {
        Analysis {
            reads,
            disabled: None,
            reads_complete: true,
        }
    }

    fn cache(paths: &[&str]) -> Arc<DecisionCache> {
        let reads = paths
            .iter()
            .map(|p| p.split('.').map(str::to_owned).collect())
            .collect();
        DecisionCache::new(known(reads), 100)
    }

    #[test]
    fn keys_differ_exactly_when_a_read_value_differs() {
        let c = cache(&["input.a", "input.b.c"]);
        let key = |j: &str| c.key(&v(j)).unwrap();
        let base = key(r#"{"a": 1, "b": {"c": "x"}, "z": 1}"#);
        assert_eq!(base, key(r#"{"a": 1, "b": {"c": "x", "d": 2}, "z": 2}"#));
        let different = [
            r#"{"a": 2, "b": {"c": "x"}}"#,
            r#"{"a": 1.5, "b": {"c": "x"}}"#,
            r#"{"a": "1", "b": {"c": "x"}}"#,
            r#"{"a": [1], "b": {"c": "x"}}"#,
            r#"{"a": {"1": 1}, "b": {"c": "x"}}"#,
            r#"{"a": null, "b": {"c": "x"}}"#,
            r#"{"b": {"c": "x"}}"#,
            r#"{"a": 1, "b": {"c": "x "}}"#,
            r#"{"a": 1, "b": {}}"#,
            r#"{"a": 1, "b": "c"}"#,
            r#"{"a": 1, "b": ["c"]}"#,
            r#"{"a": 1}"#,
        ];
        let mut seen = vec![base];
        for d in different {
            let k = key(d);
            assert!(!seen.contains(&k), "{d} collides");
            seen.push(k);
        }
        // Moving bytes between adjacent strings changes the key.
        assert_ne!(
            key(r#"{"a": "ab", "b": {"c": "c"}}"#),
            key(r#"{"a": "a", "b": {"c": "bc"}}"#)
        );
        // Absent and null, empty string, empty object all differ.
        let c = cache(&["input.a"]);
        let keys: Vec<_> = [
            r#"{}"#,
            r#"{"a": null}"#,
            r#"{"a": ""}"#,
            r#"{"a": {}}"#,
            "[]",
        ]
        .iter()
        .map(|j| c.key(&v(j)).unwrap())
        .collect();
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn inputs_with_a_body_are_not_keyed() {
        let c = cache(&["input.a"]);
        assert!(c.key(&v(r#"{"a": 1}"#)).is_some());
        assert!(c.key(&v(r#"{"a": 1, "truncated_body": false}"#)).is_none());
        assert!(c
            .key(&v(
                r#"{"a": 1, "parsed_body": {}, "truncated_body": false}"#
            ))
            .is_none());
    }

    #[test]
    fn disabled_or_zero_capacity_caches_nothing() {
        let off = DecisionCache::new(
            Analysis {
                reads: vec![],
                disabled: Some("because".into()),
                reads_complete: true,
            },
            10,
        );
        assert!(!off.enabled());
        assert!(off.key(&v("{}")).is_none());
        assert_eq!(off.reason(), "because");
        let zero = DecisionCache::new(known(vec![]), 0);
        assert!(!zero.enabled());
        assert!(zero.key(&v("{}")).is_none());
        zero.insert(vec![], &Decision::default());
        assert_eq!(zero.len(), 0);
        assert!(zero.reason().contains("policy.decision_cache = 0"));
    }

    #[test]
    fn capacity_bounds_the_entries_and_in_use_entries_survive_turnover() {
        for capacity in [1, 2, 3, 10, 101] {
            let c = DecisionCache::new(known(vec![]), capacity);
            let hot = b"hot".to_vec();
            for i in 0..1000u32 {
                c.insert(i.to_be_bytes().to_vec(), &Decision::default());
                assert!(c.len() <= capacity, "{capacity}: {}", c.len());
                if capacity >= 2 {
                    if c.get(&hot).is_none() {
                        assert!(i == 0, "hot entry lost at {i} with capacity {capacity}");
                        c.insert(hot.clone(), &Decision::default());
                    }
                    assert!(c.len() <= capacity);
                }
            }
        }
    }

    /// Lengths are written so that a reader can always tell where one ends:
    /// each decodes back to itself, and no encoding is a prefix of another
    /// (so two keys built from different values cannot run together).
    #[test]
    fn lengths_are_a_prefix_code() {
        fn decode(bytes: &[u8]) -> (usize, usize) {
            let mut n = 0usize;
            for (i, b) in bytes.iter().enumerate() {
                n |= usize::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    return (n, i + 1);
                }
            }
            panic!("unterminated length {bytes:?}");
        }
        let mut values: Vec<usize> = (0..=1000).collect();
        for shift in [7, 14, 21, 28, 35, 42, 49, 56, 63] {
            let p = 1usize << shift;
            values.extend([p - 1, p, p + 1]);
        }
        values.push(usize::MAX);
        values.sort_unstable();
        values.dedup();
        let encoded: Vec<Vec<u8>> = values
            .iter()
            .map(|&n| {
                let mut out = Vec::new();
                push_len(&mut out, n);
                out
            })
            .collect();
        for (n, bytes) in values.iter().zip(&encoded) {
            assert_eq!(decode(bytes), (*n, bytes.len()), "{n}");
        }
        assert_eq!(encoded[5], [5]);
        assert_eq!(encoded[300], [0xac, 0x02]);
        for (a, x) in encoded.iter().enumerate() {
            for (b, y) in encoded.iter().enumerate() {
                assert!(a == b || !y.starts_with(x), "{x:?} is a prefix of {y:?}");
            }
        }
    }

    /// Every path through an input document, `input` first.
    fn every_path(document: &Value) -> Vec<Path> {
        let mut paths = Vec::new();
        paths_through(document, &mut vec!["input".to_owned()], &mut paths);
        paths
    }

    /// Every path through `value` (prefixes included), one segment past
    /// each leaf, and an absent name inside every object.
    fn paths_through(value: &Value, prefix: &mut Vec<String>, out: &mut Vec<Path>) {
        out.push(prefix.clone());
        match value {
            Value::Object(map) => {
                for (k, v) in map.iter() {
                    if let Value::String(k) = k {
                        prefix.push(k.to_string());
                        paths_through(v, prefix, out);
                        prefix.pop();
                    }
                }
                prefix.push("absent".to_owned());
                out.push(prefix.clone());
                prefix.pop();
            }
            _ => {
                prefix.push("below".to_owned());
                out.push(prefix.clone());
                prefix.pop();
            }
        }
    }

    /// A request from the checkout workload.
    fn request<'a>(
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a http::HeaderMap,
    ) -> RequestFacts<'a> {
        RequestFacts {
            request_id: "req-1",
            method,
            path,
            query,
            host: "payments",
            scheme: "https",
            protocol: "HTTP/1.1",
            headers: input::InputHeaders::all(headers),
            source_spiffe_id: "spiffe://pay.example/ns/shop/sa/checkout",
            source_trust_domain: "pay.example",
            source_path: "/ns/shop/sa/checkout",
            source_addr: "127.0.0.1:4000".parse().unwrap(),
            destination_spiffe_id: "spiffe://pay.example/ns/pay/sa/payments",
            time: std::time::SystemTime::now(),
        }
    }

    #[test]
    fn keys_made_from_request_fields_are_the_keys_of_the_document() {
        let mut headers = http::HeaderMap::new();
        headers.append("idempotency-key", http::HeaderValue::from_static("k-1"));
        headers.append(
            "x-forwarded-for",
            http::HeaderValue::from_static("10.0.0.1"),
        );
        headers.append(
            "x-forwarded-for",
            http::HeaderValue::from_static("10.0.0.2"),
        );
        headers.append("x-bin", http::HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let empty = http::HeaderMap::new();
        let requests = [
            ("GET", "/v1/payments/42", Some("a=1&a=2&b"), &headers),
            ("BREW", "/", None, &empty),
            ("POST", "/v1/a%20b/", Some(""), &headers),
        ];
        let mut resolved = 0;
        for (method, path, query, headers) in requests {
            let facts = request(method, path, query, headers);
            let document = input::build_input(&facts);
            let paths = every_path(&document);
            for path in paths {
                let c = DecisionCache::new(known(vec![path.clone()]), 10);
                if let Some(k) = c.key_for(&facts) {
                    assert_eq!(k, c.key(&document).unwrap(), "{}", display_path(&path));
                    resolved += 1;
                }
            }
        }
        // The fields `input::Slot::of` places, and the paths below them.
        assert!(resolved > 40, "only {resolved} paths resolved from fields");

        // The shipped policy is keyed without building the document.
        let shipped = analyze([("authz.rego", include_str!("../../policies/authz.rego"))]);
        assert_eq!(shipped.disabled, None);
        let c = DecisionCache::new(shipped, 10);
        let facts = request("GET", "/v1/payments/42", None, &headers);
        assert_eq!(
            c.key_for(&facts),
            c.key(&input::build_input(&facts)),
            "reads: {:?}",
            c.reads_display()
        );
        assert!(c.key_for(&facts).is_some());
    }

    /// The document cut down to the policy's reads has, at each read path,
    /// exactly what the whole document has there, for reads alone and in
    /// pairs (which share parent objects); the fields it leaves out are gone.
    #[test]
    fn the_document_cut_to_the_reads_agrees_with_the_whole_at_every_read() {
        let mut headers = http::HeaderMap::new();
        headers.insert("idempotency-key", http::HeaderValue::from_static("k-1"));
        headers.append("x-a", http::HeaderValue::from_static("1"));
        headers.append("x-a", http::HeaderValue::from_static("2"));
        let empty = http::HeaderMap::new();
        let requests = [
            ("GET", "/v1/payments/42", Some("a=1&a=2&b"), &headers),
            ("POST", "/v1/a%20b/", Some(""), &empty),
            ("BREW", "/", None, &headers),
        ];
        let mut cut = 0;
        for (method, path, query, headers) in requests {
            let facts = request(method, path, query, headers);
            let whole = input::build_input(&facts);
            let paths = every_path(&whole);
            let pairs = paths.iter().flat_map(|a| {
                paths
                    .iter()
                    .filter(move |b| !b.starts_with(a) && !a.starts_with(b))
                    .map(move |b| vec![a.clone(), b.clone()])
            });
            let sets = paths.iter().map(|p| vec![p.clone()]).chain(pairs);
            for reads in sets {
                let c = DecisionCache::new(known(reads), 0);
                let document = c.document(&facts);
                if document == whole {
                    continue;
                }
                cut += 1;
                for (path, lookup) in c.analysis.reads.iter().zip(&c.lookups) {
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    encode_at(&document, &lookup.path, 0, &mut a);
                    encode_at(&whole, &lookup.path, 0, &mut b);
                    assert_eq!(a, b, "{} in {document}", display_path(path));
                }
            }
        }
        assert!(cut > 1000, "only {cut} documents were cut down");

        // The shipped policy's document: what it reads, not the rest.
        let shipped = analyze([("authz.rego", include_str!("../../policies/authz.rego"))]);
        let c = DecisionCache::new(shipped, 0);
        let facts = request("GET", "/v1/payments/42", Some("a=1"), &headers);
        let document = c.document(&facts);
        let at = |doc: &Value, path: &[&str]| {
            let lookup: Vec<Value> = path.iter().map(|s| Value::from(*s)).collect();
            let mut out = Vec::new();
            encode_at(doc, &lookup, 0, &mut out);
            out.first() == Some(&b'V')
        };
        for read in [
            &["attributes", "request", "http", "headers"][..],
            &["attributes", "request", "http", "path"],
            &["attributes", "source", "principal"],
            &["parsed_path"],
            &["source", "trust_domain"],
        ] {
            assert!(at(&document, read), "{read:?} missing from {document}");
        }
        for left_out in [
            &["attributes", "request", "time"][..],
            &["attributes", "request", "http", "id"],
            &["attributes", "source", "address"],
            &["parsed_query"],
        ] {
            assert!(at(&input::build_input(&facts), left_out));
            assert!(!at(&document, left_out), "{left_out:?} in {document}");
        }
    }

    /// Where the scan cannot see every read, or a read is of something
    /// `input::Slot::of` does not place, the policy gets the whole document.
    #[test]
    fn the_whole_document_when_the_reads_are_not_all_known() {
        let headers = http::HeaderMap::new();
        let facts = request("GET", "/v1/payments/42", None, &headers);
        let whole = input::build_input(&facts);
        let template =
            "package t\nimport rego.v1\nx := $\"{input.a}\"\nallow if input.parsed_path\n";
        let a = analyze([("t.rego", template)]);
        assert!(!a.reads_complete);
        assert_eq!(DecisionCache::new(a, 10).document(&facts), whole);
        for text in [
            "package t\nimport rego.v1\nallow if input.attributes.request\n",
            "package t\nimport rego.v1\nallow if input.attributes.request.time\n",
            "package t\nimport rego.v1\nallow if count(input) > 0\n",
        ] {
            let a = analyze([("t.rego", text)]);
            assert!(a.reads_complete);
            assert_eq!(DecisionCache::new(a, 10).document(&facts), whole, "{text}");
        }
    }

    // === through a snapshot ===

    fn snapshot(files: &[(&str, &str)]) -> (PolicySnapshot, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let snap =
            PolicySnapshot::load(dir.path(), "data.t.allow", Duration::from_secs(1)).unwrap();
        (snap, dir)
    }

    /// The shipped policy decides every request the same on the cut-down
    /// document as on the whole one: allowed, denied, and for the reason.
    #[test]
    fn the_shipped_policy_decides_alike_on_the_cut_document() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let snap =
            PolicySnapshot::load(&dir, "data.portcullis.authz.allow", Duration::from_secs(5))
                .unwrap()
                .with_decision_cache(0);
        let mut with_key = http::HeaderMap::new();
        with_key.insert("idempotency-key", http::HeaderValue::from_static("k-1"));
        let mut blank_key = http::HeaderMap::new();
        blank_key.insert("idempotency-key", http::HeaderValue::from_static(""));
        let none = http::HeaderMap::new();
        let callers = [
            ("spiffe://pay.example/ns/shop/sa/checkout", "pay.example"),
            ("spiffe://pay.example/ns/support/sa/refunds", "pay.example"),
            (
                "spiffe://pay.example/ns/finance/sa/reporting",
                "pay.example",
            ),
            ("spiffe://pay.example/ns/shop/sa/frontend", "pay.example"),
            (
                "spiffe://other.example/ns/shop/sa/checkout",
                "other.example",
            ),
        ];
        let paths = [
            "/v1/payments",
            "/v1/payments/pay_1",
            "/v1/payments/pay_1/refunds",
            "/v1/reports/2026/11",
            "/healthz",
            "/",
        ];
        let (mut allowed, mut denied) = (0, 0);
        for (principal, trust_domain) in callers {
            for method in ["GET", "POST"] {
                for path in paths {
                    for headers in [&with_key, &blank_key, &none] {
                        let facts = RequestFacts {
                            source_spiffe_id: principal,
                            source_trust_domain: trust_domain,
                            ..request(method, path, Some("q=1"), headers)
                        };
                        let cut = snap.evaluate_request(&facts, None).unwrap();
                        let whole = snap.evaluate(input::build_input(&facts)).unwrap();
                        // Decision's equality includes the reason.
                        assert_eq!(cut, whole, "{principal} {method} {path} {headers:?}");
                        if cut.allowed {
                            allowed += 1;
                        } else {
                            denied += 1;
                        }
                    }
                }
            }
        }
        assert!(
            allowed >= 10 && denied >= 100,
            "{allowed} allowed, {denied} denied"
        );
    }

    /// With `policy.input_headers` the key holds the listed headers only:
    /// a request that differs in another (a trace id) is the same request
    /// to the policy and hits; one that differs in a listed header misses,
    /// and both decide as the whole, filtered document does.
    #[test]
    fn with_an_allowlist_unlisted_headers_neither_key_nor_decide() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let only = std::sync::Arc::new(input::HeaderAllowlist::new([
            http::HeaderName::from_static("idempotency-key"),
        ]));
        let snap =
            PolicySnapshot::load(&dir, "data.portcullis.authz.allow", Duration::from_secs(5))
                .unwrap()
                .with_input_headers(Some(only))
                .unwrap();
        let traced = |trace: &'static str, key: Option<&'static str>| {
            let mut h = http::HeaderMap::new();
            h.insert("traceparent", http::HeaderValue::from_static(trace));
            if let Some(k) = key {
                h.insert("idempotency-key", http::HeaderValue::from_static(k));
            }
            h
        };
        let decide = |h: &http::HeaderMap, method: &str| {
            let facts = RequestFacts {
                headers: snap.input_headers(h),
                ..request(method, "/v1/payments", None, h)
            };
            let key = snap.decision_cache().key_for(&facts).unwrap();
            let whole = input::build_input(&facts);
            assert_eq!(Some(&key), snap.decision_cache().key(&whole).as_ref());
            let d = snap.evaluate_request(&facts, None).unwrap();
            let mut reference = d.clone();
            reference.cache = CacheUse::Miss;
            let mut evaluated = snap.evaluate(whole).unwrap();
            evaluated.cache = CacheUse::Miss;
            assert_eq!(reference, evaluated);
            (key, d)
        };
        let (k1, d1) = decide(&traced("00-aa-01", Some("k-1")), "POST");
        let (k2, d2) = decide(&traced("00-bb-01", Some("k-1")), "POST");
        let (k3, d3) = decide(&traced("00-cc-01", Some("k-2")), "POST");
        let (_, d4) = decide(&traced("00-dd-01", None), "POST");
        assert_eq!(k1, k2);
        assert_ne!(k1, k3);
        assert!(d1.allowed && d2.allowed && d3.allowed);
        assert_eq!(d2.cache, CacheUse::Hit);
        assert_eq!(d3.cache, CacheUse::Miss);
        assert!(!d4.allowed, "{d4:?}");
        assert!(
            d4.reason
                .as_deref()
                .unwrap_or("")
                .contains("idempotency-key"),
            "{d4:?}"
        );
        let doc = input::build_input_json(&RequestFacts {
            headers: snap.input_headers(&traced("00-ee-01", Some("k-1"))),
            ..request("GET", "/", None, &http::HeaderMap::new())
        });
        assert_eq!(
            doc["attributes"]["request"]["http"]["headers"],
            serde_json::json!({"idempotency-key": "k-1"})
        );
    }

    #[test]
    fn a_policy_reading_the_request_time_never_hits() {
        let (snap, _d) = snapshot(&[(
            "a.rego",
            "package t\nimport rego.v1\nallow if input.attributes.request.time != \"\"\n",
        )]);
        assert!(!snap.decision_cache().enabled());
        let input = v(r#"{"attributes": {"request": {"time": "t"}}}"#);
        for _ in 0..3 {
            let d = snap.evaluate(input.clone()).unwrap();
            assert!(d.allowed);
            assert_eq!(d.cache, CacheUse::Uncacheable);
        }
        assert_eq!(snap.decision_cache().len(), 0);
    }

    #[test]
    fn errors_are_not_cached() {
        let (snap, _d) = snapshot(&[(
            "a.rego",
            "package t\nimport rego.v1\nallow := x if { x := input.a }\nallow := y if { y := input.b }\n",
        )]);
        assert!(
            snap.decision_cache().enabled(),
            "{}",
            snap.decision_cache().reason()
        );
        let conflict = v(r#"{"a": true, "b": false}"#);
        for _ in 0..2 {
            assert!(snap.evaluate(conflict.clone()).is_err());
        }
        assert_eq!(snap.decision_cache().len(), 0);
        let fine = v(r#"{"a": true}"#);
        assert_eq!(snap.evaluate(fine.clone()).unwrap().cache, CacheUse::Miss);
        assert_eq!(snap.evaluate(fine).unwrap().cache, CacheUse::Hit);
    }

    #[test]
    fn a_new_snapshot_starts_with_an_empty_cache() {
        let files = [("a.rego", "package t\nimport rego.v1\nallow if input.ok\n")];
        let (first, dir) = snapshot(&files);
        let input = v(r#"{"ok": true}"#);
        first.evaluate(input.clone()).unwrap();
        assert_eq!(first.evaluate(input.clone()).unwrap().cache, CacheUse::Hit);
        let second =
            PolicySnapshot::load(dir.path(), "data.t.allow", Duration::from_secs(1)).unwrap();
        assert_eq!(second.decision_cache().len(), 0);
        assert_eq!(
            second.evaluate(input.clone()).unwrap().cache,
            CacheUse::Miss
        );
        // A new capacity is a new, empty cache too.
        let resized = first.with_decision_cache(5);
        assert_eq!(resized.decision_cache().capacity(), 5);
        assert_eq!(resized.evaluate(input).unwrap().cache, CacheUse::Miss);
    }
}
