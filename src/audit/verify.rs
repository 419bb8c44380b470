//! Checks a trail: every line's hash, every link, every sequence number,
//! across restarts and rotated files, and names the first broken line with
//! the most likely cause.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::chain::{Hasher, GENESIS};

/// The first broken line: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The file, when verifying files; `None` for [`verify`] on text.
    pub file: Option<PathBuf>,
    /// 1-based line number within that file.
    pub line: usize,
    pub why: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(p) => write!(f, "{}:{}: {}", p.display(), self.line, self.why),
            None => write!(f, "line {}: {}", self.line, self.why),
        }
    }
}

/// What an intact trail holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    pub events: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: String,
    /// The trail starts with a rotation event whose predecessor file was
    /// not given (rotated away): the hash it continues from.
    pub continues_from: Option<String>,
    /// `gap` events. The chain is intact around them, but the writer could
    /// not record everything.
    pub gaps: Vec<Gap>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub file: Option<PathBuf>,
    pub line: usize,
    /// Events that could not be written.
    pub lost: u64,
    /// Requests refused because their record could not be reserved.
    pub refused: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks one trail with plain SHA-256 hashes. Returns the number of events
/// verified, or the first broken line (1-based) and why.
pub fn verify(text: &str) -> Result<u64, (usize, String)> {
    verify_text(text, &Hasher::Sha256)
        .map(|v| v.events)
        .map_err(|b| (b.line, b.why))
}

pub fn verify_text(text: &str, hasher: &Hasher) -> Result<Verified, Broken> {
    let lines: Vec<Line<'_>> = text
        .lines()
        .enumerate()
        .map(|(i, t)| Line {
            file: None,
            no: i + 1,
            text: t,
        })
        .collect();
    walk(&lines, hasher)
}

/// Checks the files as one trail. They may be given in any order (a shell
/// glob sorts `audit.log` before `audit.log.1`): they are put in chain
/// order by the sequence number of their first event.
pub fn verify_files(paths: &[PathBuf], hasher: &Hasher) -> Result<Verified, VerifyFilesError> {
    let mut texts = Vec::with_capacity(paths.len());
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|source| Error::Read {
            path: p.clone(),
            source,
        })?;
        texts.push((p.clone(), text));
    }
    texts.sort_by_key(|(_, t)| first_seq(t).unwrap_or(u64::MAX));
    let mut lines = Vec::new();
    for (p, text) in &texts {
        lines.extend(text.lines().enumerate().map(|(i, t)| Line {
            file: Some(p.as_path()),
            no: i + 1,
            text: t,
        }));
    }
    Ok(walk(&lines, hasher)?)
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyFilesError {
    #[error(transparent)]
    Io(#[from] Error),
    #[error("{0}")]
    Broken(#[from] Broken),
}

impl std::error::Error for Broken {}

fn first_seq(text: &str) -> Option<u64> {
    let first = text.lines().next()?;
    serde_json::from_str::<serde_json::Value>(first)
        .ok()?
        .get("seq")?
        .as_u64()
}

struct Line<'a> {
    file: Option<&'a Path>,
    no: usize,
    text: &'a str,
}

/// The fields the chain needs from one line.
struct Parsed<'a> {
    hash: &'a str,
    /// The line's recomputed hash matches its `hash` field.
    sound: bool,
    prev: String,
    seq: Option<u64>,
    kind: String,
    lost: Option<u64>,
    refused: Option<u64>,
}

fn parse<'a>(line: &'a str, hasher: &Hasher) -> Result<Parsed<'a>, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("bad JSON: {e}"))?;
    let hash_value = value
        .get("hash")
        .and_then(|h| h.as_str())
        .ok_or("bad JSON: no hash field")?;
    let suffix = format!(",\"hash\":\"{hash_value}\"}}");
    let body = line
        .strip_suffix(&suffix)
        .ok_or("edited: the hash is not the last field")?;
    // Borrow the hash from the line itself so the index can hold it.
    let hash = &line[body.len() + 9..line.len() - 2];
    let sound = hasher.hash(format!("{body}}}").as_bytes()) == hash;
    Ok(Parsed {
        hash,
        sound,
        prev: value
            .get("prev")
            .and_then(|p| p.as_str())
            .unwrap_or("")
            .to_owned(),
        seq: value.get("seq").and_then(|s| s.as_u64()),
        kind: value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_owned(),
        lost: value.get("lost").and_then(|l| l.as_u64()),
        refused: value.get("refused").and_then(|l| l.as_u64()),
    })
}

