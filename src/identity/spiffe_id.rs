//! SPIFFE IDs, parsed by the strictest reading of the SPIFFE ID specification.
//!
//! Every check here is a security boundary: policies match on these strings, so
//! two spellings of one identity (case, dot segments, encodings) must never both
//! be accepted.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";

/// The SPIFFE spec caps the whole URI at 2048 bytes; longer IDs are refused so
/// that no peer can make us carry unbounded strings into policy and audit.
pub const MAX_LEN: usize = 2048;

/// Why a string is not a workload SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is {len} bytes, longer than the {MAX_LEN}-byte limit")]
    TooLong { len: usize },
    #[error("SPIFFE ID must start with the lowercase scheme \"spiffe://\"")]
    WrongScheme,
    #[error("SPIFFE ID must not contain a query ('?')")]
    Query,
    #[error("SPIFFE ID must not contain a fragment ('#')")]
    Fragment,
    #[error("SPIFFE ID must not contain percent-encoding ('%')")]
    PercentEncoding,
    #[error("SPIFFE ID trust domain is empty")]
    EmptyTrustDomain,
    #[error("SPIFFE ID trust domain must not contain userinfo ('@')")]
    UserInfo,
    #[error("SPIFFE ID trust domain must not contain a port (':')")]
    Port,
    #[error("SPIFFE ID trust domain must be lowercase, found {ch:?}")]
    UppercaseTrustDomain { ch: char },
    #[error("SPIFFE ID trust domain contains {ch:?}; only [a-z0-9.-_] are allowed")]
    TrustDomainChar { ch: char },
    #[error("SPIFFE ID has no path; a workload ID needs one")]
    MissingPath,
    #[error("SPIFFE ID has the root path \"/\"; a workload ID needs a non-root path")]
    RootPath,
    #[error("SPIFFE ID path must not end with '/'")]
    TrailingSlash,
    #[error("SPIFFE ID path has an empty segment (\"//\")")]
    EmptySegment,
    #[error("SPIFFE ID path has a '.' or '..' segment")]
    DotSegment,
    #[error("SPIFFE ID path contains {ch:?}; only [A-Za-z0-9.-_] are allowed")]
    PathChar { ch: char },
}

