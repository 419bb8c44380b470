//! `io.jwt.decode_verify` and `io.jwt.decode`, which regorus 0.14 lacks and
//! OPA-Envoy policies use for bearer tokens.
//!
//! Only HMAC keys (`{"secret": …}` with HS256/384/512) are verified.
//! Anything else (`cert`, `jwks`, RS*/ES*/PS* tokens) is an evaluation
//! error rather than a `false`, so a policy can never silently rely on a
//! check this build does not make. regorus's extension API returns `anyhow`
//! errors; they stay inside these two functions.

use std::time::{SystemTime, UNIX_EPOCH};

use regorus::Value;
use sha2::{Digest, Sha256, Sha384, Sha512};

type Result<T> = anyhow::Result<T>;

/// Registers the functions on `engine`.
pub(crate) fn register(engine: &mut regorus::Engine) -> Result<()> {
    engine.add_extension("io.jwt.decode_verify".into(), 2, Box::new(decode_verify))?;
    engine.add_extension("io.jwt.decode".into(), 1, Box::new(decode))?;
    Ok(())
}

/// `[header, payload, signature_hex]`; no verification, as in OPA.
fn decode(args: Vec<Value>) -> Result<Value> {
    let token = string_arg(&args, 0, "io.jwt.decode")?;
    let parts = Parts::split(token)?;
    Ok(Value::from(vec![
        parts.header.clone(),
        parts.payload.clone(),
        Value::from(hex::encode(&parts.signature)),
    ]))
}

/// `[valid, header, payload]`; `[false, {}, {}]` unless the signature and
/// every constraint check out, as in OPA.
fn decode_verify(args: Vec<Value>) -> Result<Value> {
    let token = string_arg(&args, 0, "io.jwt.decode_verify")?;
    let constraints = match args.get(1) {
        Some(Value::Object(c)) => c.clone(),
        _ => anyhow::bail!("io.jwt.decode_verify: constraints must be an object"),
    };
    let get = |k: &str| constraints.get(&Value::from(k));
    for unsupported in ["cert", "jwks"] {
        if get(unsupported).is_some() {
            anyhow::bail!(
                "io.jwt.decode_verify: `{unsupported}` keys are not supported by portcullis (HMAC `secret` only)"
            );
        }
    }
    let Some(Value::String(secret)) = get("secret") else {
        anyhow::bail!("io.jwt.decode_verify: a `secret` constraint is required");
    };
    let invalid = || {
        Value::from(vec![
            Value::Bool(false),
            Value::new_object(),
            Value::new_object(),
        ])
    };
    let Ok(parts) = Parts::split(token) else {
        return Ok(invalid());
    };
    let alg = match &parts.header[&Value::from("alg")] {
        Value::String(a) => a.to_string(),
        _ => return Ok(invalid()),
    };
    if let Some(Value::String(want)) = get("alg") {
        if want.as_ref() != alg {
            return Ok(invalid());
        }
    }
    let key = secret.as_bytes();
    let signed = parts.signed.as_bytes();
    let expected = match alg.as_str() {
        "HS256" => hmac::<Sha256>(64, key, signed),
        "HS384" => hmac::<Sha384>(128, key, signed),
        "HS512" => hmac::<Sha512>(128, key, signed),
        other => anyhow::bail!(
            "io.jwt.decode_verify: token algorithm {other} needs a key type portcullis does not support (HMAC only)"
        ),
    };
    if !constant_time_eq(&expected, &parts.signature) {
        return Ok(invalid());
    }

    let claim = |k: &str| &parts.payload[&Value::from(k)];
    let now_s = match get("time") {
        Some(n @ Value::Number(_)) => seconds(n).unwrap_or(0.0) / 1e9,
        _ => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    };
    if let exp @ Value::Number(_) = claim("exp") {
        if now_s >= seconds(exp).unwrap_or(f64::MIN) {
            return Ok(invalid());
        }
    }
    if let nbf @ Value::Number(_) = claim("nbf") {
        if now_s < seconds(nbf).unwrap_or(f64::MAX) {
            return Ok(invalid());
        }
    }
    if let Some(iss) = get("iss") {
        if claim("iss") != iss {
            return Ok(invalid());
        }
    }
    match (get("aud"), claim("aud")) {
        (None, Value::Undefined) => {}
        (None, _) => return Ok(invalid()),
        (Some(want), Value::String(_)) if claim("aud") == want => {}
        (Some(want), Value::Array(auds)) if auds.iter().any(|a| a == want) => {}
        (Some(_), _) => return Ok(invalid()),
    }
    Ok(Value::from(vec![
        Value::Bool(true),
        parts.header,
        parts.payload,
    ]))
}

