//! The request-head check: each request head is checked as its bytes arrive, before hyper sees
//! them, against `http.max_uri_len`, `http.max_header_size` and `http.max_headers`, and parsed
//! once complete (with httparse, hyper's parser) so that a malformed head is refused too. A
//! refusal is answered by the broker with a JSON body (`Rejection::response`); hyper, whose
//! own limits are set above these, would answer with an empty one.
//!
//! Only the bytes of the head are kept while it arrives (at most `http.max_header_size`), and
//! given back once it is complete.

use axum::http::{StatusCode, Uri};

/// The head limits of `http.*`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadLimits {
    /// Longest request target (path and query), bytes.
    pub max_uri_len: usize,
    /// Longest head: request line and header lines, bytes.
    pub max_header_size: usize,
    /// Most header fields.
    pub max_headers: usize,
}

/// Why a request head is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// 414: the request target is longer than `max_uri_len`.
    UriTooLong(usize),
    /// 431: the head is larger than `max_header_size`.
    HeadTooLarge(usize),
    /// 431: more header fields than `max_headers`.
    TooManyHeaders(usize),
    /// 400: a byte outside printable ASCII in the request line.
    NotAscii,
    /// 400: the head does not parse (what the parser said).
    Malformed(String),
}

impl Rejection {
    /// The status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            Self::HeadTooLarge(_) | Self::TooManyHeaders(_) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Self::NotAscii | Self::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// What the client is told.
    pub fn message(&self) -> String {
        match self {
            Self::UriTooLong(max) => format!("URI longer than {max} bytes"),
            Self::HeadTooLarge(max) => {
                format!("request line and header fields longer than {max} bytes")
            }
            Self::TooManyHeaders(max) => format!("more than {max} header fields"),
            Self::NotAscii => "the request line may hold printable ASCII only: percent-encode \
                               other bytes (as UTF-8)"
                .to_owned(),
            Self::Malformed(what) => format!("malformed request: {what}"),
        }
    }

    /// The whole HTTP/1.1 answer, closing the connection.
    pub fn response(&self) -> Vec<u8> {
        let status = self.status();
        let body = serde_json::json!({ "error": self.message() }).to_string();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes()
    }
}

/// What the bytes fed so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scan {
    /// The head goes on.
    Partial,
    /// The head ended at this offset of the last chunk fed (just past its empty line).
    Complete(usize),
    /// The head is refused.
    Rejected(Rejection),
}

/// Checks one request head at a time, fed in chunks as they arrive.
#[derive(Debug)]
pub(crate) struct HeadScanner {
    limits: HeadLimits,
    /// The head so far (empty lines before the request line excluded), for the final parse.
    head: Vec<u8>,
    /// Bytes of the current line, CR excluded.
    line_len: usize,
    /// Lines ended so far (the request line is the first).
    lines: usize,
    /// Spaces seen in the request line: 1 while reading the target.
    spaces: usize,
    /// Bytes of the request target so far.
    target_len: usize,
}

impl HeadScanner {
    /// A scanner waiting for the first byte of a head.
    pub fn new(limits: HeadLimits) -> Self {
        Self {
            limits,
            head: Vec::new(),
            line_len: 0,
            lines: 0,
            spaces: 0,
            target_len: 0,
        }
    }

    /// Ready for the next head; gives the buffer back.
    pub fn reset(&mut self) {
        *self = Self::new(self.limits);
    }

