//! Finding the end of a chunked body (RFC 9112 §7.1) while its bytes pass
//! through unchanged. Strict: CRLF line ends only, hex sizes only, so that a
//! body cannot be read two ways by two hops (request smuggling).

/// A malformed chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex size; `digits` counts them.
    Size {
        digits: u8,
    },
    /// After the size: extensions (ignored) until CR.
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Tracks where a chunked body ends.
#[derive(Debug, Clone)]
pub(crate) struct ChunkedScanner {
    state: State,
    /// Bytes left in the current chunk (or the size being read).
    size: u64,
    /// Whether trailer fields are accepted (responses) or refused (requests:
    /// they would carry headers past the proxy's checks).
    trailers: bool,
}

impl ChunkedScanner {
    /// For a request body: trailer fields are an error.
    pub(crate) fn request() -> Self {
        Self {
            state: State::Size { digits: 0 },
            size: 0,
            trailers: false,
        }
    }

    /// For a response body: trailer fields pass.
    pub(crate) fn response() -> Self {
        Self {
            trailers: true,
            ..Self::request()
        }
    }

    /// Scans the next bytes of the body. Returns `Some(n)` when the body ends
    /// after the first `n` of them, `None` when more are needed.
    pub(crate) fn scan(&mut self, bytes: &[u8]) -> Result<Option<usize>, ChunkError> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Size { digits } => {
                    let b = bytes[i];
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            if digits >= 15 {
                                return Err(ChunkError);
                            }
                            let value = (b as char).to_digit(16).ok_or(ChunkError)?;
                            self.size = self.size * 16 + u64::from(value);
                            self.state = State::Size { digits: digits + 1 };
                        }
                        b';' if digits > 0 => self.state = State::Extension,
                        b'\r' if digits > 0 => self.state = State::SizeLf,
                        _ => return Err(ChunkError),
                    }
                    i += 1;
                }
                State::Extension => {
                    match bytes[i] {
                        b'\r' => self.state = State::SizeLf,
                        b'\n' => return Err(ChunkError),
                        _ => {}
                    }
                    i += 1;
                }
                State::SizeLf => {
                    if bytes[i] != b'\n' {
                        return Err(ChunkError);
                    }
                    i += 1;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let take =
                        (bytes.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    i += take;
                    self.size -= take as u64;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                }
                State::DataCr => {
                    if bytes[i] != b'\r' {
                        return Err(ChunkError);
                    }
                    i += 1;
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if bytes[i] != b'\n' {
                        return Err(ChunkError);
                    }
                    i += 1;
                    self.state = State::Size { digits: 0 };
                }
                State::TrailerStart => {
                    self.state = match bytes[i] {
                        b'\r' => State::EndLf,
                        b'\n' => return Err(ChunkError),
                        _ if self.trailers => State::TrailerLine,
                        _ => return Err(ChunkError),
                    };
                    i += 1;
                }
                State::TrailerLine => {
                    match bytes[i] {
                        b'\r' => self.state = State::TrailerLf,
                        b'\n' => return Err(ChunkError),
                        _ => {}
                    }
                    i += 1;
                }
                State::TrailerLf => {
                    if bytes[i] != b'\n' {
                        return Err(ChunkError);
                    }
                    i += 1;
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if bytes[i] != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = State::Done;
                    return Ok(Some(i + 1));
                }
                State::Done => return Ok(Some(i)),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(body: &[u8]) -> Result<Option<usize>, ChunkError> {
        ChunkedScanner::response().scan(body)
    }

    #[test]
    fn finds_the_end_of_bodies() {
        assert_eq!(end(b"5\r\nhello\r\n0\r\n\r\nNEXT"), Ok(Some(15)));
        assert_eq!(end(b"0\r\n\r\n"), Ok(Some(5)));
        let with_trailer = b"a;ext=1\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n";
        assert_eq!(end(with_trailer), Ok(Some(with_trailer.len())));
        assert_eq!(end(b"5\r\nhel"), Ok(None));
    }

    #[test]
    fn any_split_of_the_input_gives_the_same_end() {
        let body = b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\nrest";
        let expected = body.len() - 4;
        for split in 0..body.len() {
            let mut scanner = ChunkedScanner::response();
            let first = scanner.scan(&body[..split]).expect("valid");
            let found = match first {
                Some(n) => n,
                None => split + scanner.scan(&body[split..]).expect("valid").expect("ends"),
            };
            assert_eq!(found, expected, "split at {split}");
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello",
            b"\r\n",
            b"5\r\nhelloX",
            b"0\r\nTrailer\n",
            b"1111111111111111\r\n",
        ] {
            assert_eq!(
                end(bad),
                Err(ChunkError),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
