//! The tests' one HTTP/1.1 client (there is no HTTP client crate in the
//! tree), for the gateway's OpenAI API, the probes and `/metrics`: one
//! request per connection (`connection: close`), the whole response read,
//! a chunked body decoded. It speaks no TLS and follows no redirects.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one exchange may take, a whole streamed generation included.
const LIMIT: Duration = Duration::from_secs(120);

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The OpenAI error body: (type, param, message).
    pub fn error(&self) -> (String, Option<String>, String) {
        let body = self.json();
        let e = &body["error"];
        assert!(e.is_object(), "not an OpenAI error: {body}");
        (
            e["type"].as_str().unwrap().to_owned(),
            e["param"].as_str().map(str::to_owned),
            e["message"].as_str().unwrap().to_owned(),
        )
    }
}

/// `method path` to `addr` ("HOST:PORT") with `body` (JSON when not empty)
/// and `headers`; panics if no response comes.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    try_request(addr, method, path, body, headers)
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

pub async fn get(addr: &str, path: &str) -> Reply {
    request(addr, "GET", path, "", &[]).await
}

pub async fn post(addr: &str, path: &str, body: &Value) -> Reply {
    request(addr, "POST", path, &body.to_string(), &[]).await
}

/// As [`request`], with why no response came (nothing listening, the
/// connection cut, not HTTP, over the time limit) as the error.
pub async fn try_request(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        request.push_str("content-type: application/json\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(LIMIT, exchange)
        .await
        .map_err(|_| format!("no response within {LIMIT:?}"))?
        .map_err(|e| e.to_string())?;
    parse(&raw).ok_or_else(|| format!("not an HTTP response: {:?}", String::from_utf8_lossy(&raw)))
}

fn parse(raw: &[u8]) -> Option<Reply> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut reply = Reply {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    };
    if reply.header("transfer-encoding") == Some("chunked") {
        reply.body = dechunk(&reply.body)?;
    }
    Some(reply)
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = data.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&data[..end]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(end + 2..end + 2 + size)?);
        data = data.get(end + 2 + size + 2..)?;
    }
}
