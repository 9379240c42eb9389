//! A minimal HTTP/1.1 client over a fresh connection, enough for readiness probes, /metrics and
//! JSON requests and answers (`Connection: close`, the whole response read to the end; no
//! chunked decoding): GET ([`http_response`], [`http_get`]) and any method with headers and a
//! JSON body ([`http_request`]).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

/// What a server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code of the status line.
    pub status: u16,
    /// The header fields, names in lowercase, in order.
    pub headers: Vec<(String, String)>,
    /// Everything after the head, as text (invalid UTF-8 replaced).
    pub body: String,
}

impl Response {
    /// The value of header field `name` (any case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// GET `path` from `addr`; `None` if nothing answered there with an HTTP response.
pub async fn http_response(addr: impl ToSocketAddrs, path: &str) -> Option<Response> {
    http_request(addr, "GET", path, &[], None).await
}

/// `method path` to `addr` with the header fields `headers` and `body` as JSON if given;
/// `None` if nothing answered there with an HTTP response.
pub async fn http_request(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<Response> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    match body {
        Some(body) => request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None if method == "GET" || method == "HEAD" => request.push_str("\r\n"),
        None => request.push_str("Content-Length: 0\r\n\r\n"),
    }
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    // "HTTP/1.1 200 OK"
    let mut status_line = lines.next()?.split_whitespace();
    let status = match (status_line.next(), status_line.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => code.parse().ok()?,
        _ => return None,
    };
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Some(Response {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// The body of a 200 answer to GET `path` from `addr`; `None` for any other outcome.
pub async fn http_get(addr: impl ToSocketAddrs, path: &str) -> Option<String> {
    http_response(addr, path)
        .await
        .filter(|r| r.status == 200)
        .map(|r| r.body)
}
