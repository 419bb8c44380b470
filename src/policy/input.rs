//! The policy input document, shaped like OPA-Envoy's so that policies
//! written for Envoy ext_authz run unchanged.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::SystemTime;

use regorus::Value;

use crate::audit::header_text;

/// Everything the proxy knows about one request when it asks the policy.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    /// Already normalised by the proxy; never contains the query.
    pub path: &'a str,
    /// Raw bytes after `?`, exactly as they will be forwarded.
    pub query: Option<&'a str>,
    pub host: &'a str,
    pub scheme: &'a str,
    /// `"HTTP/1.1"` or `"HTTP/2"`.
    pub protocol: &'a str,
    pub headers: InputHeaders<'a>,
    pub source_spiffe_id: &'a str,
    pub source_trust_domain: &'a str,
    pub source_path: &'a str,
    pub source_addr: SocketAddr,
    pub destination_spiffe_id: &'a str,
    pub time: SystemTime,
}

/// The request's headers as the policy is shown them: every one, or only
/// those `policy.input_headers` names (as Envoy ext_authz's
/// `allowed_headers`).
///
/// The map is private so that the document and the decision cache's key
/// can only see the headers through [`entries`](Self::entries): a header the
/// key leaves out must be one the policy cannot read, or one request could
/// be handed a decision made for another.
#[derive(Debug, Clone, Copy)]
pub struct InputHeaders<'a> {
    map: &'a http::HeaderMap,
    /// Sorted by name and without duplicates ([`HeaderAllowlist`]).
    only: Option<&'a HeaderAllowlist>,
}

/// The names `policy.input_headers` lets the policy see, sorted as the
/// document orders its keys, so that neither the document nor a cache key
/// sorts them per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderAllowlist(Box<[http::HeaderName]>);

impl HeaderAllowlist {
    pub fn new(names: impl IntoIterator<Item = http::HeaderName>) -> HeaderAllowlist {
        let mut names: Vec<http::HeaderName> = names.into_iter().collect();
        names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        HeaderAllowlist(names.into_boxed_slice())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.binary_search_by(|n| n.as_str().cmp(name)).is_ok()
    }

    pub fn names(&self) -> &[http::HeaderName] {
        &self.0
    }
}

impl<'a> InputHeaders<'a> {
    /// Every header of `map`.
    pub fn all(map: &'a http::HeaderMap) -> InputHeaders<'a> {
        InputHeaders { map, only: None }
    }

    /// The headers of `map` that `only` names; every one when `None`.
    pub fn new(map: &'a http::HeaderMap, only: Option<&'a HeaderAllowlist>) -> InputHeaders<'a> {
        InputHeaders { map, only }
    }

    /// The headers the policy sees, in byte order of their names, each
    /// once with its value as the document has it: the lines of a repeated
    /// header joined with ", ", invalid UTF-8 replaced.
    pub fn entries(&self) -> Vec<(&'a http::HeaderName, Cow<'a, str>)> {
        if let Some(only) = self.only {
            return only
                .0
                .iter()
                .filter_map(|name| Some((name, joined(self.map.get_all(name).iter())?)))
                .collect();
        }
        // One pass over the map, no lookup per name: `http` yields the
        // lines of a repeated header one after another.
        let mut out: Vec<(&http::HeaderName, Cow<str>)> = Vec::with_capacity(self.map.keys_len());
        for (name, value) in self.map {
            match out.last_mut() {
                Some((last, joined)) if *last == name => append(joined, value),
                _ => out.push((name, header_text(value))),
            }
        }
        // Stable, so a repeated header's lines keep their order even if
        // they were not adjacent.
        out.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        out.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                let s = earlier.1.to_mut();
                s.push_str(", ");
                s.push_str(&later.1);
            }
            same
        });
        out
    }
}

