//! The decision a policy returns, in either of the two shapes OPA-Envoy
//! policies use: a bare boolean or a decision object.

use regorus::Value;

use super::Error;

/// Reason given when the query produced no value at all. Deny rather than
/// error: "no rule matched" is the ordinary default-deny case, not a fault.
pub const UNDEFINED_REASON: &str = "policy decision undefined (no rule matched)";

/// What the policy said about one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub allowed: bool,
    /// Status for the denial response; the proxy picks one when absent.
    pub http_status: Option<u16>,
    pub reason: Option<String>,
    /// Extra response headers the policy asked for, in name order.
    pub headers: Vec<(String, String)>,
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
                let headers = match field("headers") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Object(map)) => {
                        let mut headers = Vec::with_capacity(map.len());
                        for (name, value) in map.iter_sorted() {
                            match (name, value) {
                                (Value::String(n), Value::String(v)) => {
                                    headers.push((n.to_string(), v.to_string()));
                                }
                                _ => {
                                    return Err(Error::Decision {
                                        field: "headers",
                                        message: format!(
                                            "expected string values, got {name} = {value}"
                                        ),
                                    })
                                }
                            }
                        }
                        headers
                    }
                    Some(other) => {
                        return Err(wrong_type("headers", "an object of strings", other))
                    }
                };
                Ok(Decision {
                    allowed,
                    http_status,
                    reason,
                    headers,
                })
            }
            other => Err(wrong_type("decision", "a boolean or an object", other)),
        }
    }
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
                "headers": {"retry-after": "5", "x-b": "b"}, "body": "ignored"}"#,
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
                    ("x-b".into(), "b".into())
                ],
            }
        );
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
