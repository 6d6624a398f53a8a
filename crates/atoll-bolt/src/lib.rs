//! SOFA Bolt v1 (the RPC protocol of SOFAStack's `com.alipay.sofa:bolt`),
//! as a proxy needs it: the fixed header, the string-map header that
//! SOFARPC and MOSN use (service, method, routing keys), and the class name
//! and content carried as bytes, forwarded untouched (no Hessian here).
//!
//! A request on the wire (big-endian):
//!
//! ```text
//! proto(1)=1 type(1) cmdcode(2) ver2(1) requestId(4) codec(1) timeout(4)
//! classLen(2) headerLen(2) contentLen(4) | class | header | content
//! ```
//!
//! A response has `respStatus(2)` where a request has `timeout(4)` (a 20
//! byte fixed part instead of 22). `type` is 1 (request), 2 (one-way
//! request) or 0 (response); `cmdcode` is 0 (heartbeat), 1 (request) or 2
//! (response).
//!
//! The header map is the encoding SOFARPC's `SimpleMapSerializer` writes:
//! for each entry, the key then the value, each as a 32-bit length and its
//! UTF-8 bytes.
//!
//! [`decode`] never panics and never allocates more than the frame it
//! found says, within [`Limits`]: bad input is an error that says what is
//! wrong and where. It is fuzzed (tests/fuzz.rs) and checked against the
//! Java library (`interop/bolt-java`, run by the e2e tests).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol code of Bolt v1 (`RpcProtocol.PROTOCOL_CODE`).
pub const PROTOCOL: u8 = 1;
/// The length of a request's fixed part.
pub const REQUEST_HEADER_LEN: usize = 22;
/// The length of a response's fixed part.
pub const RESPONSE_HEADER_LEN: usize = 20;

/// `type`: a request answered by a response.
pub const TYPE_REQUEST: u8 = 1;
/// `type`: a request not answered.
pub const TYPE_ONEWAY: u8 = 2;
/// `type`: a response.
pub const TYPE_RESPONSE: u8 = 0;

/// `cmdcode`: a heartbeat (request or ack).
pub const CMD_HEARTBEAT: u16 = 0;
/// `cmdcode`: an RPC request.
pub const CMD_REQUEST: u16 = 1;
/// `cmdcode`: an RPC response.
pub const CMD_RESPONSE: u16 = 2;

/// Response statuses (`com.alipay.remoting.ResponseStatus`).
pub mod status {
    /// Ok.
    pub const SUCCESS: u16 = 0x0000;
    /// An error was caught.
    pub const ERROR: u16 = 0x0001;
    /// The server threw.
    pub const SERVER_EXCEPTION: u16 = 0x0002;
    /// Unknown.
    pub const UNKNOWN: u16 = 0x0003;
    /// The server's thread pool is busy.
    pub const SERVER_THREADPOOL_BUSY: u16 = 0x0004;
    /// A communication error.
    pub const ERROR_COMM: u16 = 0x0005;
    /// No processor for the request's class.
    pub const NO_PROCESSOR: u16 = 0x0006;
    /// Timed out.
    pub const TIMEOUT: u16 = 0x0007;
    /// The client could not send.
    pub const CLIENT_SEND_ERROR: u16 = 0x0008;
    /// Encoding or decoding failed.
    pub const CODEC_EXCEPTION: u16 = 0x0009;
    /// The connection closed.
    pub const CONNECTION_CLOSED: u16 = 0x0010;
}

/// How large a frame may be.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most content bytes of one frame.
    pub max_content: usize,
    /// The most header-map entries.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_content: 16 * 1024 * 1024,
            max_headers: 256,
        }
    }
}

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A request (answered).
    Request,
    /// A one-way request.
    Oneway,
    /// A response.
    Response,
}

/// One Bolt v1 command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Request, one-way or response.
    pub kind: Kind,
    /// 0 heartbeat, 1 request, 2 response.
    pub cmd_code: u16,
    /// The command's version (`ver2`, 1).
    pub version: u8,
    /// Pairs a response with its request on one connection.
    pub request_id: u32,
    /// The serializer of class and content (1: Hessian2).
    pub codec: u8,
    /// A request's timeout in milliseconds (0 for a response).
    pub timeout_ms: u32,
    /// A response's status (0 for a request).
    pub status: u16,
    /// The class name of the content, as bytes.
    pub class: Bytes,
    /// The header map, as the peer encoded it.
    pub header: Bytes,
    /// The content, untouched.
    pub content: Bytes,
}