/// Builds the input document as a regorus value.
///
/// Built directly rather than through `serde_json::Value`: this runs on
/// every request, and going through JSON would build the tree twice.
pub fn build_input(f: &RequestFacts) -> Value {
    let k = &*KEYS;
    let http = object([
        (&k.id, f.request_id.into()),
        (&k.method, constant(f.method)),
        (&k.path, full_path(f)),
        (&k.host, f.host.into()),
        (&k.scheme, constant(f.scheme)),
        (&k.protocol, constant(f.protocol)),
        (&k.headers, headers(&f.headers)),
    ]);

    let attributes = object([
        (
            &k.source,
            object([
                (&k.principal, f.source_spiffe_id.into()),
                (
                    &k.address,
                    object([(
                        &k.socket_address,
                        object([
                            (&k.address, f.source_addr.ip().to_string().into()),
                            (&k.port_value, u64::from(f.source_addr.port()).into()),
                        ]),
                    )]),
                ),
            ]),
        ),
        (
            &k.destination,
            object([(&k.principal, f.destination_spiffe_id.into())]),
        ),
        (
            &k.request,
            object([
                (&k.time, crate::rfc3339::millis(f.time).into()),
                (&k.http, http),
            ]),
        ),
    ]);

    object([
        (&k.attributes, attributes),
        (&k.parsed_path, parsed_path(f.path)),
        (&k.parsed_query, parsed_query(f.query)),
        (
            &k.source,
            object([
                (&k.spiffe_id, f.source_spiffe_id.into()),
                (&k.trust_domain, f.source_trust_domain.into()),
                (&k.path, f.source_path.into()),
            ]),
        ),
    ])
}

/// A field of the input document, located in the request it comes from.
pub enum Field<'a> {
    /// A string taken as it is.
    Str(&'a str),
    /// A string that is usually one of a few ([`CONSTANTS`]).
    Constant(&'a str),
    Headers(InputHeaders<'a>),
    FullPath,
    ParsedPath,
    ParsedQuery,
}

/// Where in the request a field of the input document comes from, with
/// no request in hand: read paths are fixed per policy, so each is placed
/// once at load and only [`Slot::field`] runs per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    SourceSpiffeId,
    SourceTrustDomain,
    SourcePath,
    DestinationSpiffeId,
    Method,
    FullPath,
    Host,
    Scheme,
    Protocol,
    Headers,
    ParsedPath,
    ParsedQuery,
}

/// A read path (the segments below `input`) and, when [`Slot::of`] places
/// it, the field it starts in and how many of its segments that field
/// stands for.
#[derive(Clone, Debug)]
pub struct Lookup {
    pub path: Vec<Value>,
    pub slot: Option<(Slot, usize)>,
}

impl Lookup {
    pub fn new(path: Vec<Value>) -> Lookup {
        let slot = Slot::of(&path);
        Lookup { path, slot }
    }
}

impl Slot {
    /// The field [`build_input`] puts at the start of `path` (the segments
    /// below `input`), and how many segments of `path` it stands for; the
    /// rest of `path` is inside the field's value. `None` when the path
    /// does not start with one of the fields below, and only the whole
    /// document can answer it.
    ///
    /// This is how the decision cache keys a request without building the
    /// document: on a hit nothing else is made. It covers the fields that
    /// can be keyed at all (the per-request ones turn the cache off), and a
    /// test checks each against the document.
    pub fn of(path: &[Value]) -> Option<(Slot, usize)> {
        let segment = |i: usize| match path.get(i) {
            Some(Value::String(s)) => Some(&**s),
            _ => None,
        };
        let found = match (segment(0)?, segment(1), segment(2), segment(3)) {
            ("source", Some("spiffe_id"), ..) => (Slot::SourceSpiffeId, 2),
            ("source", Some("trust_domain"), ..) => (Slot::SourceTrustDomain, 2),
            ("source", Some("path"), ..) => (Slot::SourcePath, 2),
            ("attributes", Some("source"), Some("principal"), _) => (Slot::SourceSpiffeId, 3),
            ("attributes", Some("destination"), Some("principal"), _) => {
                (Slot::DestinationSpiffeId, 3)
            }
            ("attributes", Some("request"), Some("http"), Some(name)) => {
                let slot = match name {
                    "method" => Slot::Method,
                    "path" => Slot::FullPath,
                    "host" => Slot::Host,
                    "scheme" => Slot::Scheme,
                    "protocol" => Slot::Protocol,
                    "headers" => Slot::Headers,
                    _ => return None,
                };
                (slot, 4)
            }
            ("parsed_path", ..) => (Slot::ParsedPath, 1),
            ("parsed_query", ..) => (Slot::ParsedQuery, 1),
            _ => return None,
        };
        Some(found)
    }

    /// The field this slot holds for the request `f`.
    pub fn field<'a>(self, f: &RequestFacts<'a>) -> Field<'a> {
        match self {
            Slot::SourceSpiffeId => Field::Str(f.source_spiffe_id),
            Slot::SourceTrustDomain => Field::Str(f.source_trust_domain),
            Slot::SourcePath => Field::Str(f.source_path),
            Slot::DestinationSpiffeId => Field::Str(f.destination_spiffe_id),
            Slot::Method => Field::Constant(f.method),
            Slot::FullPath => Field::FullPath,
            Slot::Host => Field::Str(f.host),
            Slot::Scheme => Field::Constant(f.scheme),
            Slot::Protocol => Field::Constant(f.protocol),
            Slot::Headers => Field::Headers(f.headers),
            Slot::ParsedPath => Field::ParsedPath,
            Slot::ParsedQuery => Field::ParsedQuery,
        }
    }
}

