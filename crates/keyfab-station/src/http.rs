//! HTTP/1.1 over TLS, as much of it as a station needs: one request at a time on a
//! connection kept open between requests.
//!
//! A station is a programmer that handles one device after another, so its client is
//! blocking: the thread that asks is the one the kernel wakes when the answer arrives —
//! no event loop, no task hand-off. Per request that is one TLS write and, usually, one
//! read. The site's answers are parsed strictly and within bounds ([`parse_response`]):
//! a head over [`MAX_HEAD_BYTES`], a body over [`MAX_BODY_BYTES`], or framing that is
//! not HTTP/1.1 is an error, never a guess.

use rustls::pki_types::ServerName;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroize;

/// Largest response head accepted (status line and headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest response body accepted: a device bundle is a few KiB.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Bytes one read takes at most (a TLS record is at most 16 KiB).
const READ_CHUNK: usize = 16 * 1024;
/// Most response headers accepted.
const MAX_HEADERS: usize = 64;

/// Where a site listens: parsed once from `https://HOST[:PORT][/]`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The URL as given, without a trailing slash: for messages.
    pub url: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl Endpoint {
    /// `https://HOST[:PORT]`, HOST a name, an IPv4 address or a bracketed IPv6 address;
    /// the port defaults to 443. Anything else (another scheme, a path, user info) is
    /// refused with the reason.
    pub fn parse(url: &str) -> Result<Self, String> {
        let trimmed = url.trim().trim_end_matches('/');
        let rest = match trimmed.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "{url}: the station API is served over TLS only: use https://, not {scheme}://"
                ))
            }
            None => return Err(format!("{url}: expected https://HOST:PORT")),
        };
        if rest.is_empty() || rest.contains(['/', '@', '?', '#']) {
            return Err(format!(
                "{url}: expected https://HOST:PORT (no path, user or query)"
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url}: unclosed '[' in the host"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("{url}: expected ':PORT' after ']'"))?,
                    ),
                ),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        let port = match port {
            None => 443,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{url}: '{p}' is not a port"))?,
        };
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{url}: '{host}' is not a host name or IP address"))?;
        Ok(Self {
            url: trimmed.to_owned(),
            host: host.to_owned(),
            port,
            server_name,
        })
    }

    /// The `Host` header's value.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// How long a connection may take to open, and an answer to arrive.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long a connection may take to open.
    pub connect: Duration,
    /// How long an answer may take to arrive once the request is sent.
    pub answer: Duration,
}

/// A status and body the site answered.
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// Zeroized on drop: without a chip's transport key it holds key material.
    pub body: zeroize::Zeroizing<Vec<u8>>,
    /// Whether the connection may carry the next request.
    pub keep_alive: bool,
}

/// Why an exchange failed. Either way no answer arrived, and the same request (same
/// request id) may be sent again.
#[derive(Debug)]
pub enum ExchangeError {
    /// The connection failed, closed or timed out; `answered_nothing` when not one byte
    /// of an answer came back (a kept-alive connection the site had closed).
    Io {
        /// What failed.
        error: std::io::Error,
        /// Not one byte of an answer arrived.
        answered_nothing: bool,
    },
    /// Bytes came back that are not an HTTP/1.1 answer within bounds.
    Malformed(String),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io { error, .. } => write!(f, "{error}"),
            Self::Malformed(why) => write!(f, "not an HTTP/1.1 answer: {why}"),
        }
    }
}

/// One TLS connection to a site, kept open between requests.
pub struct Connection {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    authority: String,
    /// Bytes read and not yet part of an answer.
    buf: zeroize::Zeroizing<Vec<u8>>,
    /// Where reads land first (allocated once per connection; cleared after each use).
    chunk: zeroize::Zeroizing<Box<[u8]>>,
}

