//! Decoding a chunked response body from the service (RFC 9112 7.1),
//! strictly: whatever two parsers could read differently is an error, so
//! the connection is closed rather than its next response misread.
//!
//! Chunk extensions and trailer fields are read past and dropped: the
//! request to the service never says the caller accepts trailers (`TE` is
//! hop-by-hop and removed), so the service has no reason to send any.

use bytes::{Buf, Bytes, BytesMut};

/// Longest chunk-size line (digits and extensions) read before giving up.
const MAX_SIZE_LINE: usize = 4096;
/// Most bytes of trailer fields read before giving up.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size")]
    Size,
    #[error("chunk size line longer than {MAX_SIZE_LINE} bytes")]
    SizeLine,
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    #[error("line ending without CR")]
    BareLf,
    #[error("trailer section longer than {MAX_TRAILERS} bytes")]
    Trailers,
}

/// What the bytes buffered so far yield.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    /// The last chunk and the trailer section have been read; whatever
    /// follows in the buffer is not part of this body.
    Done,
    /// The buffer ran out before anything could be returned.
    NeedMore,
}

#[derive(Debug)]
enum State {
    /// Hex digits of a chunk size; `digits` so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// Spaces after the size, before `;` or CR.
    SizeSpace {
        size: u64,
    },
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// Bytes of the current size line, or of the trailer section.
    counted: usize,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder {
            state: State::Size { size: 0, digits: 0 },
            counted: 0,
        }
    }
}

impl Decoder {
    /// Consumes framing from `buf` and returns the next piece of data, the
    /// end of the body, or that more bytes are needed. Data is split off
    /// `buf` without copying.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, ChunkError> {
        loop {
            if let State::Data { left } = self.state {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let data = buf.split_to(n).freeze();
                self.state = match left - n as u64 {
                    0 => State::DataCr,
                    left => State::Data { left },
                };
                return Ok(Step::Data(data));
            }
            if let State::Done = self.state {
                return Ok(Step::Done);
            }
            let Some(&byte) = buf.first() else {
                return Ok(Step::NeedMore);
            };
            buf.advance(1);
            self.state = self.step(byte)?;
        }
    }

    fn step(&mut self, byte: u8) -> Result<State, ChunkError> {
        let in_size_line = matches!(
            self.state,
            State::Size { .. } | State::SizeSpace { .. } | State::Extension { .. }
        );
        if in_size_line {
            self.counted += 1;
            if self.counted > MAX_SIZE_LINE {
                return Err(ChunkError::SizeLine);
            }
        }
        if matches!(
            self.state,
            State::TrailerStart | State::TrailerLine | State::TrailerLf | State::EndLf
        ) {
            self.counted += 1;
            if self.counted > MAX_TRAILERS {
                return Err(ChunkError::Trailers);
            }
        }
        Ok(match self.state {
            State::Size { size, digits } => match (byte as char).to_digit(16) {
                // 16 hex digits fill a u64; a 17th would overflow it.
                Some(d) if digits < 16 => State::Size {
                    size: size << 4 | u64::from(d),
                    digits: digits + 1,
                },
                Some(_) => return Err(ChunkError::Size),
                None if digits == 0 => return Err(ChunkError::Size),
                None => after_size(size, byte)?,
            },
            State::SizeSpace { size } => after_size(size, byte)?,
            State::Extension { size } => match byte {
                b'\r' => State::SizeLf { size },
                b'\n' => return Err(ChunkError::BareLf),
                // Extensions are tokens and quoted strings: no controls.
                b'\t' => State::Extension { size },
                0..=0x1f | 0x7f => return Err(ChunkError::Size),
                _ => State::Extension { size },
            },
            State::SizeLf { size } => {
                if byte != b'\n' {
                    return Err(ChunkError::BareLf);
                }
                self.counted = 0;
                if size == 0 {
                    State::TrailerStart
                } else {
                    State::Data { left: size }
                }
            }
            State::DataCr if byte == b'\r' => State::DataLf,
            State::DataLf if byte == b'\n' => State::Size { size: 0, digits: 0 },
            State::DataCr | State::DataLf => return Err(ChunkError::DataEnd),
            State::TrailerStart => match byte {
                b'\r' => State::EndLf,
                b'\n' => return Err(ChunkError::BareLf),
                _ => State::TrailerLine,
            },
            State::TrailerLine => match byte {
                b'\r' => State::TrailerLf,
                b'\n' => return Err(ChunkError::BareLf),
                _ => State::TrailerLine,
            },
            State::TrailerLf if byte == b'\n' => State::TrailerStart,
            State::EndLf if byte == b'\n' => State::Done,
            State::TrailerLf | State::EndLf => return Err(ChunkError::BareLf),
            State::Data { .. } | State::Done => unreachable!("handled in decode"),
        })
    }
}

