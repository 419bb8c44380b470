//! The decision a policy returns, in either of the two shapes OPA-Envoy
//! policies use: a bare boolean or a decision object.

use regorus::Value;

use super::cache::CacheUse;
use super::Error;

/// Reason given when the query produced no value at all. Deny rather than
/// error: "no rule matched" is the ordinary default-deny case, not a fault.
pub const UNDEFINED_REASON: &str = "policy decision undefined (no rule matched)";

/// What the policy said about one request.
///
/// Equality compares what the policy said, not [`Decision::cache`]: a
/// decision served from the cache equals the one evaluated.
#[derive(Debug, Clone, Eq, Default)]
pub struct Decision {
    pub allowed: bool,
    /// Status for the denial response; the proxy picks one when absent.
    pub http_status: Option<u16>,
    pub reason: Option<String>,
    /// Allowed: added to the request sent upstream. Denied: added to the
    /// denial response (OPA-Envoy's meaning in both cases). In name order; a
    /// name repeats when the policy gave an array of values.
    pub headers: Vec<(String, String)>,
    /// Added to the response the caller gets, on allow.
    pub response_headers_to_add: Vec<(String, String)>,
    /// Removed from the request before it goes upstream, on allow.
    pub request_headers_to_remove: Vec<String>,
    /// The body of the denial response, verbatim, in place of ours.
    pub body: Option<String>,
    /// Whether this came from the decision cache; not something the
    /// policy said.
    pub cache: CacheUse,
}

impl PartialEq for Decision {
    fn eq(&self, other: &Decision) -> bool {
        // Destructured so that a new field cannot be forgotten here.
        let Decision {
            allowed,
            http_status,
            reason,
            headers,
            response_headers_to_add,
            request_headers_to_remove,
            body,
            cache: _,
        } = self;
        *allowed == other.allowed
            && *http_status == other.http_status
            && *reason == other.reason
            && *headers == other.headers
            && *response_headers_to_add == other.response_headers_to_add
            && *request_headers_to_remove == other.request_headers_to_remove
            && *body == other.body
    }
}

impl Decision {
    /// Interprets the value of the policy query.
    ///
    /// Unknown fields of a decision object are ignored so that policies
    /// written for OPA-Envoy (which also return e.g. `body`) load unchanged;
    /// a known field of the wrong type is an error, because silently reading
    /// `"allowed": "yes"` as a deny would hide the policy author's bug.
    pub fn from_value(value: &Value) -> Result<Decision, Error> {
        match value {
            Value::Bool(allowed) => Ok(Decision {
                allowed: *allowed,
                ..Decision::default()
            }),
            Value::Undefined => Ok(Decision {
                allowed: false,
                reason: Some(UNDEFINED_REASON.to_owned()),
                ..Decision::default()
            }),
            Value::Object(fields) => {
                let field = |name: &str| fields.get(&Value::from(name));
                let allowed = match field("allowed") {
                    Some(Value::Bool(b)) => *b,
                    Some(other) => return Err(wrong_type("allowed", "a boolean", other)),
                    None => {
                        return Err(Error::Decision {
                            field: "allowed",
                            message: "missing (required in a decision object)".to_owned(),
                        })
                    }
                };
                let http_status = match field("http_status") {
                    None | Some(Value::Null) => None,
                    Some(v @ Value::Number(n)) => match n.as_u64() {
                        Some(code @ 100..=599) => u16::try_from(code).ok(),
                        _ => {
                            return Err(wrong_type("http_status", "an integer from 100 to 599", v))
                        }
                    },
                    Some(other) => {
                        return Err(wrong_type(
                            "http_status",
                            "an integer from 100 to 599",
                            other,
                        ))
                    }
                };
                let reason = match field("reason") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.to_string()),
                    Some(other) => return Err(wrong_type("reason", "a string", other)),
                };
                let headers = header_map("headers", field("headers"))?;
                let response_headers_to_add =
                    header_map("response_headers_to_add", field("response_headers_to_add"))?;
                let request_headers_to_remove = match field("request_headers_to_remove") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(v @ (Value::Array(_) | Value::Set(_))) => {
                        strings("request_headers_to_remove", v)?
                    }
                    Some(other) => {
                        return Err(wrong_type(
                            "request_headers_to_remove",
                            "an array of strings",
                            other,
                        ))
                    }
                };
                let body = match field("body") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.to_string()),
                    Some(other) => return Err(wrong_type("body", "a string", other)),
                };
                Ok(Decision {
                    allowed,
                    http_status,
                    reason,
                    headers,
                    response_headers_to_add,
                    request_headers_to_remove,
                    body,
                    cache: CacheUse::default(),
                })
            }
            other => Err(wrong_type("decision", "a boolean or an object", other)),
        }
    }
}

/// `{"name": "value"}` or `{"name": ["v1", "v2"]}`, the shapes OPA-Envoy
/// accepts, flattened to pairs in name order.
impl Decision {
    /// The decision as `policy eval` prints it: every field, absent ones as
    /// null or empty, so authors see what the proxy will do with it.
    pub fn to_json(&self) -> serde_json::Value {
        let pairs = |h: &[(String, String)]| {
            let mut map = serde_json::Map::new();
            for (k, v) in h {
                match map.get_mut(k) {
                    Some(serde_json::Value::Array(values)) => values.push(v.as_str().into()),
                    Some(first) => *first = serde_json::json!([first.clone(), v]),
                    None => {
                        map.insert(k.clone(), v.as_str().into());
                    }
                }
            }
            serde_json::Value::Object(map)
        };
        serde_json::json!({
            "allowed": self.allowed,
            "http_status": self.http_status,
            "reason": self.reason,
            "headers": pairs(&self.headers),
            "response_headers_to_add": pairs(&self.response_headers_to_add),
            "request_headers_to_remove": self.request_headers_to_remove,
            "body": self.body,
        })
    }
}