/// Why bytes are not a Bolt v1 frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BoltError {
    /// The first byte is not Bolt v1's protocol code.
    #[error(
        "byte 0 is {0:#04x}, not Bolt v1's protocol code 0x01 (Bolt v2 and other protocols are not spoken here)"
    )]
    Protocol(u8),
    /// An unknown `type`.
    #[error("byte 1 (type) is {0}: 0 (response), 1 (request) or 2 (one-way request)")]
    Type(u8),
    /// An unknown `cmdcode` for the type.
    #[error(
        "bytes 2-3 (cmdcode) are {code} for a {kind:?}: 0 (heartbeat), 1 (request) or 2 (response)"
    )]
    CmdCode {
        /// The code found.
        code: u16,
        /// The frame's kind.
        kind: Kind,
    },
    /// A negative length.
    #[error("{field} is {value}: a length cannot be negative")]
    Negative {
        /// Which length.
        field: &'static str,
        /// Its value.
        value: i64,
    },
    /// Content larger than allowed.
    #[error("contentLen is {0} bytes; this peer takes at most {1}")]
    TooLarge(usize, usize),
    /// A header map that does not parse.
    #[error("header map at byte {at}: {what}")]
    Header {
        /// Offset within the header bytes.
        at: usize,
        /// What is wrong.
        what: String,
    },
}

/// Takes one frame off the front of `buf`: `Ok(None)` when more bytes are
/// needed (nothing is consumed), an error when the bytes cannot be Bolt
/// v1 (the connection should be closed: there is no resynchronising).
pub fn decode(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Frame>, BoltError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != PROTOCOL {
        return Err(BoltError::Protocol(buf[0]));
    }
    if buf.len() < 2 {
        return Ok(None);
    }
    let kind = match buf[1] {
        TYPE_REQUEST => Kind::Request,
        TYPE_ONEWAY => Kind::Oneway,
        TYPE_RESPONSE => Kind::Response,
        other => return Err(BoltError::Type(other)),
    };
    let fixed = if kind == Kind::Response {
        RESPONSE_HEADER_LEN
    } else {
        REQUEST_HEADER_LEN
    };
    if buf.len() < fixed {
        return Ok(None);
    }
    let mut head = &buf[2..fixed];
    let cmd_code = head.get_u16();
    let allowed = match kind {
        Kind::Response => cmd_code == CMD_RESPONSE || cmd_code == CMD_HEARTBEAT,
        _ => cmd_code == CMD_REQUEST || cmd_code == CMD_HEARTBEAT,
    };
    if !allowed {
        return Err(BoltError::CmdCode {
            code: cmd_code,
            kind,
        });
    }
    let version = head.get_u8();
    let request_id = head.get_u32();
    let codec = head.get_u8();
    let (timeout_ms, status) = if kind == Kind::Response {
        (0, head.get_u16())
    } else {
        (head.get_u32(), 0)
    };
    let length = |value: i64, field: &'static str| -> Result<usize, BoltError> {
        usize::try_from(value).map_err(|_| BoltError::Negative { field, value })
    };
    let class_len = length(i64::from(head.get_i16()), "classLen")?;
    let header_len = length(i64::from(head.get_i16()), "headerLen")?;
    let content_len = length(i64::from(head.get_i32()), "contentLen")?;
    if content_len > limits.max_content {
        return Err(BoltError::TooLarge(content_len, limits.max_content));
    }
    let total = fixed + class_len + header_len + content_len;
    if buf.len() < total {
        // Room for the rest, once: the lengths are bounded above.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(fixed);
    let class = frame.split_to(class_len);
    let header = frame.split_to(header_len);
    let content = frame;
    parse_header(&header, limits.max_headers)?;
    Ok(Some(Frame {
        kind,
        cmd_code,
        version,
        request_id,
        codec,
        timeout_ms,
        status,
        class,
        header,
        content,
    }))
}

impl Frame {
    /// The encoded length.
    pub fn encoded_len(&self) -> usize {
        let fixed = if self.kind == Kind::Response {
            RESPONSE_HEADER_LEN
        } else {
            REQUEST_HEADER_LEN
        };
        fixed + self.class.len() + self.header.len() + self.content.len()
    }

