//! `policy.max_body_bytes`: JSON and form bodies shown to the policy, the
//! body forwarded intact, and nothing read past the limit.

mod common;

use std::convert::Infallible;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use portcullis::demo;
use tokio_rustls::TlsConnector;

const POLICY: &str = r#"package portcullis.authz
import rego.v1

default allow := {"allowed": false, "reason": "no rule matched"}

allow := {"allowed": false, "reason": "body too large to inspect"} if input.truncated_body

allow := {"allowed": true, "reason": sprintf("amount %v", [input.parsed_body.amount])} if {
	not input.truncated_body
	input.parsed_body.amount < 100
}

allow := {"allowed": true, "reason": "form"} if {
	input.parsed_body.kind == ["refund"]
}

allow := {"allowed": true, "reason": "no body shown"} if {
	input.attributes.request.http.method == "PUT"
	not input.parsed_body
	not input.truncated_body
}
"#;

const LIMIT: u64 = 64;

async fn start(limit: u64) -> (Harness, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.rego"), POLICY).unwrap();
    let h = Harness::start_with(dir.path(), |c| c.policy.max_body_bytes = limit).await;
    (h, dir)
}

async fn post(h: &Harness, method: &str, content_type: &str, body: &str) -> demo::Reply {
    demo::call(
        h.running().inbound_addr,
        h.pki.client(CHECKOUT),
        method,
        "/v1/payments",
        &[("content-type", content_type)],
        body,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn json_and_form_bodies_are_parsed_and_forwarded_intact() {
    let (mut h, _dir) = start(LIMIT).await;
    let small = r#"{"amount": 50, "currency": "EUR"}"#;
    assert_eq!(
        post(&h, "POST", "application/json", small).await.status,
        200
    );
    assert_eq!(
        post(&h, "POST", "application/json", r#"{"amount": 500}"#)
            .await
            .status,
        403
    );
    assert_eq!(
        post(
            &h,
            "POST",
            "application/x-www-form-urlencoded",
            "kind=refund&id=7"
        )
        .await
        .status,
        200
    );
    let got = h.service.received();
    assert_eq!(got.len(), 2);
    assert_eq!(&got[0].body[..], small.as_bytes());
    assert_eq!(&got[1].body[..], b"kind=refund&id=7");
    // Not JSON or a form: never read, nothing shown.
    assert_eq!(post(&h, "PUT", "text/plain", "hello").await.status, 200);
    assert_eq!(&h.service.received()[2].body[..], b"hello");

    let events = h.stop().await;
    assert_eq!(requests(&events)[0]["decision"]["reason"], "amount 50");
}

#[tokio::test]
async fn a_body_over_the_limit_is_truncated_for_the_policy_but_not_for_the_service() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.rego"),
        "package portcullis.authz\nimport rego.v1\nallow if input.truncated_body\n",
    )
    .unwrap();
    let h = Harness::start_with(dir.path(), |c| c.policy.max_body_bytes = LIMIT).await;
    // Declared too large by content-length: not read at all.
    let big = format!(r#"{{"amount": 1, "pad": "{}"}}"#, "x".repeat(10_000));
    assert_eq!(post(&h, "POST", "application/json", &big).await.status, 200);
    assert_eq!(h.service.received()[0].body.len(), big.len());
    assert_eq!(&h.service.received()[0].body[..], big.as_bytes());

    // Chunked, no length: read until past the limit, then the frames read
    // are replayed ahead of the rest.
    let (mut sender, tx, stream) = streaming_request(&h).await;
    let chunks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![b'a' + i; 40]).collect();
    let send = async {
        for c in &chunks {
            tx.send(Ok(Frame::data(Bytes::from(c.clone()))))
                .await
                .unwrap();
        }
        drop(tx);
    };
    let (resp, ()) = tokio::join!(sender.send_request(chunked_post(stream)), send);
    assert_eq!(resp.unwrap().status(), 200);
    assert_eq!(h.service.received()[1].body, chunks.concat());
}

type Sender = hyper::client::conn::http1::SendRequest<StreamBody<ChunkStream>>;
type ChunkTx = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, Infallible>>;
type ChunkStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;

/// A connection, and a body whose chunks the test sends through `ChunkTx`.
async fn streaming_request(h: &Harness) -> (Sender, ChunkTx, ChunkStream) {
    let tcp = tokio::net::TcpStream::connect(h.running().inbound_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(h.pki.client(CHECKOUT))
        .connect(name, tcp)
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    (sender, tx, Box::pin(tokio_stream_from(rx)))
}

/// A JSON POST without content-length: the body is sent chunked.
fn chunked_post(stream: ChunkStream) -> http::Request<StreamBody<ChunkStream>> {
    http::Request::post("/v1/payments")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(StreamBody::new(stream))
        .unwrap()
}

#[tokio::test]
async fn bodies_are_not_read_when_off() {
    let (h, _dir) = start(0).await;
    // With reading off, the JSON rule cannot match: undefined parsed_body.
    assert_eq!(
        post(&h, "POST", "application/json", r#"{"amount": 5}"#)
            .await
            .status,
        403
    );
    assert_eq!(post(&h, "PUT", "application/json", "{}").await.status, 200);
}

/// The client sends the head and a first chunk past the limit, then
/// stalls: the decision must come without waiting for the rest.
#[tokio::test]
async fn the_decision_does_not_wait_for_a_body_past_the_limit() {
    let (h, _dir) = start(LIMIT).await;
    let (mut sender, tx, stream) = streaming_request(&h).await;
    tx.send(Ok(Frame::data(Bytes::from(vec![b' '; 2 * LIMIT as usize]))))
        .await
        .unwrap();
    let req = chunked_post(stream);
    let resp = tokio::time::timeout(std::time::Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("the decision waited for the whole body")
        .unwrap();
    assert_eq!(resp.status(), 403);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("body too large to inspect"),
        "{body:?}"
    );
    drop(tx);
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
