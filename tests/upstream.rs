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
