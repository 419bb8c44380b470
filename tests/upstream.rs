//! The sidecar's HTTP/1.1 client against a service that is not hyper: a
//! Python process answering with chunked bodies, HTTP/1.0 bodies that end
//! at the close, and a head two parsers could read differently. Each
//! answer says which of its connections it came on, so connection reuse is
//! observed from the service's side.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::*;

const SERVICE: &str = r#"
import socket, sys, threading
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
print(listener.getsockname()[1], flush=True)
count = 0
def serve(conn, number):
    reader = conn.makefile("rb")
    while True:
        line = reader.readline()
        if not line:
            break
        path = line.split()[1].decode()
        while reader.readline() not in (b"\r\n", b""):
            pass
        tag = b"x-connection: %d\r\n" % number
        if path.endswith("/chunked"):
            conn.sendall(b"HTTP/1.1 200 OK\r\n" + tag + b"content-type: text/plain\r\n"
                         b"transfer-encoding: chunked\r\n\r\n"
                         b"4\r\npay-\r\n5;ext=1\r\nments\r\n0\r\nx-trailer: t\r\n\r\n")
        elif path.endswith("/until-close"):
            conn.sendall(b"HTTP/1.0 200 OK\r\n" + tag + b"content-type: text/plain\r\n\r\n"
                         b"until the close")
            break
        elif path.endswith("/both"):
            conn.sendall(b"HTTP/1.1 200 OK\r\n" + tag + b"content-length: 5\r\n"
                         b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n")
            break
    conn.close()
while True:
    conn, _ = listener.accept()
    count += 1
    threading.Thread(target=serve, args=(conn, count), daemon=True).start()
"#;

/// The Python service, killed on drop.
struct Service {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Service {
    fn start() -> Service {
        let mut child = Command::new("python3")
            .args(["-c", SERVICE])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        // The port it printed once listening is the readiness signal.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().unwrap();
        Service {
            child,
            addr: ([127, 0, 0, 1], port).into(),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn chunked_and_close_delimited_answers_pass_and_an_ambiguous_one_is_a_502() {
    let service = Service::start();
    let mut h = Harness::start_with(&shipped_policy(), |c| {
        c.inbound.upstream = format!("http://{}", service.addr);
        // One worker: one upstream pool, so reuse shows as one service-side
        // connection.
        c.inbound.workers = 1;
    })
    .await;
    let client = h.pki.client(CHECKOUT);

    let mut connections = Vec::new();
    for _ in 0..2 {
        let reply = h
            .call(client.clone(), "GET", "/v1/payments/chunked", &[])
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "pay-ments");
        connections.push(reply.headers["x-connection"].to_str().unwrap().to_owned());
    }
    // Read to its end, the chunked answer left the connection reusable.
    assert_eq!(connections[0], connections[1]);

    let reply = h
        .call(client.clone(), "GET", "/v1/payments/until-close", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "until the close");
    assert_eq!(reply.headers["x-connection"], connections[1].as_str());

    // That connection ended with its answer: the next one is new.
    let reply = h
        .call(client.clone(), "GET", "/v1/payments/chunked", &[])
        .await
        .unwrap();
    assert_eq!(reply.body, "pay-ments");
    assert_ne!(reply.headers["x-connection"], connections[1].as_str());

    // Content-Length and chunked at once: the caller gets a 502 naming it,
    // never a body read either way.
    let reply = h
        .call(client.clone(), "GET", "/v1/payments/both", &[])
        .await
        .unwrap();
    assert_eq!(reply.status, 502);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error"], "upstream_error");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("both Transfer-Encoding and Content-Length"),
        "{body}"
    );
    assert_eq!(
        h.running()
            .metrics
            .upstream_errors
            .with_label_values(&["protocol"])
            .get(),
        1
    );

    let events = h.stop().await;
    let statuses: Vec<u64> = requests(&events)
        .iter()
        .map(|e| e["response"]["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 502]);
}

/// A caller that hangs up while its allowed request is with the service:
/// the sidecar notices, gives the upstream exchange up (the service sees
/// its connection closed, long before any timeout), and still audits the
/// request, as a 499 with its allow decision.
#[tokio::test]
async fn a_caller_hanging_up_mid_request_abandons_the_exchange_and_is_audited() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived, head) = tokio::sync::oneshot::channel();
    // A service that takes one request and never answers it: it only
    // reads on until the sidecar closes the connection.
    let service = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut read = Vec::new();
        let mut buf = [0u8; 4096];
        while !read.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the request head");
            read.extend_from_slice(&buf[..n]);
        }
        arrived.send(read).unwrap();
        while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let mut h = Harness::start_with(&shipped_policy(), |c| {
        c.inbound.upstream = format!("http://{addr}");
        // Only the hang-up can end the exchange within the test.
        c.inbound.upstream_timeout_ms = 120_000;
    })
    .await;

    let mut tls = connect_tls(h.running().inbound_addr, h.pki.client(CHECKOUT)).await;
    tls.write_all(b"GET /v1/payments/p1 HTTP/1.1\r\nhost: payments\r\n\r\n")
        .await
        .unwrap();
    let head = String::from_utf8(head.await.unwrap()).unwrap();
    assert!(
        head.starts_with("GET /v1/payments/p1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("x-spiffe-id: {CHECKOUT}\r\n")),
        "{head}"
    );

    drop(tls);
    tokio::time::timeout(std::time::Duration::from_secs(10), service)
        .await
        .expect("the sidecar kept the abandoned exchange open")
        .unwrap();

    // Counted under the decision that let it through, with the status the
    // trail gives it. The service sees the close while the request's
    // future is being dropped, so the count may land a moment later.
    let series = r#"portcullis_requests_total{decision="allow",status="4xx"}"#;
    eventually_async(
        std::time::Duration::from_secs(5),
        "the abandoned request to be counted",
        || async { sample(&h.scrape().await, series) == 1.0 },
    )
    .await;
    assert_eq!(
        sample(
            &h.scrape().await,
            r#"portcullis_requests_total{decision="allow",status="2xx"}"#
        ),
        0.0
    );

    let events = h.stop().await;
    let reqs = requests(&events);
    assert_eq!(reqs.len(), 1, "{events:?}");
    assert_eq!(reqs[0]["response"]["status"], 499);
    assert_eq!(
        reqs[0]["detail"],
        "client closed the request before a response"
    );
    // What was decided before the request went to the service.
    let decision = &reqs[0]["decision"];
    assert_eq!(decision["allowed"], true, "{}", reqs[0]);
    assert_eq!(
        decision["reason"],
        format!("{CHECKOUT} may GET /v1/payments/p1")
    );
    assert_ne!(
        decision["cached"], true,
        "the first request cannot be a hit"
    );
    assert!(decision["policy_revision"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
}
