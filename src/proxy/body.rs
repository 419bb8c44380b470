//! Reading the start of a request body for the policy without holding the
//! body back from the service.
//!
//! The frames read for the policy are kept and replayed in front of the
//! rest of the stream, so the upstream receives the body byte for byte.
//! Reading stops as soon as the limit is passed: a large upload is never
//! buffered beyond `max_body_bytes` plus the one frame that crossed it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// The body forwarded upstream: frames already read, then the rest.
#[derive(Debug)]
pub struct Replay {
    prefix: VecDeque<Frame<Bytes>>,
    prefix_len: u64,
    rest: Option<Incoming>,
}

impl Replay {
    pub fn new(body: Incoming) -> Replay {
        Replay {
            prefix: VecDeque::new(),
            prefix_len: 0,
            rest: Some(body),
        }
    }

    /// No body at all.
    #[cfg(test)]
    pub fn empty() -> Replay {
        Replay {
            prefix: VecDeque::new(),
            prefix_len: 0,
            rest: None,
        }
    }

    /// A body of these pieces, all there already.
    #[cfg(test)]
    pub fn of(pieces: &[&'static str]) -> Replay {
        Replay {
            prefix: pieces
                .iter()
                .map(|p| Frame::data(Bytes::from_static(p.as_bytes())))
                .collect(),
            prefix_len: pieces.iter().map(|p| p.len() as u64).sum(),
            rest: None,
        }
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.prefix.pop_front() {
            if let Some(data) = frame.data_ref() {
                this.prefix_len -= data.len() as u64;
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self
            .rest
            .as_ref()
            .map(|r| r.size_hint())
            .unwrap_or_else(|| SizeHint::with_exact(0));
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + self.prefix_len);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + self.prefix_len);
        }
        hint
    }
}

/// What the policy gets to see of a body.
pub struct Prefix {
    /// The whole body when it fit within the limit.
    pub complete: Option<Bytes>,
    pub truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the request body did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("the request body could not be read: {0}")]
    Read(#[from] hyper::Error),
}

/// Which parsed form the policy is offered: JSON and forms only.
pub fn kind(headers: &HeaderMap) -> Option<crate::policy::input::BodyKind> {
    let ct = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    crate::policy::input::BodyKind::of(ct)
}

/// Reads up to `limit` bytes of `body`. A declared `content-length` over
/// the limit is not read at all.
pub async fn read_prefix(
    body: Incoming,
    headers: &HeaderMap,
    limit: usize,
    timeout: Duration,
) -> Result<(Replay, Prefix), Error> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut replay = Replay::new(body);
    if declared.is_some_and(|n| n > limit as u64) {
        return Ok((
            replay,
            Prefix {
                complete: None,
                truncated: true,
            },
        ));
    }
    let mut seen = 0usize;
    let read = async {
        while let Some(rest) = replay.rest.as_mut() {
            if rest.is_end_stream() || seen > limit {
                break;
            }
            match rest.frame().await {
                Some(frame) => {
                    let frame = frame?;
                    if let Some(data) = frame.data_ref() {
                        seen += data.len();
                        replay.prefix_len += data.len() as u64;
                    }
                    replay.prefix.push_back(frame);
                }
                None => {
                    replay.rest = None;
                }
            }
        }
        Ok::<_, Error>(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Error::Timeout(timeout))??;
    let truncated = seen > limit;
    let complete = (!truncated).then(|| {
        let mut all = BytesMut::with_capacity(seen);
        for f in &replay.prefix {
            if let Some(d) = f.data_ref() {
                all.extend_from_slice(d);
            }
        }
        all.freeze()
    });
    Ok((
        replay,
        Prefix {
            complete,
            truncated,
        },
    ))
}