/// The input document cut down to the fields at `lookups`, each with the
/// value [`build_input`] gives it; `None` when a lookup is not one
/// [`Slot::of`] places, and only the whole document will do.
///
/// A policy shown this document decides as on the whole one, provided
/// `lookups` includes everything it reads: a field it never reads cannot
/// change its result. For the shipped policy the fields left out include
/// the costliest to make (the time in RFC 3339, the peer's address as
/// text, the parsed query): 4% of an uncached request's instructions.
pub fn build_fields(f: &RequestFacts, lookups: &[Lookup]) -> Option<Value> {
    let mut root = Value::new_object();
    for Lookup { path, slot } in lookups {
        let (slot, depth) = (*slot)?;
        let (name, parents) = path[..depth].split_last()?;
        let mut node = &mut root;
        for key in parents {
            node = node
                .as_object_mut()
                .ok()?
                .get_or_insert_with(key.clone(), Value::new_object);
        }
        // Two reads inside one field (`headers.a`, `headers.b`) share it.
        let object = node.as_object_mut().ok()?;
        if !object.contains_key(name) {
            object.insert(name.clone(), slot.field(f).value(f));
        }
    }
    Some(root)
}

impl Field<'_> {
    /// The value the document has for this field.
    pub fn value(&self, f: &RequestFacts) -> Value {
        match self {
            Field::Str(s) => Value::from(*s),
            Field::Constant(s) => constant(s),
            Field::Headers(shown) => headers(shown),
            Field::FullPath => full_path(f),
            Field::ParsedPath => parsed_path(f.path),
            Field::ParsedQuery => parsed_query(f.query),
        }
    }
}

/// The lines of one header as the document has them, joined with ", ";
/// `None` when there are none.
fn joined<'m>(mut lines: impl Iterator<Item = &'m http::HeaderValue>) -> Option<Cow<'m, str>> {
    let mut out = header_text(lines.next()?);
    for value in lines {
        append(&mut out, value);
    }
    Some(out)
}

fn append(joined: &mut Cow<str>, line: &http::HeaderValue) {
    let s = joined.to_mut();
    s.push_str(", ");
    s.push_str(&header_text(line));
}

/// The document's object keys, made once: each would otherwise be a
/// reference-counted string allocated per request (about 30 of them).
macro_rules! keys {
    ($($field:ident = $name:literal),* $(,)?) => {
        struct Keys { $($field: Value),* }
        static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys { $($field: Value::from($name)),* });
    };
}

keys! {
    address = "address",
    attributes = "attributes",
    destination = "destination",
    headers = "headers",
    host = "host",
    http = "http",
    id = "id",
    method = "method",
    parsed_path = "parsed_path",
    parsed_query = "parsed_query",
    path = "path",
    port_value = "portValue",
    principal = "principal",
    protocol = "protocol",
    request = "request",
    scheme = "scheme",
    socket_address = "socketAddress",
    source = "source",
    spiffe_id = "spiffe_id",
    time = "time",
    trust_domain = "trust_domain",
}

/// Strings that recur on nearly every request, made once for the same
/// reason as [`KEYS`].
static CONSTANTS: LazyLock<Vec<Value>> = LazyLock::new(|| {
    [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "https", "http", "HTTP/1.1",
        "HTTP/2",
    ]
    .into_iter()
    .map(Value::from)
    .collect()
});

/// `s` as a value, shared when it is one of [`CONSTANTS`].
fn constant(s: &str) -> Value {
    CONSTANTS
        .iter()
        .find(|c| matches!(c, Value::String(c) if &**c == s))
        .cloned()
        .unwrap_or_else(|| Value::from(s))
}

fn full_path(f: &RequestFacts) -> Value {
    match f.query {
        Some(q) => Value::from(format!("{}?{}", f.path, q)),
        None => Value::from(f.path),
    }
}