fn walk(lines: &[Line<'_>], hasher: &Hasher) -> Result<Verified, Broken> {
    let broken = |i: usize, why: String| Broken {
        file: lines[i].file.map(Path::to_owned),
        line: lines[i].no,
        why,
    };
    let parsed: Vec<Result<Parsed<'_>, String>> =
        lines.iter().map(|l| parse(l.text, hasher)).collect();
    // Where each hash occurs, to tell a reordered line from a removed one.
    let mut index: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, p) in parsed.iter().enumerate() {
        if let Ok(p) = p {
            index.entry(p.hash).or_default().push(i);
        }
    }
    let keyed = matches!(hasher, Hasher::Hmac(_));

    let mut out = Verified::default();
    let mut prev = GENESIS.to_string();
    let mut expected_seq: Option<u64> = None;
    for (i, p) in parsed.iter().enumerate() {
        let p = p.as_ref().map_err(|e| broken(i, e.clone()))?;
        if !p.sound {
            // A line whose successor still links to the line before it was
            // slipped in, not changed.
            let next_links_past = parsed
                .get(i + 1)
                .and_then(|n| n.as_ref().ok())
                .is_some_and(|n| n.prev == prev);
            let why = if next_links_past {
                "inserted: this line's hash does not match its content and the next line links to the line before it".to_string()
            } else if keyed {
                "edited: the HMAC does not match the line (changed, forged, or not written under this key)".to_string()
            } else {
                "edited: the hash does not match the line's content (or the trail is HMAC-keyed: pass --key-file)".to_string()
            };
            return Err(broken(i, why));
        }
        if i == 0 {
            if p.prev != GENESIS {
                if p.kind == "rotated" {
                    // The file before this one was rotated away or not given.
                    out.continues_from = Some(p.prev.clone());
                    prev = p.prev.clone();
                } else {
                    return Err(broken(
                        i,
                        "removed: the trail does not start at the beginning of a chain (earlier lines or files are missing)".into(),
                    ));
                }
            }
            out.first_seq = p.seq.unwrap_or(0);
        }
        if p.prev != prev {
            return Err(link_error(lines, &parsed, &index, i, p, expected_seq));
        }
        match (p.seq, expected_seq) {
            (Some(seq), Some(exp)) if seq != exp => {
                return Err(broken(
                    i,
                    format!("edited: seq {seq} where {exp} was expected"),
                ))
            }
            (None, _) => return Err(broken(i, "bad JSON: no seq field".into())),
            _ => {}
        }
        let seq = p.seq.unwrap_or(0);
        expected_seq = Some(seq + 1);
        if p.kind == "gap" {
            out.gaps.push(Gap {
                file: lines[i].file.map(Path::to_owned),
                line: lines[i].no,
                lost: p.lost.unwrap_or(0),
                refused: p.refused.unwrap_or(0),
            });
        }
        out.events += 1;
        out.last_seq = seq;
        prev = p.hash.to_string();
    }
    out.last_hash = prev;
    Ok(out)
}

/// Explains a line whose `prev` is not the previous line's hash.
fn link_error(
    lines: &[Line<'_>],
    parsed: &[Result<Parsed<'_>, String>],
    index: &HashMap<&str, Vec<usize>>,
    i: usize,
    p: &Parsed<'_>,
    expected_seq: Option<u64>,
) -> Broken {
    let at = |k: usize, why: String| Broken {
        file: lines[k].file.map(Path::to_owned),
        line: lines[k].no,
        why,
    };
    let name = |k: usize| match lines[k].file {
        Some(f) => format!("{}:{}", f.display(), lines[k].no),
        None => format!("line {}", lines[k].no),
    };
    if let Some(copies) = index.get(p.hash).filter(|c| c.len() > 1 && c[0] < i) {
        return at(i, format!("inserted: a copy of {}", name(copies[0])));
    }
    let predecessor = index.get(p.prev.as_str()).and_then(|c| c.first().copied());
    match predecessor {
        Some(k) if k > i => at(
            i,
            format!(
                "reordered: the line this one follows in the chain is {}, further on",
                name(k)
            ),
        ),
        // This line links to the one two back: the line between them does
        // not belong to the chain.
        Some(k) if k + 2 == i => at(
            i - 1,
            format!(
                "inserted: this line is not part of the chain ({} links to {})",
                name(i),
                name(k)
            ),
        ),
        Some(k) => at(
            i,
            format!(
                "reordered: this line follows {} in the chain, not the line before it",
                name(k)
            ),
        ),
        None => match (p.seq, expected_seq) {
            (Some(seq), Some(exp)) if seq > exp => at(
                i,
                format!(
                    "removed: {} event(s) missing before this line (seq {seq}, expected {exp})",
                    seq - exp
                ),
            ),
            _ if i > 0 && parsed[i - 1].is_ok() => at(
                i - 1,
                format!(
                    "edited: this line was replaced or its hash recomputed ({} still links to the original)",
                    name(i)
                ),
            ),
            _ => at(
                i,
                "removed, inserted or reordered: prev does not match the previous line's hash".into(),
            ),
        },
    }
}
