//! A minimal HTTP/1.1 client over a fresh connection, enough for readiness probes, /metrics and
//! JSON requests and answers (`Connection: close`, the whole response read to the end; no
//! chunked decoding): GET ([`http_response`], [`http_get`], [`http_download`] for bytes) and
//! any method with headers and a JSON body ([`http_request`]).

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
    let mut request = head(method, path, headers);
    match body {
        Some(body) => request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None if method == "GET" || method == "HEAD" => request.push_str("\r\n"),
        None => request.push_str("Content-Length: 0\r\n\r\n"),
    }
    let response = exchange(addr, &request).await?;
    let (head, body) = split_head(&response)?;
    let head = String::from_utf8_lossy(head);
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
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

/// The head of a request, up to its header fields (`Connection: close`).
fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request
}

/// Sends `request` over a fresh connection and reads the response to its end.
async fn exchange(addr: impl ToSocketAddrs, request: &str) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    Some(response)
}

/// A response's head and body: what comes before and after the first blank line.
fn split_head(response: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((&response[..at], &response[at + 4..]))
}

/// The body, as bytes, of a 200 answer to GET `path` from `addr` with the header fields
/// `headers` (a download); `None` for any other outcome.
pub async fn http_download(
    addr: impl ToSocketAddrs,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<Vec<u8>> {
    let request = head("GET", path, headers) + "\r\n";
    let response = exchange(addr, &request).await?;
    let (head, body) = split_head(&response)?;
    head.starts_with(b"HTTP/1.1 200 ").then(|| body.to_vec())
}

/// The body of a 200 answer to GET `path` from `addr`; `None` for any other outcome.
pub async fn http_get(addr: impl ToSocketAddrs, path: &str) -> Option<String> {
    http_response(addr, path)
        .await
        .filter(|r| r.status == 200)
        .map(|r| r.body)
}