/// The body formats the policy can be shown parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Form,
}

impl BodyKind {
    /// From a `content-type` value: `application/json`, `application/*+json`
    /// and `application/x-www-form-urlencoded`, parameters ignored.
    pub fn of(content_type: &str) -> Option<BodyKind> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence == "application/json"
            || (essence.starts_with("application/") && essence.ends_with("+json"))
        {
            Some(BodyKind::Json)
        } else if essence == "application/x-www-form-urlencoded" {
            Some(BodyKind::Form)
        } else {
            None
        }
    }
}

/// The body prefix the proxy read for the policy.
#[derive(Debug, Clone, Copy)]
pub struct BodyFacts<'a> {
    pub kind: BodyKind,
    /// The whole body, when it fit in the limit.
    pub complete: Option<&'a [u8]>,
    pub truncated: bool,
}

/// Adds `parsed_body` (when the whole body was read and parses) and
/// `truncated_body` to an input document from [`build_input`]. A body that
/// does not parse gets no `parsed_body`, so a policy that needs one denies.
pub fn add_body(input: &mut Value, kind: BodyKind, complete: Option<&[u8]>, truncated: bool) {
    let parsed = complete.and_then(|bytes| match kind {
        BodyKind::Json => serde_json::from_slice::<Value>(bytes).ok(),
        BodyKind::Form => Some(form(bytes)),
    });
    if let Ok(obj) = input.as_object_mut() {
        if let Some(parsed) = parsed {
            obj.insert(Value::from("parsed_body"), parsed);
        }
        obj.insert(Value::from("truncated_body"), Value::Bool(truncated));
    }
}

/// The same document as JSON, for printing (`policy eval`, debugging).
/// Converted from [`build_input`] so the two can never disagree.
pub fn build_input_json(f: &RequestFacts) -> serde_json::Value {
    // Serialising a tree of strings, numbers, arrays and string-keyed objects
    // cannot fail; Null is only a theoretical fallback.
    serde_json::to_value(build_input(f)).unwrap_or(serde_json::Value::Null)
}

fn object<const N: usize>(fields: [(&Value, Value); N]) -> Value {
    Value::from(
        fields
            .into_iter()
            .map(|(k, v)| (k.clone(), v))
            .collect::<BTreeMap<_, _>>(),
    )
}

fn headers(shown: &InputHeaders) -> Value {
    let out: BTreeMap<Value, Value> = shown
        .entries()
        .into_iter()
        .map(|(name, value)| (Value::from(name.as_str()), Value::from(value.as_ref())))
        .collect();
    Value::from(out)
}

/// Path segments, percent-decoded, with empty segments dropped (as
/// OPA-Envoy's `parsed_path`, minus its `[""]` for `/`).
fn parsed_path(path: &str) -> Value {
    Value::from(
        path_segments(path)
            .map(|s| Value::from(s.as_ref()))
            .collect::<Vec<_>>(),
    )
}

/// The strings of `input.parsed_path`: the non-empty segments, decoded.
pub fn path_segments(path: &str) -> impl Iterator<Item = Cow<'_, str>> {
    raw_path_segments(path).map(|s| {
        // Nearly every segment has nothing to decode; the decoder would
        // still check the bytes it returns unchanged for UTF-8 again.
        if s.as_bytes().contains(&b'%') {
            percent_encoding::percent_decode_str(s).decode_utf8_lossy()
        } else {
            Cow::Borrowed(s)
        }
    })
}

/// The segments [`path_segments`] decodes, as they are in the path.
pub fn raw_path_segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// `name -> [values...]` with form-urlencoded decoding (`+` is a space),
/// like Go's `url.ParseQuery` that OPA-Envoy uses.
fn parsed_query(query: Option<&str>) -> Value {
    form(query.unwrap_or("").as_bytes())
}