    /// Writes the frame to `out`. Class and header longer than 32767
    /// bytes cannot be said in Bolt v1 (their lengths are signed 16-bit):
    /// the error says so and nothing is written.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), String> {
        let class_len = i16::try_from(self.class.len())
            .map_err(|_| format!("a class name of {} bytes: at most 32767", self.class.len()))?;
        let header_len = i16::try_from(self.header.len())
            .map_err(|_| format!("a header of {} bytes: at most 32767", self.header.len()))?;
        let content_len = i32::try_from(self.content.len())
            .map_err(|_| format!("content of {} bytes: at most 2^31 - 1", self.content.len()))?;
        out.reserve(self.encoded_len());
        out.put_u8(PROTOCOL);
        out.put_u8(match self.kind {
            Kind::Request => TYPE_REQUEST,
            Kind::Oneway => TYPE_ONEWAY,
            Kind::Response => TYPE_RESPONSE,
        });
        out.put_u16(self.cmd_code);
        out.put_u8(self.version);
        out.put_u32(self.request_id);
        out.put_u8(self.codec);
        if self.kind == Kind::Response {
            out.put_u16(self.status);
        } else {
            out.put_u32(self.timeout_ms);
        }
        out.put_i16(class_len);
        out.put_i16(header_len);
        out.put_i32(content_len);
        out.put_slice(&self.class);
        out.put_slice(&self.header);
        out.put_slice(&self.content);
        Ok(())
    }

    /// The header map's entries, in order.
    pub fn headers(&self) -> Result<Headers, BoltError> {
        parse_header(&self.header, usize::MAX)
    }

    /// Whether it is a heartbeat (request or ack).
    pub fn is_heartbeat(&self) -> bool {
        self.cmd_code == CMD_HEARTBEAT
    }

    /// The response to this request with `status`, `header` and no
    /// content: what a proxy answers itself (a refusal, a heartbeat ack).
    pub fn answer(&self, status: u16, header: &Headers) -> Frame {
        Frame {
            kind: Kind::Response,
            cmd_code: if self.is_heartbeat() {
                CMD_HEARTBEAT
            } else {
                CMD_RESPONSE
            },
            version: self.version,
            request_id: self.request_id,
            codec: self.codec,
            timeout_ms: 0,
            status,
            class: Bytes::new(),
            header: header.encode(),
            content: Bytes::new(),
        }
    }
}

/// A header map: string keys and values, in their order on the wire.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The value of `name` (exactly as written), if any.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `name`, ignoring ASCII case.
    pub fn get_ignore_case(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Sets `name` to `value`, replacing it if present.
    pub fn set(&mut self, name: &str, value: &str) {
        match self.0.iter_mut().find(|(k, _)| k == name) {
            Some(entry) => value.clone_into(&mut entry.1),
            None => self.0.push((name.to_owned(), value.to_owned())),
        }
    }

    /// The encoding SOFARPC's `SimpleMapSerializer` writes.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        for (key, value) in &self.0 {
            for text in [key, value] {
                out.put_i32(i32::try_from(text.len()).unwrap_or(i32::MAX));
                out.put_slice(text.as_bytes());
            }
        }
        out.freeze()
    }
}

fn parse_header(bytes: &[u8], max_entries: usize) -> Result<Headers, BoltError> {
    let mut entries = Vec::new();
    let mut at = 0;
    let error = |at: usize, what: String| BoltError::Header { at, what };
    let string = |at: &mut usize| -> Result<String, BoltError> {
        let rest = &bytes[*at..];
        if rest.len() < 4 {
            return Err(error(
                *at,
                format!(
                    "{} bytes left where a 4-byte length was expected",
                    rest.len()
                ),
            ));
        }
        let length = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        // SOFARPC writes -1 for a null string: read as empty.
        if length == -1 {
            *at += 4;
            return Ok(String::new());
        }
        let length = usize::try_from(length)
            .map_err(|_| error(*at, format!("a string length of {length}")))?;
        if rest.len() - 4 < length {
            return Err(error(
                *at,
                format!("a string of {length} bytes, with {} left", rest.len() - 4),
            ));
        }
        let text = std::str::from_utf8(&rest[4..4 + length])
            .map_err(|e| error(*at + 4, format!("not UTF-8: {e}")))?
            .to_owned();
        *at += 4 + length;
        Ok(text)
    };
    while at < bytes.len() {
        if entries.len() >= max_entries {
            return Err(error(at, format!("more than {max_entries} entries")));
        }
        let key = string(&mut at)?;
        let value = string(&mut at)?;
        entries.push((key, value));
    }
    Ok(Headers(entries))
}

#[cfg(test)]
mod tests;