/// A validated workload SPIFFE ID such as `spiffe://pay.example/ns/shop/sa/checkout`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    id: String,
    // Byte offset where the path starts; keeps accessors allocation-free.
    path_start: usize,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        // Checked over the whole remainder first so the error names the real
        // cause rather than whichever component the character landed in.
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if rest.contains('%') {
            return Err(SpiffeIdError::PercentEncoding);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        Self::validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(SpiffeId {
            id: s.to_owned(),
            path_start: SCHEME.len() + td.len(),
        })
    }

    /// Checks a bare trust domain name (as used to key trust bundles).
    pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if td.contains('@') {
            return Err(SpiffeIdError::UserInfo);
        }
        if td.contains(':') {
            return Err(SpiffeIdError::Port);
        }
        for ch in td.chars() {
            if ch.is_ascii_uppercase() {
                return Err(SpiffeIdError::UppercaseTrustDomain { ch });
            }
            if !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '.' | '-' | '_')) {
                return Err(SpiffeIdError::TrustDomainChar { ch });
            }
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    /// The path, always starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Err(SpiffeIdError::MissingPath);
    }
    if path == "/" {
        return Err(SpiffeIdError::RootPath);
    }
    if path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    // The path starts with '/', so the first split element is always empty.
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(ch) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::PathChar { ch });
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        SpiffeId::parse(&s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.id
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SpiffeIdError as E;

    #[test]
    fn valid_ids() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "spiffe://pay.example/ns/shop/sa/checkout",
                "pay.example",
                "/ns/shop/sa/checkout",
            ),
            ("spiffe://td/a", "td", "/a"),
            ("spiffe://a-b_c.d9/x", "a-b_c.d9", "/x"),
            ("spiffe://1.2.3.4/w", "1.2.3.4", "/w"),
            ("spiffe://td/AZaz09.-_", "td", "/AZaz09.-_"),
            ("spiffe://td/...", "td", "/..."),
            ("spiffe://td/.hidden/..x", "td", "/.hidden/..x"),
            ("spiffe://td/a/b/c/d/e/f", "td", "/a/b/c/d/e/f"),
            ("spiffe://td/MixedCase/Path", "td", "/MixedCase/Path"),
        ];
        for (input, td, path) in cases {
            let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.as_str(), *input);
            assert_eq!(id.trust_domain(), *td, "{input}");
            assert_eq!(id.path(), *path, "{input}");
            assert_eq!(id.to_string(), *input);
            assert_eq!(input.parse::<SpiffeId>().unwrap(), id);
        }
    }

    #[test]
    fn invalid_ids() {
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", E::Empty),
            ("SPIFFE://td/a", E::WrongScheme),
            ("Spiffe://td/a", E::WrongScheme),
            ("spiffe:/td/a", E::WrongScheme),
            ("spiffe:td/a", E::WrongScheme),
            ("https://td/a", E::WrongScheme),
            ("td/a", E::WrongScheme),
            (" spiffe://td/a", E::WrongScheme),
            ("spiffe://td/a?x=1", E::Query),
            ("spiffe://td?/a", E::Query),
            ("spiffe://td/a#frag", E::Fragment),
            ("spiffe://td/a%2Fb", E::PercentEncoding),
            ("spiffe://t%64/a", E::PercentEncoding),
            ("spiffe:///a", E::EmptyTrustDomain),
            ("spiffe://", E::EmptyTrustDomain),
            ("spiffe://user@td/a", E::UserInfo),
            ("spiffe://td:443/a", E::Port),
            (
                "spiffe://Pay.example/a",
                E::UppercaseTrustDomain { ch: 'P' },
            ),
            ("spiffe://td!/a", E::TrustDomainChar { ch: '!' }),
            ("spiffe://t d/a", E::TrustDomainChar { ch: ' ' }),
            ("spiffe://tд/a", E::TrustDomainChar { ch: 'д' }),
            ("spiffe://td", E::MissingPath),
            ("spiffe://td/", E::RootPath),
            ("spiffe://td/a/", E::TrailingSlash),
            ("spiffe://td//", E::TrailingSlash),
            ("spiffe://td//a", E::EmptySegment),
            ("spiffe://td/a//b", E::EmptySegment),
            ("spiffe://td/.", E::DotSegment),
            ("spiffe://td/..", E::DotSegment),
            ("spiffe://td/a/./b", E::DotSegment),
            ("spiffe://td/a/../b", E::DotSegment),
            ("spiffe://td/a b", E::PathChar { ch: ' ' }),
            ("spiffe://td/a:b", E::PathChar { ch: ':' }),
            ("spiffe://td/a@b", E::PathChar { ch: '@' }),
            ("spiffe://td/a\\b", E::PathChar { ch: '\\' }),
            ("spiffe://td/a;b", E::PathChar { ch: ';' }),
            ("spiffe://td/é", E::PathChar { ch: 'é' }),
            ("spiffe://td/a\0", E::PathChar { ch: '\0' }),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input:?}");
        }
    }

    #[test]
    fn length_boundary() {
        let prefix = "spiffe://td/";
        let at_limit = format!("{prefix}{}", "a".repeat(MAX_LEN - prefix.len()));
        assert_eq!(at_limit.len(), 2048);
        assert!(SpiffeId::parse(&at_limit).is_ok());

        let over = format!("{prefix}{}", "a".repeat(MAX_LEN + 1 - prefix.len()));
        assert_eq!(over.len(), 2049);
        assert_eq!(
            SpiffeId::parse(&over),
            Err(E::TooLong { len: 2049 }),
            "2049 bytes must be refused"
        );
    }

    #[test]
    fn serde_round_trip_validates() {
        let id = SpiffeId::parse("spiffe://td/ns/a").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://td/ns/a\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/\"").is_err());
    }
}
