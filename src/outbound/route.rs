//! `[[outbound.route]]`: which hosts the app may call, where they are, and
//! which SPIFFE identities may answer for them.
//!
//! Parsed once, by `config check` and at startup alike, so a route that
//! would fail at run time fails validation instead, naming the route.

use std::collections::BTreeSet;

use crate::config::{self, OutboundRoute};
use crate::identity::SpiffeId;

/// Who must answer for a route, from its `server_*` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMatch {
    /// `server_id`: this ID and no other.
    Exact(SpiffeId),
    /// `server_id_prefix`: any ID that starts with it. The prefix ends in
    /// `/`, so `.../sa/ledger/` can never match `.../sa/ledger-evil`.
    Prefix(String),
    /// `server_trust_domain`: any workload of that trust domain.
    TrustDomain(String),
}

impl ServerMatch {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            ServerMatch::Exact(want) => want == id,
            ServerMatch::Prefix(prefix) => id.as_str().starts_with(prefix.as_str()),
            ServerMatch::TrustDomain(td) => id.trust_domain() == td,
        }
    }

    /// What the policy sees as `attributes.destination.principal` before the
    /// server is known: the ID itself for an exact route, else the prefix or
    /// `spiffe://<trust domain>` the route accepts.
    pub fn principal(&self) -> String {
        match self {
            ServerMatch::Exact(id) => id.to_string(),
            ServerMatch::Prefix(prefix) => prefix.clone(),
            ServerMatch::TrustDomain(td) => format!("spiffe://{td}"),
        }
    }

    /// For refusals: "spiffe://a/b", "an ID under spiffe://a/", ...
    pub fn describe(&self) -> String {
        match self {
            ServerMatch::Exact(id) => id.to_string(),
            ServerMatch::Prefix(prefix) => format!("an ID under {prefix}"),
            ServerMatch::TrustDomain(td) => format!("an ID in trust domain {td}"),
        }
    }

    fn trust_domain(&self) -> &str {
        match self {
            ServerMatch::Exact(id) => id.trust_domain(),
            ServerMatch::Prefix(prefix) => prefix
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default(),
            ServerMatch::TrustDomain(td) => td,
        }
    }
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Lowercase, without a port.
    pub host: String,
    /// `host:port` as configured; resolved per connection.
    pub address: String,
    pub server: ServerMatch,
}

/// Validates every route. `trust_domains`, when known (the file identity
/// source), are the domains this sidecar holds bundles for: a route to any
/// other could never verify its server.
pub fn parse_all(
    routes: &[OutboundRoute],
    trust_domains: Option<&[&str]>,
) -> Result<Vec<RouteSpec>, config::Error> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(routes.len());
    for (i, route) in routes.iter().enumerate() {
        let key = format!("outbound.route[{i}] (host {:?})", route.host);
        let invalid = |message: String| config::Error::Invalid {
            key: key.clone(),
            message,
        };
        let spec = parse(route).map_err(invalid)?;
        if let Some(known) = trust_domains {
            let td = spec.server.trust_domain();
            if !known.contains(&td) {
                return Err(invalid(format!(
                    "the server's trust domain {td:?} has no bundle: it is neither \
                     identity.trust_domain nor in [identity.federation]"
                )));
            }
        }
        if !seen.insert(spec.host.clone()) {
            return Err(invalid(format!(
                "host {:?} is routed twice; each host has one route",
                spec.host
            )));
        }
        out.push(spec);
    }
    Ok(out)
}

fn parse(route: &OutboundRoute) -> Result<RouteSpec, String> {
    let host = route.host.trim().to_ascii_lowercase();
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(format!(
            "host {:?} must be a host name without port, like \"ledger.pay.svc\"",
            route.host
        ));
    }
    check_address(&route.address)?;
    let server = match (
        &route.server_id,
        &route.server_id_prefix,
        &route.server_trust_domain,
    ) {
        (Some(id), None, None) => {
            ServerMatch::Exact(SpiffeId::parse(id).map_err(|e| format!("server_id {id:?}: {e}"))?)
        }
        (None, Some(prefix), None) => {
            // The prefix without its final `/` must itself be a valid ID, so
            // it can only ever match real IDs at a segment boundary.
            let valid = prefix
                .strip_suffix('/')
                .is_some_and(|id| SpiffeId::parse(id).is_ok());
            if !valid {
                return Err(format!(
                    "server_id_prefix {prefix:?} must be a SPIFFE ID followed by \"/\", \
                     like \"spiffe://pay.example/ns/ledger/\""
                ));
            }
            ServerMatch::Prefix(prefix.clone())
        }
        (None, None, Some(td)) => {
            SpiffeId::validate_trust_domain(td)
                .map_err(|e| format!("server_trust_domain {td:?}: {e}"))?;
            ServerMatch::TrustDomain(td.clone())
        }
        _ => {
            return Err(
                "needs exactly one of server_id, server_id_prefix or server_trust_domain: \
                 who must answer for this host"
                    .into(),
            )
        }
    };
    Ok(RouteSpec {
        host,
        address: route.address.clone(),
        server,
    })
}