impl Connection {
    /// Connects to `endpoint` (each of its addresses in turn); the TLS handshake runs with
    /// the first request.
    pub fn open(
        endpoint: &Endpoint,
        tls: &Arc<rustls::ClientConfig>,
        timeouts: Timeouts,
    ) -> std::io::Result<Self> {
        let mut last = None;
        let mut tcp = None;
        for addr in (endpoint.host.as_str(), endpoint.port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, timeouts.connect) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| {
            last.unwrap_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "the host has no address")
            })
        })?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(timeouts.answer))?;
        tcp.set_write_timeout(Some(timeouts.answer))?;
        let conn = rustls::ClientConnection::new(tls.clone(), endpoint.server_name.clone())
            .map_err(std::io::Error::other)?;
        Ok(Self {
            tls: rustls::StreamOwned::new(conn, tcp),
            authority: endpoint.authority(),
            buf: zeroize::Zeroizing::new(Vec::with_capacity(READ_CHUNK)),
            chunk: zeroize::Zeroizing::new(vec![0; READ_CHUNK].into_boxed_slice()),
        })
    }

    /// Sends one request and reads its answer.
    pub fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ExchangeError> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.authority);
        if let Some(body) = body {
            request.push_str("Content-Type: application/json\r\n");
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        let io = |error| ExchangeError::Io {
            error,
            answered_nothing: true,
        };
        self.tls.write_all(&bytes).map_err(io)?;
        self.tls.flush().map_err(io)?;
        self.buf.clear();
        loop {
            match parse_response(&self.buf) {
                Ok(Some((response, used))) => {
                    // An answer followed by more bytes is not one answer to one request.
                    if used != self.buf.len() {
                        return Err(ExchangeError::Malformed("bytes after the answer".into()));
                    }
                    // The bytes read, not the whole capacity (16 KiB per answer).
                    self.buf.as_mut_slice().zeroize();
                    self.buf.clear();
                    return Ok(response);
                }
                Ok(None) => {}
                Err(why) => return Err(ExchangeError::Malformed(why)),
            }
            let n = match self.tls.read(&mut self.chunk) {
                Ok(0) => {
                    return Err(ExchangeError::Io {
                        error: std::io::ErrorKind::UnexpectedEof.into(),
                        answered_nothing: self.buf.is_empty(),
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(ExchangeError::Io {
                        error,
                        answered_nothing: self.buf.is_empty(),
                    })
                }
            };
            self.buf.extend_from_slice(&self.chunk[..n]);
            self.chunk[..n].zeroize();
        }
    }
}

/// One complete answer at the start of `bytes` and how many bytes it took; `None` while
/// it is incomplete. Bodies framed by `Content-Length` or `chunked` transfer coding; an
/// answer framed by neither is refused (the connection would have to close to end it,
/// and the site never does that).
pub fn parse_response(bytes: &[u8]) -> Result<Option<(Response, usize)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Response::new(&mut headers);
    let head_len = match head.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if bytes.len() > MAX_HEAD_BYTES => {
            return Err(format!("a head over {MAX_HEAD_BYTES} bytes"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("head: {e}")),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(format!("a head over {MAX_HEAD_BYTES} bytes"));
    }
    if head.version != Some(1) {
        return Err("not HTTP/1.1".into());
    }
    let status = head.code.ok_or("no status")?;
    if status < 200 {
        return Err(format!("status {status}: no interim answer was asked for"));
    }
    let (mut length, mut chunked, mut close) = (None, false, false);
    for h in head.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| format!("header {}: not text", h.name))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| format!("content-length '{value}'"))?;
            if length.is_some_and(|l| l != n) {
                return Err("two different content-lengths".into());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(format!("transfer-encoding '{value}'"));
            }
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"));
        }
    }
    let rest = &bytes[head_len..];
    let (body, used) = match (length, chunked) {
        (Some(_), true) => return Err("both content-length and chunked".into()),
        (Some(n), false) if n > MAX_BODY_BYTES => {
            return Err(format!("a body over {MAX_BODY_BYTES} bytes"))
        }
        (Some(n), false) => match rest.get(..n) {
            Some(b) => (b.to_vec(), n),
            None => return Ok(None),
        },
        (None, true) => match dechunk(rest)? {
            Some(done) => done,
            None => return Ok(None),
        },
        // No body by definition.
        (None, false) if status == 204 || status == 304 => (Vec::new(), 0),
        (None, false) => return Err("a body without content-length or chunked".into()),
    };
    Ok(Some((
        Response {
            status,
            body: zeroize::Zeroizing::new(body),
            keep_alive: !close,
        },
        head_len + used,
    )))
}