/// The byte after a chunk size's digits (or the spaces after them).
fn after_size(size: u64, byte: u8) -> Result<State, ChunkError> {
    Ok(match byte {
        b'\r' => State::SizeLf { size },
        b';' => State::Extension { size },
        b' ' | b'\t' => State::SizeSpace { size },
        b'\n' => return Err(ChunkError::BareLf),
        _ => return Err(ChunkError::Size),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole body from `wire` fed `step` bytes at a time, and what
    /// was left after it.
    fn decode_all(wire: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), ChunkError> {
        let mut decoder = Decoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut rest = wire.chunks(step);
        loop {
            match decoder.decode(&mut buf)? {
                Step::Data(d) => body.extend_from_slice(&d),
                Step::Done => {
                    let mut left = buf.to_vec();
                    left.extend(rest.flatten());
                    return Ok((body, left));
                }
                Step::NeedMore => match rest.next() {
                    Some(more) => buf.extend_from_slice(more),
                    None => panic!("ran out of input: {:?}", decoder.state),
                },
            }
        }
    }

    #[test]
    fn chunks_extensions_and_trailers_decode_at_any_split() {
        let wire = b"5\r\nhello\r\n7;name=\"v a\"\r\n, world\r\n1A \r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\ny: 2\r\n\r\nNEXT";
        for step in 1..wire.len() {
            let (body, rest) = decode_all(wire, step).unwrap();
            assert_eq!(
                body, b"hello, worldabcdefghijklmnopqrstuvwxyz",
                "step {step}"
            );
            assert_eq!(rest, b"NEXT", "step {step}");
        }
    }

    #[test]
    fn an_empty_body_is_the_last_chunk_alone() {
        assert_eq!(decode_all(b"0\r\n\r\n", 1).unwrap(), (vec![], vec![]));
        assert_eq!(decode_all(b"000\r\n\r\n", 3).unwrap(), (vec![], vec![]));
    }

    #[test]
    fn malformed_framing_is_refused() {
        for (wire, want) in [
            (&b"\r\n"[..], ChunkError::Size),
            (b"-5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"+5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b" 5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5 5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::BareLf),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::DataEnd),
            (b"5\r\nhelloX\r\n0\r\n\r\n", ChunkError::DataEnd),
            (b"5\r\nhello\r\n0\r\n\n", ChunkError::BareLf),
            (b"5\r\nhello\r\n0\r\nx: 1\n\r\n", ChunkError::BareLf),
            (b"5;a\x00b\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5\r\rhello\r\n0\r\n\r\n", ChunkError::BareLf),
            // 17 hex digits would overflow the size.
            (b"10000000000000000\r\n", ChunkError::Size),
        ] {
            assert_eq!(
                decode_all(wire, 1).unwrap_err(),
                want,
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn the_largest_size_is_accepted_and_its_data_streamed() {
        let mut decoder = Decoder::default();
        let mut buf = BytesMut::from(&b"ffffffffffffffff\r\nabc"[..]);
        assert_eq!(
            decoder.decode(&mut buf).unwrap(),
            Step::Data(Bytes::from_static(b"abc"))
        );
        assert_eq!(decoder.decode(&mut buf).unwrap(), Step::NeedMore);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any body, cut into any chunks, with or without extensions and
        /// trailers, decodes to itself at any split of the wire, and what
        /// follows the body is left untouched.
        #[test]
        fn encoded_bodies_decode_to_themselves(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300), 0..12),
            extension in proptest::prelude::any::<bool>(),
            trailers in 0usize..3,
            upper in proptest::prelude::any::<bool>(),
            step in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for chunk in &chunks {
                let size = if upper { format!("{:X}", chunk.len()) } else { format!("{:x}", chunk.len()) };
                wire.extend_from_slice(size.as_bytes());
                if extension {
                    wire.extend_from_slice(b";name=\"a b\"");
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n");
            for i in 0..trailers {
                wire.extend_from_slice(format!("x-t{i}: v\r\n").as_bytes());
            }
            wire.extend_from_slice(b"\r\nNEXT");
            let (body, rest) = decode_all(&wire, step).unwrap();
            proptest::prop_assert_eq!(body, chunks.concat());
            proptest::prop_assert_eq!(rest, b"NEXT".to_vec());
        }

        /// Arbitrary bytes end in data, an error or a wait for more, and
        /// never yield more data than they hold.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut decoder = Decoder::default();
            let mut buf = BytesMut::from(&bytes[..]);
            let mut data = 0;
            while let Ok(Step::Data(d)) = decoder.decode(&mut buf) {
                data += d.len();
            }
            proptest::prop_assert!(data <= bytes.len());
        }
    }

    #[test]
    fn size_lines_and_trailers_are_bounded() {
        let mut long_ext = b"5;".to_vec();
        long_ext.extend(std::iter::repeat_n(b'a', MAX_SIZE_LINE));
        long_ext.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(decode_all(&long_ext, 64).unwrap_err(), ChunkError::SizeLine);

        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..MAX_TRAILERS / 8 + 1 {
            trailers.extend_from_slice(b"x: 1234\r\n");
        }
        trailers.extend_from_slice(b"\r\n");
        assert_eq!(decode_all(&trailers, 64).unwrap_err(), ChunkError::Trailers);
    }
}
