//! Refuses requests whose framing or target two HTTP parsers could read
//! differently (request smuggling), before the policy sees them.
//!
//! hyper already rejects duplicate conflicting `Content-Length` and invalid
//! header bytes; what it accepts but a proxy must not pass on is checked
//! here. Each refusal is a 400 and never reaches the upstream.

use http::{header, HeaderMap, HeaderValue, Method, Request, Version};

/// How a message says its body is delimited, once [`body_framing`] found
/// it unambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming<'a> {
    /// Neither header: no body for a request, to the close for a response.
    Neither,
    /// One `Content-Length`, as sent (its digits are checked by the reader).
    Length(&'a HeaderValue),
    /// `Transfer-Encoding: chunked`, alone.
    Chunked,
}

/// How a message's body is delimited, or why it could be delimited two
/// ways: the requests from callers and the responses from the service are
/// held to the same rule.
pub fn body_framing(h: &HeaderMap) -> Result<BodyFraming<'_>, &'static str> {
    // One lookup per name: this runs on every request and every response.
    let mut codings = h.get_all(header::TRANSFER_ENCODING).into_iter();
    let mut lengths = h.get_all(header::CONTENT_LENGTH).into_iter();
    let Some(coding) = codings.next() else {
        return match (lengths.next(), lengths.next()) {
            (None, _) => Ok(BodyFraming::Neither),
            (Some(length), None) => Ok(BodyFraming::Length(length)),
            (Some(_), Some(_)) => Err("more than one Content-Length"),
        };
    };
    if lengths.next().is_some() {
        // RFC 9112 6.3: a sender must not send both; the classic CL.TE /
        // TE.CL smuggling vector.
        return Err("both Transfer-Encoding and Content-Length");
    }
    if codings.next().is_some() || !coding.as_bytes().eq_ignore_ascii_case(b"chunked") {
        // Any other coding would reach the receiver undecoded once the
        // hop-by-hop header is gone.
        return Err("Transfer-Encoding other than a single \"chunked\"");
    }
    Ok(BodyFraming::Chunked)
}

/// Why a request was refused; the text goes into the 400 body.
pub fn check<B>(req: &Request<B>) -> Result<(), &'static str> {
    let h = req.headers();
    if req.method() == Method::CONNECT {
        return Err("CONNECT is not proxied");
    }
    body_framing(h)?;
    let hosts = h.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err("more than one Host header");
    }
    match req.version() {
        Version::HTTP_2 => {
            // :authority is the URI's authority; a Host header, if also
            // sent, must agree with it (RFC 9113 8.3.1).
            if let (Some(authority), Some(host)) = (req.uri().authority(), h.get(header::HOST)) {
                if !host
                    .as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes())
                {
                    return Err("Host disagrees with :authority");
                }
            }
        }
        _ => {
            if req.uri().authority().is_some() || req.uri().scheme().is_some() {
                // Absolute-form is for forward proxies; a sidecar serving
                // one service must not let the target name another host.
                return Err("absolute-form request target");
            }
            if hosts == 0 && req.version() == Version::HTTP_11 {
                return Err("HTTP/1.1 request without Host");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri).version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let h1 = Version::HTTP_11;
        let ok = req(
            "POST",
            "/v1/payments",
            h1,
            &[("host", "p"), ("content-length", "2")],
        );
        assert_eq!(check(&ok), Ok(()));
        let chunked = req(
            "POST",
            "/x",
            h1,
            &[("host", "p"), ("transfer-encoding", "chunked")],
        );
        assert_eq!(check(&chunked), Ok(()));
        for (bad, why) in [
            (
                req(
                    "POST",
                    "/x",
                    h1,
                    &[
                        ("host", "p"),
                        ("transfer-encoding", "chunked"),
                        ("content-length", "5"),
                    ],
                ),
                "both",
            ),
            (
                req(
                    "POST",
                    "/x",
                    h1,
                    &[
                        ("host", "p"),
                        ("content-length", "5"),
                        ("content-length", "6"),
                    ],
                ),
                "more than one Content-Length",
            ),
            (
                req(
                    "POST",
                    "/x",
                    h1,
                    &[("host", "p"), ("transfer-encoding", "gzip, chunked")],
                ),
                "Transfer-Encoding other",
            ),
            (
                req("GET", "http://evil.example/x", h1, &[("host", "p")]),
                "absolute-form",
            ),
            (
                req("CONNECT", "evil.example:443", h1, &[("host", "p")]),
                "CONNECT",
            ),
            (req("GET", "/x", h1, &[]), "without Host"),
            (
                req("GET", "/x", h1, &[("host", "a"), ("host", "b")]),
                "more than one Host",
            ),
            (
                req(
                    "GET",
                    "https://payments/x",
                    Version::HTTP_2,
                    &[("host", "evil")],
                ),
                "disagrees",
            ),
        ] {
            let err = check(&bad).unwrap_err();
            assert!(err.contains(why), "{err} vs {why}");
        }
        let h2 = req(
            "GET",
            "https://payments/x",
            Version::HTTP_2,
            &[("host", "PAYMENTS")],
        );
        assert_eq!(check(&h2), Ok(()));
    }
}