/// `ip:port`, `[v6]:port` or `name:port`.
fn check_address(address: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "address {address:?} must be host:port, like \"10.0.3.7:15443\" or \"ledger:15443\""
        )
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if port == 0 || host.is_empty() || host.contains(['/', '@', ' ', '?', '#']) {
        return Err(bad());
    }
    Ok(())
}

/// The host a request names, as routes are keyed: `Host` (HTTP/1.1) or the
/// URI authority (HTTP/2 `:authority`, absolute-form), lowercase, without
/// port.
pub fn request_host(headers: &http::HeaderMap, uri: &http::Uri) -> Option<String> {
    let raw = match uri.authority() {
        Some(a) => a.host().to_owned(),
        None => {
            let value = headers.get(http::header::HOST)?.to_str().ok()?;
            let authority: http::uri::Authority = value.parse().ok()?;
            authority.host().to_owned()
        }
    };
    let host = raw.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: &str, f: impl FnOnce(&mut OutboundRoute)) -> OutboundRoute {
        let mut r = OutboundRoute {
            host: host.into(),
            address: "127.0.0.1:15443".into(),
            server_id: Some("spiffe://pay.example/ns/ledger/sa/ledger".into()),
            ..OutboundRoute::default()
        };
        f(&mut r);
        r
    }

    #[test]
    fn server_matches() {
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let exact = ServerMatch::Exact(id("spiffe://pay.example/ns/ledger/sa/ledger"));
        assert!(exact.matches(&id("spiffe://pay.example/ns/ledger/sa/ledger")));
        assert!(!exact.matches(&id("spiffe://pay.example/ns/ledger/sa/other")));
        let prefix = ServerMatch::Prefix("spiffe://pay.example/ns/ledger/".into());
        assert!(prefix.matches(&id("spiffe://pay.example/ns/ledger/sa/x")));
        assert!(!prefix.matches(&id("spiffe://pay.example/ns/ledger-evil/sa/x")));
        let td = ServerMatch::TrustDomain("pay.example".into());
        assert!(td.matches(&id("spiffe://pay.example/a")));
        assert!(!td.matches(&id("spiffe://other.example/a")));
    }

    #[test]
    fn errors_name_the_route() {
        let known: &[&str] = &["pay.example"];
        let cases: Vec<(OutboundRoute, &str)> = vec![
            (route("Ledger:80", |_| {}), "host"),
            (route("l", |r| r.address = "10.0.0.1".into()), "address"),
            (route("l", |r| r.address = "10.0.0.1:0".into()), "address"),
            (route("l", |r| r.server_id = None), "exactly one"),
            (
                route("l", |r| r.server_trust_domain = Some("pay.example".into())),
                "exactly one",
            ),
            (
                route("l", |r| r.server_id = Some("spiffe://pay.example/".into())),
                "server_id",
            ),
            (
                route("l", |r| {
                    r.server_id = None;
                    r.server_id_prefix = Some("spiffe://pay.example/ns/ledger".into());
                }),
                "server_id_prefix",
            ),
            (
                route("l", |r| {
                    r.server_id = Some("spiffe://bank.example/sa/connector".into())
                }),
                "bank.example",
            ),
        ];
        for (r, needle) in cases {
            let err = parse_all(&[route("ok", |_| {}), r], Some(known))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("outbound.route[1]"), "{err}");
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let dup = parse_all(&[route("a", |_| {}), route("A", |_| {})], None).unwrap_err();
        assert!(dup.to_string().contains("routed twice"), "{dup}");
    }

    #[test]
    fn good_routes_parse() {
        let routes = parse_all(
            &[
                route("Ledger.Pay.svc", |_| {}),
                route("fraud", |r| {
                    r.address = "fraud.pay.svc:15443".into();
                    r.server_id = None;
                    r.server_id_prefix = Some("spiffe://pay.example/ns/fraud/".into());
                }),
                route("bank", |r| {
                    r.address = "[::1]:443".into();
                    r.server_id = None;
                    r.server_trust_domain = Some("pay.example".into());
                }),
            ],
            Some(&["pay.example"]),
        )
        .unwrap();
        assert_eq!(routes[0].host, "ledger.pay.svc");
        assert_eq!(
            routes[1].server.principal(),
            "spiffe://pay.example/ns/fraud/"
        );
        assert_eq!(routes[2].server.principal(), "spiffe://pay.example");
    }

    #[test]
    fn request_host_strips_port_and_case() {
        let mut h = http::HeaderMap::new();
        h.insert("host", "Ledger.Pay.SVC:8080".parse().unwrap());
        let origin: http::Uri = "/x".parse().unwrap();
        assert_eq!(request_host(&h, &origin).as_deref(), Some("ledger.pay.svc"));
        let absolute: http::Uri = "http://fraud:80/x".parse().unwrap();
        assert_eq!(request_host(&h, &absolute).as_deref(), Some("fraud"));
        assert_eq!(request_host(&http::HeaderMap::new(), &origin), None);
    }
}