fn header_map(field: &'static str, value: Option<&Value>) -> Result<Vec<(String, String)>, Error> {
    let map = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(other) => return Err(wrong_type(field, "an object of strings", other)),
    };
    let mut headers = Vec::with_capacity(map.len());
    for (name, value) in map.iter_sorted() {
        let Value::String(n) = name else {
            return Err(wrong_type(field, "string header names", name));
        };
        match value {
            Value::String(v) => headers.push((n.to_string(), v.to_string())),
            Value::Array(_) => {
                for v in strings(field, value)? {
                    headers.push((n.to_string(), v));
                }
            }
            _ => {
                return Err(Error::Decision {
                    field,
                    message: format!("expected string values, got {name} = {value}"),
                })
            }
        }
    }
    Ok(headers)
}

fn strings(field: &'static str, value: &Value) -> Result<Vec<String>, Error> {
    let items: Vec<&Value> = match value {
        Value::Array(a) => a.iter().collect(),
        Value::Set(s) => s.iter().collect(),
        other => return Err(wrong_type(field, "an array of strings", other)),
    };
    items
        .into_iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.to_string()),
            other => Err(wrong_type(field, "an array of strings", other)),
        })
        .collect()
}

fn wrong_type(field: &'static str, expected: &str, got: &Value) -> Error {
    Error::Decision {
        field,
        message: format!("expected {expected}, got {got}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(json: &str) -> Result<Decision, Error> {
        Decision::from_value(&Value::from_json_str(json).unwrap())
    }

    #[test]
    fn booleans() {
        assert_eq!(
            decide("true").unwrap(),
            Decision {
                allowed: true,
                ..Decision::default()
            }
        );
        assert!(!decide("false").unwrap().allowed);
    }

    #[test]
    fn undefined_is_deny_with_reason() {
        let d = Decision::from_value(&Value::Undefined).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.reason.as_deref(), Some(UNDEFINED_REASON));
        assert_eq!(d.http_status, None);
    }

    #[test]
    fn full_object() {
        let d = decide(
            r#"{"allowed": false, "http_status": 429, "reason": "slow down",
                "headers": {"retry-after": "5", "x-b": ["b1", "b2"]}, "unknown": [1]}"#,
        )
        .unwrap();
        assert_eq!(
            d,
            Decision {
                allowed: false,
                http_status: Some(429),
                reason: Some("slow down".into()),
                headers: vec![
                    ("retry-after".into(), "5".into()),
                    ("x-b".into(), "b1".into()),
                    ("x-b".into(), "b2".into())
                ],
                ..Decision::default()
            }
        );
    }

    #[test]
    fn envoy_fields() {
        let d = decide(
            r#"{"allowed": false, "body": "no entry", "response_headers_to_add": {"x-r": "1"},
                "request_headers_to_remove": ["authorization", "cookie"]}"#,
        )
        .unwrap();
        assert_eq!(d.body.as_deref(), Some("no entry"));
        assert_eq!(d.response_headers_to_add, vec![("x-r".into(), "1".into())]);
        assert_eq!(d.request_headers_to_remove, vec!["authorization", "cookie"]);
        for bad in [
            r#"{"allowed": true, "body": {"a": 1}}"#,
            r#"{"allowed": true, "response_headers_to_add": ["x"]}"#,
            r#"{"allowed": true, "request_headers_to_remove": "cookie"}"#,
            r#"{"allowed": true, "request_headers_to_remove": [1]}"#,
            r#"{"allowed": true, "headers": {"a": [1]}}"#,
        ] {
            assert!(decide(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn minimal_object() {
        let d = decide(r#"{"allowed": true}"#).unwrap();
        assert!(d.allowed);
        assert_eq!(d.http_status, None);
        assert_eq!(d.reason, None);
        assert!(d.headers.is_empty());
    }

    fn field_of(err: Error) -> &'static str {
        match err {
            Error::Decision { field, .. } => field,
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn missing_allowed_is_error() {
        assert_eq!(
            field_of(decide(r#"{"reason": "x"}"#).unwrap_err()),
            "allowed"
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = decide(r#"{"allowed": "yes"}"#).unwrap_err();
        assert!(err.to_string().contains("allowed"), "{err}");
        assert_eq!(field_of(err), "allowed");
        assert_eq!(
            field_of(decide(r#"{"allowed": false, "http_status": "x"}"#).unwrap_err()),
            "http_status"
        );
        assert_eq!(
            field_of(decide(r#"{"allowed": false, "reason": 1}"#).unwrap_err()),
            "reason"
        );
        assert_eq!(
            field_of(decide(r#"{"allowed": false, "headers": ["a"]}"#).unwrap_err()),
            "headers"
        );
        assert_eq!(
            field_of(decide(r#"{"allowed": false, "headers": {"a": 1}}"#).unwrap_err()),
            "headers"
        );
        assert_eq!(field_of(decide(r#""allow""#).unwrap_err()), "decision");
        assert_eq!(field_of(decide("[true]").unwrap_err()), "decision");
    }

    #[test]
    fn http_status_range() {
        for ok in ["100", "403", "599", "403.0"] {
            let d = decide(&format!(r#"{{"allowed": false, "http_status": {ok}}}"#)).unwrap();
            assert!(d.http_status.is_some(), "{ok}");
        }
        for bad in ["99", "600", "-1", "403.5", "70000"] {
            let err = decide(&format!(r#"{{"allowed": false, "http_status": {bad}}}"#));
            assert_eq!(field_of(err.unwrap_err()), "http_status", "{bad}");
        }
    }
}