    /// Feeds the next chunk of bytes.
    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        for (i, &b) in chunk.iter().enumerate() {
            // Empty lines before the request line are ignored (RFC 9112, 2.2), as hyper does.
            if self.head.is_empty() && (b == b'\r' || b == b'\n') {
                continue;
            }
            if self.head.len() >= self.limits.max_header_size {
                return Scan::Rejected(Rejection::HeadTooLarge(self.limits.max_header_size));
            }
            self.head.push(b);
            match b {
                b'\n' => {
                    if self.lines > 0 && self.line_len == 0 {
                        return match self.finish() {
                            Ok(()) => {
                                self.reset();
                                Scan::Complete(i + 1)
                            }
                            Err(rejection) => Scan::Rejected(rejection),
                        };
                    }
                    self.lines += 1;
                    self.line_len = 0;
                    // Lines after the request line are header fields.
                    if self.lines - 1 > self.limits.max_headers {
                        return Scan::Rejected(Rejection::TooManyHeaders(self.limits.max_headers));
                    }
                }
                b'\r' => {}
                _ => {
                    self.line_len += 1;
                    if self.lines == 0 {
                        if !(0x20..0x7f).contains(&b) {
                            return Scan::Rejected(Rejection::NotAscii);
                        }
                        if b == b' ' {
                            self.spaces += 1;
                        } else if self.spaces == 1 {
                            self.target_len += 1;
                            if self.target_len > self.limits.max_uri_len {
                                return Scan::Rejected(Rejection::UriTooLong(
                                    self.limits.max_uri_len,
                                ));
                            }
                        }
                    }
                }
            }
        }
        Scan::Partial
    }

    /// Parses the complete head as hyper will.
    fn finish(&self) -> Result<(), Rejection> {
        let mut headers = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&self.head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return Err(Rejection::Malformed("incomplete head".to_owned()))
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Rejection::TooManyHeaders(self.limits.max_headers))
            }
            Err(error) => return Err(Rejection::Malformed(error.to_string())),
        }
        match request.path.map(Uri::try_from) {
            Some(Ok(_)) => Ok(()),
            _ => Err(Rejection::Malformed("invalid request target".to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_uri_len: 32,
        max_header_size: 256,
        max_headers: 4,
    };

    fn scan(bytes: &[u8]) -> Scan {
        HeadScanner::new(LIMITS).feed(bytes)
    }

    #[test]
    fn a_head_completes_at_its_empty_line_in_any_chunking() {
        let head = b"\r\nGET /api/v1/stats?x=1 HTTP/1.1\r\nHost: h\r\nX-A: b\r\n\r\nNEXT";
        assert_eq!(scan(head), Scan::Complete(head.len() - 4));
        let mut s = HeadScanner::new(LIMITS);
        for (i, b) in head.iter().enumerate().take(head.len() - 5) {
            assert_eq!(s.feed(&[*b]), Scan::Partial, "byte {i}");
        }
        assert_eq!(s.feed(&head[head.len() - 5..]), Scan::Complete(1));
        // Ready for the next one, bare LF line ends included.
        assert_eq!(s.feed(b"GET / HTTP/1.1\nHost: h\n\n"), Scan::Complete(24));
    }

    #[test]
    fn limits_are_enforced_as_soon_as_they_are_crossed() {
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(40));
        assert_eq!(
            scan(long.as_bytes()),
            Scan::Rejected(Rejection::UriTooLong(32))
        );
        // Before the end of the line.
        let unfinished = format!("GET /{}", "a".repeat(40));
        assert_eq!(
            scan(unfinished.as_bytes()),
            Scan::Rejected(Rejection::UriTooLong(32))
        );
        let big = format!("GET / HTTP/1.1\r\nX-Big: {}", "b".repeat(300));
        assert_eq!(
            scan(big.as_bytes()),
            Scan::Rejected(Rejection::HeadTooLarge(256))
        );
        let many = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n";
        assert_eq!(
            scan(many.as_bytes()),
            Scan::Rejected(Rejection::TooManyHeaders(4))
        );
        let four = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
        assert_eq!(scan(four.as_bytes()), Scan::Complete(four.len()));
    }

    #[test]
    fn bad_request_lines_and_heads_are_refused() {
        assert_eq!(
            scan(b"GET /caf\xc3\xa9 HTTP/1.1\r\n"),
            Scan::Rejected(Rejection::NotAscii)
        );
        assert_eq!(
            scan(b"GET /\x01 HTTP/1.1"),
            Scan::Rejected(Rejection::NotAscii)
        );
        for bad in [
            &b"GET / HTTP/1.1\r\nno colon here\r\n\r\n"[..],
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(
                matches!(scan(bad), Scan::Rejected(Rejection::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Header values may hold obs-text, as hyper accepts.
        assert!(matches!(
            scan(b"GET / HTTP/1.1\r\nX: caf\xc3\xa9\r\n\r\n"),
            Scan::Complete(_)
        ));
    }

    #[test]
    fn the_answer_is_json_and_closes() {
        let text = String::from_utf8(Rejection::UriTooLong(8192).response()).expect("UTF-8");
        assert!(text.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{text}");
        assert!(text.contains("content-type: application/json\r\n"));
        assert!(text.contains("connection: close\r\n"));
        let body = text.split("\r\n\r\n").nth(1).expect("body");
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(json["error"], "URI longer than 8192 bytes");
    }
}
