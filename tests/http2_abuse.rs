//! HTTP/2 abuse written as raw frames over a real mTLS connection: more
//! streams than the limit, the rapid-reset flood (CVE-2023-44487), and an
//! idle HTTP/2 connection. A client library would obey the server's
//! settings; an attacker does not, so neither do these tests.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use portcullis::certs::LeafSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `GET https://localhost/v1/payments/p1` in HPACK: static-table indexes
/// and literals without indexing, so every block is independent of the
/// decoder's dynamic table.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87]; // :method GET, :scheme https
    for (index, value) in [(4u8, "/v1/payments/p1"), (1, "localhost")] {
        b.push(index); // literal without indexing, indexed name
        b.push(u8::try_from(value.len()).unwrap());
        b.extend_from_slice(value.as_bytes());
    }
    b
}

/// One frame as read: type, flags, stream, payload.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn code(&self) -> u32 {
        // RST_STREAM: the code; GOAWAY: last stream id, then the code.
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Reads one frame; `None` at EOF or on a connection error.
async fn read_frame(tls: &mut Tls) -> Option<Frame> {
    let mut head = [0u8; 9];
    tls.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    tls.read_exact(&mut payload).await.ok()?;
    let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream,
        payload,
    })
}

/// An h2 connection past the preface and the settings exchange.
async fn open(h: &Harness) -> Tls {
    let (client, _) = h.pki.client_with(&LeafSpec::svid(CHECKOUT), &[b"h2"]);
    let mut tls = connect_tls(h.running().inbound_addr, client).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    tls.write_all(&hello).await.unwrap();
    loop {
        let f = read_frame(&mut tls).await.expect("server settings");
        if f.kind == SETTINGS && f.flags & ACK == 0 {
            tls.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
            return tls;
        }
    }
}

/// Frames until the server closes (or `limit` passes), by kind.
async fn frames_until_close(tls: &mut Tls, limit: Duration) -> (Vec<Frame>, bool) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, read_frame(tls)).await {
            Ok(Some(f)) => seen.push(f),
            Ok(None) => return (seen, true),
            Err(_) => return (seen, false),
        }
    }
}

#[tokio::test]
async fn streams_over_the_limit_are_refused_and_the_rest_served() {
    let h = Harness::start_with(&shipped_policy(), |c| {
        c.inbound.h2_max_concurrent_streams = 2;
    })
    .await;
    let mut tls = open(&h).await;
    // Four requests whose bodies never end: each stream stays open.
    let mut out = Vec::new();
    for stream in [1u32, 3, 5, 7] {
        out.extend(frame(HEADERS, END_HEADERS, stream, &get_block()));
    }
    tls.write_all(&out).await.unwrap();
    let mut resets: HashMap<u32, u32> = HashMap::new();
    while resets.len() < 2 {
        let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut tls))
            .await
            .expect("no RST_STREAM for the streams over the limit")
            .expect("connection closed");
        if f.kind == RST_STREAM {
            resets.insert(f.stream, f.code());
        }
    }
    assert_eq!(
        resets,
        HashMap::from([(5, REFUSED_STREAM), (7, REFUSED_STREAM)])
    );
    // The two admitted streams are still alive: finishing their bodies
    // gets each a response.
    let mut out = Vec::new();
    for stream in [1u32, 3] {
        out.extend(frame(DATA, END_STREAM, stream, &[]));
    }
    tls.write_all(&out).await.unwrap();
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let f = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut tls))
            .await
            .expect("admitted streams were not answered")
            .expect("connection closed");
        assert_ne!(f.kind, RST_STREAM, "stream {} reset", f.stream);
        if f.kind == HEADERS {
            // :status 200 is static-table entry 8.
            assert_eq!(f.payload.first(), Some(&0x88), "stream {}", f.stream);
            answered.push(f.stream);
        }
    }
    answered.sort();
    assert_eq!(answered, [1, 3]);
    assert_eq!(h.service.received().len(), 2);
}

#[tokio::test]
async fn rapid_reset_flood_gets_goaway_while_a_good_client_is_served() {
    let h = Harness::start_with(&shipped_policy(), |c| {
        c.inbound.h2_max_pending_accept_reset_streams = 20;
    })
    .await;
    let addr = h.running().inbound_addr;
    let good = h.pki.client(CHECKOUT);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let good_client = tokio::spawn(async move {
        let mut statuses = Vec::new();
        while !*stopped.borrow() {
            let r = portcullis::demo::call(addr, good.clone(), "GET", "/v1/payments/p1", &[], "")
                .await
                .unwrap();
            statuses.push(r.status);
        }
        statuses
    });

    let tls = open(&h).await;
    const PAIRS: u32 = 5_000;
    let mut flood = Vec::new();
    for i in 0..PAIRS {
        let stream = 2 * i + 1;
        flood.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            stream,
            &get_block(),
        ));
        flood.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
    }
    // The server may hang up before it has read everything.
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&flood).await;
    });
    let mut goaway = None;
    let mut closed = false;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Parse frames out of a byte buffer: the read half is not a `Tls`.
    while !closed {
        match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed = true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let f: Vec<u8> = buf.drain(..9 + len).collect();
            if f[3] == GOAWAY {
                goaway = Some(u32::from_be_bytes(f[13..17].try_into().unwrap()));
            }
        }
    }
    writer.await.unwrap();
    assert!(closed, "the flooding connection was not closed");
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "no GOAWAY ENHANCE_YOUR_CALM"
    );

    limit_count_reaches(h.running(), "h2_reset_flood", 1).await;
    stop.send(true).unwrap();
    let statuses = good_client.await.unwrap();
    assert!(!statuses.is_empty());
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // A fresh call after the flood is served too.
    let after = h
        .call(h.pki.client(CHECKOUT), "GET", "/v1/payments/p1", &[])
        .await
        .unwrap();
    assert_eq!(after.status, 200);
    // Of 5,000 flood streams only the few served before the GOAWAY, at
    // most, reached the service; the rest are the good client's.
    let flood_reached = h.service.received().len() - statuses.len() - 1;
    assert!(
        flood_reached <= 100,
        "{flood_reached} flood requests reached the service"
    );
}

#[tokio::test]
async fn an_idle_http2_connection_gets_goaway_and_is_closed() {
    let h = Harness::start_with(&shipped_policy(), |c| {
        c.inbound.idle_timeout_ms = 300;
    })
    .await;
    let mut tls = open(&h).await;
    tls.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &get_block()))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let (frames, closed) = frames_until_close(&mut tls, Duration::from_secs(5)).await;
    assert!(closed, "the idle connection was not closed");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // The request was answered before the idle close.
    assert!(frames.iter().any(|f| f.kind == HEADERS && f.stream == 1));
    let goaway = frames
        .iter()
        .find(|f| f.kind == GOAWAY)
        .expect("no GOAWAY before the close");
    assert_eq!(goaway.code(), 0, "GOAWAY NO_ERROR");
    limit_count_reaches(h.running(), "idle_timeout", 1).await;
}