/// Nanosecond times exceed f64's exact-integer range, which regorus's
/// `as_f64` refuses; precision below a microsecond does not matter here.
fn seconds(v: &Value) -> Option<f64> {
    let Value::Number(n) = v else { return None };
    n.as_f64()
        .or_else(|| n.as_u64().map(|v| v as f64))
        .or_else(|| n.as_i64().map(|v| v as f64))
}

fn string_arg<'a>(args: &'a [Value], i: usize, f: &str) -> Result<&'a str> {
    match args.get(i) {
        Some(Value::String(s)) => Ok(s),
        _ => anyhow::bail!("{f}: argument {} must be a string", i + 1),
    }
}

struct Parts {
    /// `header.payload`, the bytes the signature covers.
    signed: String,
    header: Value,
    payload: Value,
    signature: Vec<u8>,
}

impl Parts {
    fn split(token: &str) -> Result<Parts> {
        let mut it = token.split('.');
        let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
            anyhow::bail!("not a compact JWS (three dot-separated parts)");
        };
        let json = |segment: &str| -> Result<Value> {
            let bytes = base64url(segment)?;
            let text = std::str::from_utf8(&bytes)?;
            let v = Value::from_json_str(text)?;
            anyhow::ensure!(
                matches!(v, Value::Object(_)),
                "JWT segment is not an object"
            );
            Ok(v)
        };
        Ok(Parts {
            signed: format!("{h}.{p}"),
            header: json(h)?,
            payload: json(p)?,
            signature: base64url(s)?,
        })
    }
}

fn base64url(s: &str) -> Result<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => anyhow::bail!("invalid base64url character {:?}", c as char),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// RFC 2104 HMAC over a `sha2` digest with the given block size.
fn hmac<D: Digest>(block: usize, key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = if key.len() > block {
        D::digest(key).to_vec()
    } else {
        key.to_vec()
    };
    k.resize(block, 0);
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = D::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    D::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// The comparison's time does not depend on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    // HS256, secret "secret", exp 2100-01-01.
    const ADMIN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoiYWRtaW4iLCJzdWIiOiJZbTlpIiwibmJmIjoxNTE0ODUxMTM5LCJleHAiOjQxMDI0NDQ4MDB9.MXKBip1sbpbsSe0LyguV77PQzlsHt12xnGRT2pUcNXE";
    const EXPIRED: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoiYWRtaW4iLCJzdWIiOiJZbTlpIiwibmJmIjoxNTE0ODUxMTM5LCJleHAiOjE2NDEwODE1Mzl9.WCxNAveAVAdRCmkpIObOTaSd0AJRECY2Ch2Qdic3kU8";

    fn verify(token: &str, constraints: &str) -> Result<Value> {
        decode_verify(vec![
            Value::from(token),
            Value::from_json_str(constraints).unwrap(),
        ])
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac::<Sha256>(64, b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn verifies_signature_and_times() {
        let ok = verify(ADMIN, r#"{"secret": "secret"}"#).unwrap();
        assert_eq!(ok[0], Value::Bool(true));
        assert_eq!(ok[2]["role"], Value::from("admin"));
        let bad = verify(ADMIN, r#"{"secret": "other"}"#).unwrap();
        assert_eq!(bad[0], Value::Bool(false));
        assert_eq!(bad[2], Value::new_object());
        assert_eq!(
            verify(EXPIRED, r#"{"secret": "secret"}"#).unwrap()[0],
            Value::Bool(false)
        );
        // At a time before expiry the expired token is valid.
        let then = verify(
            EXPIRED,
            r#"{"secret": "secret", "time": 1600000000000000000}"#,
        )
        .unwrap();
        assert_eq!(then[0], Value::Bool(true));
        assert_eq!(
            verify(ADMIN, r#"{"secret": "secret", "alg": "HS512"}"#).unwrap()[0],
            Value::Bool(false)
        );
        assert_eq!(
            verify(ADMIN, r#"{"secret": "secret", "aud": "payments"}"#).unwrap()[0],
            Value::Bool(false)
        );
        assert_eq!(
            verify("a.b", r#"{"secret": "secret"}"#).unwrap()[0],
            Value::Bool(false)
        );
    }

    #[test]
    fn unsupported_keys_are_errors_not_false() {
        assert!(verify(ADMIN, r#"{"cert": "-----BEGIN CERTIFICATE-----"}"#).is_err());
        assert!(verify(ADMIN, r#"{}"#).is_err());
    }

    #[test]
    fn decode_without_verification() {
        let d = decode(vec![Value::from(ADMIN)]).unwrap();
        assert_eq!(d[0]["alg"], Value::from("HS256"));
        assert_eq!(d[1]["sub"], Value::from("Ym9i"));
    }
}