fn form(bytes: &[u8]) -> Value {
    let mut out: BTreeMap<Value, Vec<Value>> = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(bytes) {
        out.entry(Value::from(k.as_ref()))
            .or_default()
            .push(Value::from(v.as_ref()));
    }
    Value::from(
        out.into_iter()
            .map(|(k, v)| (k, Value::from(v)))
            .collect::<BTreeMap<_, _>>(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderName, HeaderValue};
    use std::time::{Duration, UNIX_EPOCH};

    fn facts<'a>(
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a HeaderMap,
    ) -> RequestFacts<'a> {
        RequestFacts {
            request_id: "req-1",
            method: "POST",
            path,
            query,
            host: "payments",
            scheme: "https",
            protocol: "HTTP/2",
            headers: InputHeaders::all(headers),
            source_spiffe_id: "spiffe://pay.example/ns/shop/sa/checkout",
            source_trust_domain: "pay.example",
            source_path: "/ns/shop/sa/checkout",
            source_addr: "10.0.0.7:51522".parse().unwrap(),
            destination_spiffe_id: "spiffe://pay.example/ns/pay/sa/payments",
            time: UNIX_EPOCH + Duration::from_millis(1_795_600_800_123),
        }
    }

    fn json(path: &str, query: Option<&str>, headers: &HeaderMap) -> serde_json::Value {
        build_input_json(&facts(path, query, headers))
    }

    #[test]
    fn full_document_shape() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("idempotency-key", HeaderValue::from_static("k-1"));
        let got = json("/v1/payments", Some("x=1"), &h);
        let want = serde_json::json!({
            "attributes": {
                "source": {"principal": "spiffe://pay.example/ns/shop/sa/checkout",
                           "address": {"socketAddress": {"address": "10.0.0.7", "portValue": 51522}}},
                "destination": {"principal": "spiffe://pay.example/ns/pay/sa/payments"},
                "request": {"time": "2026-11-25T10:00:00.123Z",
                            "http": {"id": "req-1", "method": "POST", "path": "/v1/payments?x=1",
                                     "host": "payments", "scheme": "https", "protocol": "HTTP/2",
                                     "headers": {"content-type": "application/json", "idempotency-key": "k-1"}}}
            },
            "parsed_path": ["v1", "payments"],
            "parsed_query": {"x": ["1"]},
            "source": {"spiffe_id": "spiffe://pay.example/ns/shop/sa/checkout",
                       "trust_domain": "pay.example", "path": "/ns/shop/sa/checkout"}
        });
        assert_eq!(got, want);
    }

    #[test]
    fn ipv6_source_address() {
        let h = HeaderMap::new();
        let mut f = facts("/", None, &h);
        f.source_addr = "[fd00::7]:443".parse().unwrap();
        let j = build_input_json(&f);
        assert_eq!(
            j["attributes"]["source"]["address"]["socketAddress"],
            serde_json::json!({"address": "fd00::7", "portValue": 443})
        );
    }

    #[test]
    fn path_splitting() {
        let h = HeaderMap::new();
        let cases: &[(&str, serde_json::Value)] = &[
            ("/", serde_json::json!([])),
            ("/v1/payments", serde_json::json!(["v1", "payments"])),
            ("/v1/payments/", serde_json::json!(["v1", "payments"])),
            ("//v1///reports", serde_json::json!(["v1", "reports"])),
            (
                "/v1/a%20b/caf%C3%A9",
                serde_json::json!(["v1", "a b", "café"]),
            ),
            ("/v1/%FF", serde_json::json!(["v1", "\u{FFFD}"])),
        ];
        for (path, want) in cases {
            assert_eq!(&json(path, None, &h)["parsed_path"], want, "{path}");
        }
    }

    #[test]
    fn query_parsing() {
        let h = HeaderMap::new();
        let cases: &[(Option<&str>, serde_json::Value)] = &[
            (None, serde_json::json!({})),
            (Some(""), serde_json::json!({})),
            (
                Some("a=1&a=2&b=3"),
                serde_json::json!({"a": ["1", "2"], "b": ["3"]}),
            ),
            (
                Some("empty=&flag"),
                serde_json::json!({"empty": [""], "flag": [""]}),
            ),
            (
                Some("q=a+b&r=a%2Bb&s=%26%3D%2F&caf%C3%A9=1"),
                serde_json::json!({"q": ["a b"], "r": ["a+b"], "s": ["&=/"], "café": ["1"]}),
            ),
            (Some("&&x=1&"), serde_json::json!({"x": ["1"]})),
        ];
        for (q, want) in cases {
            assert_eq!(&json("/p", *q, &h)["parsed_query"], want, "{q:?}");
        }
    }

    #[test]
    fn path_includes_raw_query_only_when_present() {
        let h = HeaderMap::new();
        let http = |q| json("/v1/reports", q, &h)["attributes"]["request"]["http"]["path"].clone();
        assert_eq!(http(None), "/v1/reports");
        assert_eq!(http(Some("from=a+b%20c")), "/v1/reports?from=a+b%20c");
    }

    #[test]
    fn headers_lowercase_and_repeated() {
        let mut h = HeaderMap::new();
        // HeaderName::from_bytes lowercases, as hyper does for HTTP/1.1.
        h.append(
            HeaderName::from_bytes(b"X-Forwarded-For").unwrap(),
            HeaderValue::from_static("10.0.0.1"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        h.append("accept", HeaderValue::from_static("text/plain"));
        h.append("x-bin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        // A line of a header after other headers still joins in order.
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.3"));
        let got = &json("/", None, &h)["attributes"]["request"]["http"]["headers"];
        assert_eq!(
            got,
            &serde_json::json!({
                "x-forwarded-for": "10.0.0.1, 10.0.0.2, 10.0.0.3",
                "accept": "text/plain",
                "x-bin": "caf\u{FFFD}",
            })
        );
    }

    #[test]
    fn an_allowlist_shows_only_the_headers_it_names() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        h.append("traceparent", HeaderValue::from_static("00-abc-01"));
        h.append("accept", HeaderValue::from_static("*/*"));
        let only = HeaderAllowlist::new(
            ["X-Forwarded-For", "idempotency-key", "accept", "accept"]
                .map(|n| HeaderName::from_bytes(n.as_bytes()).unwrap()),
        );
        assert_eq!(only.names().len(), 3, "lowercased and deduplicated");
        let f = RequestFacts {
            headers: InputHeaders::new(&h, Some(&only)),
            ..facts("/", None, &h)
        };
        let shown: Vec<&str> = f.headers.entries().iter().map(|e| e.0.as_str()).collect();
        // Listed and absent (idempotency-key) is not shown; byte order.
        assert_eq!(shown, ["accept", "x-forwarded-for"]);
        let got = &build_input_json(&f)["attributes"]["request"]["http"]["headers"];
        assert_eq!(
            got,
            &serde_json::json!({"accept": "*/*", "x-forwarded-for": "10.0.0.1, 10.0.0.2"})
        );
        // The same fields through the cut document the cache builds.
        let lookups = [Lookup::new(
            ["attributes", "request", "http", "headers"]
                .map(Value::from)
                .to_vec(),
        )];
        let cut = serde_json::to_value(build_fields(&f, &lookups).unwrap()).unwrap();
        assert_eq!(&cut["attributes"]["request"]["http"]["headers"], got);
        // Without a list every header is shown.
        let all = &json("/", None, &h)["attributes"]["request"]["http"]["headers"];
        assert_eq!(all.as_object().unwrap().len(), 3);
    }

    #[test]
    fn bodies_by_kind() {
        assert_eq!(
            BodyKind::of("application/json; charset=utf-8"),
            Some(BodyKind::Json)
        );
        assert_eq!(
            BodyKind::of("application/merge-patch+json"),
            Some(BodyKind::Json)
        );
        assert_eq!(
            BodyKind::of("Application/X-WWW-Form-Urlencoded"),
            Some(BodyKind::Form)
        );
        assert_eq!(BodyKind::of("text/plain"), None);
        let h = HeaderMap::new();
        let f = facts("/", None, &h);
        let mut input = build_input(&f);
        add_body(
            &mut input,
            BodyKind::Json,
            Some(br#"{"amount": 10}"#),
            false,
        );
        let j = serde_json::to_value(&input).unwrap();
        assert_eq!(j["parsed_body"], serde_json::json!({"amount": 10}));
        assert_eq!(j["truncated_body"], false);
        let mut input = build_input(&f);
        add_body(&mut input, BodyKind::Form, Some(b"a=1&a=2&b=x+y"), false);
        let j = serde_json::to_value(&input).unwrap();
        assert_eq!(
            j["parsed_body"],
            serde_json::json!({"a": ["1", "2"], "b": ["x y"]})
        );
        let mut input = build_input(&f);
        add_body(&mut input, BodyKind::Json, Some(b"{not json"), false);
        let j = serde_json::to_value(&input).unwrap();
        assert!(j.get("parsed_body").is_none());
        let mut input = build_input(&f);
        add_body(&mut input, BodyKind::Json, None, true);
        let j = serde_json::to_value(&input).unwrap();
        assert!(j.get("parsed_body").is_none());
        assert_eq!(j["truncated_body"], true);
    }
}