/// A complete `chunked` body at the start of `bytes` (its trailer section ignored) and
/// how many bytes it took; `None` while incomplete.
fn dechunk(bytes: &[u8]) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    let mut at = 0;
    loop {
        let (size_len, size) = match httparse::parse_chunk_size(&bytes[at..]) {
            Ok(httparse::Status::Complete(c)) => c,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err("a chunk size".into()),
        };
        at += size_len;
        let size = usize::try_from(size)
            .ok()
            .filter(|s| body.len().saturating_add(*s) <= MAX_BODY_BYTES)
            .ok_or_else(|| format!("a body over {MAX_BODY_BYTES} bytes"))?;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let line_end = match bytes[at..].windows(2).position(|w| w == b"\r\n") {
                    Some(i) => i,
                    None if bytes.len() - at > MAX_HEAD_BYTES => {
                        return Err("a trailer too long".into())
                    }
                    None => return Ok(None),
                };
                at += line_end + 2;
                if line_end == 0 {
                    return Ok(Some((body, at)));
                }
            }
        }
        let Some(data) = bytes.get(at..at + size) else {
            return Ok(None);
        };
        body.extend_from_slice(data);
        at += size;
        match bytes.get(at..at + 2) {
            None => return Ok(None),
            Some(b"\r\n") => at += 2,
            Some(_) => return Err("a chunk not ended by CRLF".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(bytes: &[u8]) -> (u16, Vec<u8>, bool, usize) {
        let (r, used) = parse_response(bytes).unwrap().unwrap();
        (r.status, r.body.to_vec(), r.keep_alive, used)
    }

    /// `bytes` reads as (status, body, keep-alive), all of it used, and no shorter
    /// prefix of it reads as an answer yet.
    fn whole_only_when_whole(bytes: &[u8], status: u16, body: &[u8], keep_alive: bool) {
        assert_eq!(
            complete(bytes),
            (status, body.to_vec(), keep_alive, bytes.len())
        );
        for cut in 0..bytes.len() {
            assert!(parse_response(&bytes[..cut]).unwrap().is_none(), "{cut}");
        }
    }

    #[test]
    fn an_answer_framed_by_its_length_is_read_whole_and_only_when_whole() {
        let bytes = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{\"a\":1}";
        whole_only_when_whole(bytes, 200, b"{\"a\":1}", true);
    }

    #[test]
    fn a_chunked_answer_is_joined_and_its_trailer_skipped() {
        let bytes = b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nx-t: 1\r\n\r\n";
        whole_only_when_whole(bytes, 403, b"abcde", false);
    }

    #[test]
    fn framing_that_is_not_http_1_1_within_bounds_is_refused() {
        for bad in [
            &b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXX",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(
                parse_response(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let endless = [b'a'; MAX_HEAD_BYTES + 1];
        let mut head = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        head.extend_from_slice(&endless);
        assert!(parse_response(&head).is_err());
    }

    #[test]
    fn urls_name_an_https_host_and_port_and_nothing_else() {
        let e = Endpoint::parse("https://127.0.0.1:8443/").unwrap();
        assert_eq!(
            (e.url.as_str(), e.authority()),
            ("https://127.0.0.1:8443", "127.0.0.1:8443".into())
        );
        let e = Endpoint::parse("HTTPS://site.example").unwrap();
        assert_eq!(e.authority(), "site.example:443");
        let e = Endpoint::parse("https://[::1]:9000").unwrap();
        assert_eq!(e.authority(), "[::1]:9000");
        for bad in [
            "http://127.0.0.1:8443",
            "127.0.0.1:8443",
            "https://",
            "https://host:0",
            "https://host:99999",
            "https://host:8443/v1",
            "https://user@host:8443",
            "https://[::1",
            "https://bad host:1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
