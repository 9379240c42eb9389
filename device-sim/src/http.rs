//! A minimal HTTP/1.1 client for the broker's JSON API: `GET`, and `POST` of a JSON body, over
//! TCP with `Connection: close`, content-length, chunked or close-delimited bodies, and a bearer
//! token for a broker whose API is protected (`http.api_tokens_file`). No TLS.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on one request, connect to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the API is: `host:port` taken from an `http://HOST:PORT[/]` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct Api {
    authority: String,
    /// Sent as `Authorization: Bearer` with every request, when set.
    token: Option<String>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Api")
            .field("authority", &self.authority)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Api {
    /// Parses `http://HOST:PORT` (a trailing `/` is allowed; the port defaults to 80).
    pub fn parse(url: &str) -> Result<Self> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("--api must be an http:// URL, got {url:?}");
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            bail!("--api must be http://HOST:PORT without a path, got {url:?}");
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            authority,
            token: None,
        })
    }

    /// The same, sending `token` (when set) as `Authorization: Bearer` with every request.
    pub fn with_token(mut self, token: Option<String>) -> Result<Self> {
        if let Some(t) = &token {
            if t.is_empty()
                || t.bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            {
                bail!("--api-token must be one word without blanks (as `broker token` prints it)");
            }
        }
        self.token = token;
        Ok(self)
    }

    /// `GET path`; returns the status code and the body.
    pub async fn get(&self, path: &str) -> Result<(u16, Vec<u8>)> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.get_untimed(path))
            .await
            .with_context(|| format!("GET {path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    /// `GET path`, expecting 200 and a JSON body of type `T`; `None` on 404.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<Option<T>> {
        let (status, body) = self.get(path).await?;
        if status == 404 {
            return Ok(None);
        }
        if status == 401 || status == 403 {
            bail!(
                "GET {path}: HTTP {status}: {} (the broker's API needs a token of role read: \
                 --api-token or DEVICE_SIM_API_TOKEN)",
                String::from_utf8_lossy(&body).trim()
            );
        }
        if status != 200 {
            bail!(
                "GET {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        serde_json::from_slice(&body)
            .map(Some)
            .with_context(|| format!("GET {path}: unexpected body"))
    }

    /// `POST path` with the JSON `body`; returns the status code and the body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<(u16, Vec<u8>)> {
        let body = body.to_string();
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.request_untimed("POST", path, Some(&body)),
        )
        .await
        .with_context(|| format!("POST {path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    async fn get_untimed(&self, path: &str) -> Result<(u16, Vec<u8>)> {
        self.request_untimed("GET", path, None).await
    }

    async fn request_untimed(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, Vec<u8>)> {
        let mut stream = TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("connecting to {}", self.authority))?;
        let authorization = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n{authorization}Connection: close\r\n",
            self.authority
        );
        match body {
            Some(body) => request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )),
            None => request.push_str("\r\n"),
        }
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        parse_response(&response).with_context(|| format!("{method} {path}"))
    }
}

/// Splits a complete HTTP/1.1 response into status and body.
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>)> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("truncated HTTP response");
    };
    let head = std::str::from_utf8(&raw[..split]).context("non-UTF-8 HTTP header")?;
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        if body.len() < n {
            bail!("body shorter than its content-length");
        }
        body[..n].to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            bail!("truncated chunk size");
        };
        let size_text = std::str::from_utf8(&data[..eol])?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).context("bad chunk size")?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Percent-encodes a query or path component (everything but RFC 3986 unreserved characters).
pub fn encode(component: &str) -> String {
    let mut out = String::with_capacity(component.len());
    for b in component.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() -> Result<()> {
        assert_eq!(
            Api::parse("http://127.0.0.1:8080/")?.authority,
            "127.0.0.1:8080"
        );
        assert_eq!(Api::parse("http://broker")?.authority, "broker:80");
        assert!(Api::parse("https://x:1").is_err());
        assert!(Api::parse("http://x:1/api").is_err());
        Ok(())
    }

    #[tokio::test]
    async fn the_token_goes_with_every_request() -> Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let mut heads = Vec::new();
            for status in ["200 OK", "401 Unauthorized"] {
                let (mut stream, _) = listener.accept().await?;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    stream.read_exact(&mut byte).await?;
                    head.push(byte[0]);
                }
                heads.push(String::from_utf8_lossy(&head).into_owned());
                let body = "{}";
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(answer.as_bytes()).await?;
            }
            anyhow::Ok(heads)
        });
        let api = Api::parse(&url)?.with_token(Some("s3cret-Token_1".to_owned()))?;
        assert!(!format!("{api:?}").contains("s3cret"));
        let ok: Option<serde_json::Value> = api.get_json("/api/v1/stats").await?;
        assert!(ok.is_some());
        let refused = api
            .get_json::<serde_json::Value>("/api/v1/stats")
            .await
            .expect_err("401");
        assert!(refused.to_string().contains("--api-token"), "{refused}");
        let heads = server.await??;
        for head in heads {
            assert!(
                head.contains("\r\nAuthorization: Bearer s3cret-Token_1\r\n"),
                "{head}"
            );
        }
        assert!(Api::parse(&url)?
            .with_token(Some("two words".to_owned()))
            .is_err());
        Ok(())
    }

    #[test]
    fn responses() -> Result<()> {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain)?, (200, b"{}".to_vec()));
        let chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked)?, (404, b"abcde".to_vec()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert_eq!(encode("dev 1/ä"), "dev%201%2F%C3%A4");
        Ok(())
    }
}
