//! The policy-file grammar: a hand-written, line-oriented parser that reports every mistake.
//!
//! ```text
//! file      := { line "\n" }
//! line      := [ statement ] [ comment ]
//! comment   := "#" { any character }            (a token that starts with '#' ends the line)
//! statement := "use" mode role program addrport
//!            | "log" { "min-level" level | "destination" dest }
//! mode      := "sdp" | "tcp" | "both"
//! role      := "server" | "listen" | "client" | "connect"
//! program   := any token (an fnmatch glob on the program's short name; "*" for all)
//! addrport  := addr ":" ports                    (one token, no blanks inside)
//! addr      := "*" | ipv4 [ "/" 0..32 ] | ipv6 [ "/" 0..128 ] | "[" ipv6 "]" [ "/" 0..128 ]
//! ports     := "*" | port [ "-" port ]           (port 0..65535, start <= end)
//! level     := 1..9
//! dest      := "stderr" | "syslog" | "file" name
//! ```
//!
//! An unbracketed IPv6 address is separated from the port by the LAST colon of the token, as the
//! original scanner did (`1234:5678::0/64:*` is network 1234:5678::/64, any port; `::1:80` is
//! address ::1, port 80). The port part never contains a colon, so this split is unambiguous.
//! Keywords are lower case, as in the original scanner.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{AddrMatch, LogDest, LogSpec, Mode, ParseError, ParseErrors, PortMatch, Role, Rule};

/// What a file contains once it parsed cleanly.
pub(crate) struct Parsed {
    pub server: Vec<Rule>,
    pub client: Vec<Rule>,
    pub log: Option<LogSpec>,
}

/// Default log settings of a `log` statement that leaves a field out (the original defaults:
/// errors only, to stderr).
const DEFAULT_LOG: LogSpec = LogSpec {
    min_level: 9,
    dest: LogDest::Stderr,
};

pub(crate) fn parse(source: &str, text: &str) -> Result<Parsed, ParseErrors> {
    let mut p = Parser {
        source,
        errors: Vec::new(),
        parsed: Parsed {
            server: Vec::new(),
            client: Vec::new(),
            log: None,
        },
    };
    for (i, raw) in text.split('\n').enumerate() {
        let line = Line::split(u32::try_from(i + 1).unwrap_or(u32::MAX), raw);
        p.statement(&line);
    }
    if p.errors.is_empty() {
        Ok(p.parsed)
    } else {
        Err(ParseErrors(p.errors))
    }
}

/// A blank-separated word of a line.
#[derive(Clone, Copy)]
struct Token<'a> {
    /// 1-based column, in characters.
    col: u32,
    /// Byte offset in the line.
    start: usize,
    text: &'a str,
}

impl Token<'_> {
    /// Column of the character at byte offset `off` inside this token.
    fn col_at(&self, off: usize) -> u32 {
        self.col + count_chars(&self.text[..off])
    }

    fn end_col(&self) -> u32 {
        self.col_at(self.text.len())
    }
}

fn count_chars(s: &str) -> u32 {
    u32::try_from(s.chars().count()).unwrap_or(u32::MAX)
}

struct Line<'a> {
    no: u32,
    raw: &'a str,
    tokens: Vec<Token<'a>>,
}

impl<'a> Line<'a> {
    fn split(no: u32, raw: &'a str) -> Line<'a> {
        let mut tokens = Vec::new();
        let mut start: Option<usize> = None;
        let mut start_col = 1u32;
        for (col, (off, ch)) in (1u32..).zip(raw.char_indices()) {
            // '\r' is a blank so that files with CRLF line ends parse.
            let blank = ch == ' ' || ch == '\t' || ch == '\r' || ch == '\x0b' || ch == '\x0c';
            match (blank, start) {
                (true, Some(s)) => {
                    tokens.push(Token {
                        col: start_col,
                        start: s,
                        text: &raw[s..off],
                    });
                    start = None;
                }
                (false, None) => {
                    if ch == '#' {
                        return Line { no, raw, tokens };
                    }
                    start = Some(off);
                    start_col = col;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            tokens.push(Token {
                col: start_col,
                start: s,
                text: &raw[s..],
            });
        }
        Line { no, raw, tokens }
    }

    /// Column just after the last token: where a missing token is reported.
    fn end_col(&self) -> u32 {
        self.tokens.last().map_or(1, |t| t.end_col())
    }

    /// The statement's text as written, without blanks around it and without a comment.
    fn statement_text(&self) -> &'a str {
        match (self.tokens.first(), self.tokens.last()) {
            (Some(first), Some(last)) => &self.raw[first.start..last.start + last.text.len()],
            _ => "",
        }
    }
}

fn quoted(s: &str) -> String {
    if s.is_empty() {
        "nothing".to_string()
    } else {
        format!("\"{}\"", s.escape_debug())
    }
}

const END_OF_LINE: &str = "end of line";

struct Parser<'s> {
    source: &'s str,
    errors: Vec<ParseError>,
    parsed: Parsed,
}

impl Parser<'_> {
    fn error(&mut self, line: u32, column: u32, expected: impl Into<String>, found: String) {
        self.errors.push(ParseError {
            source: self.source.to_string(),
            line,
            column,
            expected: expected.into(),
            found,
        });
    }

    fn error_at(&mut self, line: &Line<'_>, t: &Token<'_>, expected: impl Into<String>) {
        self.error(line.no, t.col, expected, quoted(t.text));
    }

    /// Reports a token missing at the end of the line, unless the line already had an error
    /// (a misspelt keyword followed by nothing is one mistake, not two).
    fn missing(&mut self, line: &Line<'_>, errors_before: usize, expected: impl Into<String>) {
        if self.errors.len() != errors_before {
            return;
        }
        self.error(line.no, line.end_col(), expected, END_OF_LINE.to_string());
    }

    fn statement(&mut self, line: &Line<'_>) {
        let Some(first) = line.tokens.first() else {
            return;
        };
        match first.text {
            "use" => self.use_statement(line),
            "log" => self.log_statement(line),
            _ => self.error_at(line, first, "use or log"),
        }
    }

    fn use_statement(&mut self, line: &Line<'_>) {
        let errors_before = self.errors.len();
        let tok = |i: usize| line.tokens.get(i).copied();

        let Some(t) = tok(1) else {
            return self.missing(line, errors_before, "sdp, tcp or both");
        };
        let mode = match t.text {
            "sdp" => Some(Mode::Sdp),
            "tcp" => Some(Mode::Tcp),
            "both" => Some(Mode::Both),
            _ => {
                self.error_at(line, &t, "sdp, tcp or both");
                None
            }
        };

        let Some(t) = tok(2) else {
            return self.missing(line, errors_before, "server, listen, client or connect");
        };
        let role = match t.text {
            "server" | "listen" => Some(Role::Server),
            "client" | "connect" => Some(Role::Client),
            _ => {
                self.error_at(line, &t, "server, listen, client or connect");
                None
            }
        };

        let Some(t) = tok(3) else {
            return self.missing(line, errors_before, "a program name or glob (* for all)");
        };
        let program = t.text.to_string();

        let Some(t) = tok(4) else {
            return self.missing(
                line,
                errors_before,
                "<address>:<port> (e.g. *:* or 10.0.0.0/8:80-89)",
            );
        };
        let addr_port = self.addr_port(line, &t);

        if let Some(extra) = tok(5) {
            self.error_at(line, &extra, END_OF_LINE);
        }

        if self.errors.len() != errors_before {
            return;
        }
        if let (Some(mode), Some(role), Some((addr, ports))) = (mode, role, addr_port) {
            let rule = Rule {
                mode,
                role,
                program,
                addr,
                ports,
                line: line.no,
                text: line.statement_text().to_string(),
            };
            match role {
                Role::Server => self.parsed.server.push(rule),
                Role::Client => self.parsed.client.push(rule),
            }
        }
    }

    /// `addr[/prefix]:ports` in one token. Reports every mistake it can see in it.
    fn addr_port(&mut self, line: &Line<'_>, t: &Token<'_>) -> Option<(AddrMatch, PortMatch)> {
        let text = t.text;
        // (address, byte offset of the port text)
        let (addr, port_off) = if text.starts_with('[') {
            self.bracketed_addr(line, t)?
        } else {
            let Some(colon) = text.rfind(':') else {
                self.error_at(line, t, "<address>:<port> (e.g. *:* or 10.0.0.0/8:80-89)");
                return None;
            };
            (self.plain_addr(line, t, colon), colon + 1)
        };
        let ports = self.ports(line, t, port_off);
        Some((addr?, ports?))
    }

    /// `[v6]`, `[v6]/prefix`, followed by `:ports`.
    fn bracketed_addr(
        &mut self,
        line: &Line<'_>,
        t: &Token<'_>,
    ) -> Option<(Option<AddrMatch>, usize)> {
        let text = t.text;
        let Some(close) = text.find(']') else {
            self.error_at(line, t, "']' closing the IPv6 address");
            return None;
        };
        let inner = &text[1..close];
        let addr = match inner.parse::<Ipv6Addr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    line.no,
                    t.col_at(1),
                    "an IPv6 address inside [ ]",
                    quoted(inner),
                );
                None
            }
        };
        let mut off = close + 1;
        let mut prefix = Some(128u8);
        if text[off..].starts_with('/') {
            let p_start = off + 1;
            let p_end = text[p_start..]
                .find(':')
                .map_or(text.len(), |i| p_start + i);
            prefix = self.prefix(line, t, p_start, p_end, 128, "IPv6");
            off = p_end;
        }
        if !text[off..].starts_with(':') {
            let rest = &text[off..];
            let found = if rest.is_empty() {
                "end of token".to_string()
            } else {
                quoted(rest)
            };
            self.error(
                line.no,
                t.col_at(off),
                "':' and a port after the address",
                found,
            );
            return None;
        }
        let addr = match (addr, prefix) {
            (Some(addr), Some(prefix)) => Some(AddrMatch::V6 { addr, prefix }),
            _ => None,
        };
        Some((addr, off + 1))
    }

    /// `*`, `v4[/prefix]` or `v6[/prefix]` ending at byte `end` of the token.
    fn plain_addr(&mut self, line: &Line<'_>, t: &Token<'_>, end: usize) -> Option<AddrMatch> {
        let text = &t.text[..end];
        let (a, slash) = match text.find('/') {
            Some(i) => (&text[..i], Some(i)),
            None => (text, None),
        };
        if a == "*" {
            if let Some(i) = slash {
                self.error(
                    line.no,
                    t.col_at(i),
                    "':' after * (a wildcard has no prefix)",
                    quoted(&text[i..]),
                );
                return None;
            }
            return Some(AddrMatch::Any);
        }
        let parsed: Option<(bool, AddrMatch)> = if a.contains(':') {
            a.parse::<Ipv6Addr>()
                .ok()
                .map(|addr| (true, AddrMatch::V6 { addr, prefix: 128 }))
        } else {
            a.parse::<Ipv4Addr>()
                .ok()
                .map(|addr| (false, AddrMatch::V4 { addr, prefix: 32 }))
        };
        let Some((is_v6, mut addr)) = parsed else {
            self.error(line.no, t.col, "an IPv4 or IPv6 address or *", quoted(a));
            return None;
        };
        if let Some(i) = slash {
            let (max, family) = if is_v6 { (128, "IPv6") } else { (32, "IPv4") };
            let p = self.prefix(line, t, i + 1, end, max, family)?;
            match &mut addr {
                AddrMatch::V4 { prefix, .. } | AddrMatch::V6 { prefix, .. } => *prefix = p,
                AddrMatch::Any => {}
            }
        }
        Some(addr)
    }

    /// The prefix length in bytes `start..end` of the token.
    fn prefix(
        &mut self,
        line: &Line<'_>,
        t: &Token<'_>,
        start: usize,
        end: usize,
        max: u8,
        family: &str,
    ) -> Option<u8> {
        let p = &t.text[start..end];
        let expected = format!("a prefix length in range for {family} (0-{max})");
        match parse_decimal(p) {
            Some(v) if v <= u64::from(max) => u8::try_from(v).ok(),
            _ => {
                self.error(line.no, t.col_at(start), expected, quoted(p));
                None
            }
        }
    }

    /// `*`, `port` or `start-end` from byte `off` to the end of the token.
    fn ports(&mut self, line: &Line<'_>, t: &Token<'_>, off: usize) -> Option<PortMatch> {
        let p = &t.text[off..];
        if p == "*" {
            return Some(PortMatch::Any);
        }
        if p.is_empty() {
            self.error(
                line.no,
                t.col_at(off),
                "a port, port range or * after ':'",
                "end of token".into(),
            );
            return None;
        }
        let (s, dash) = match p.find('-') {
            Some(i) => (&p[..i], Some(i)),
            None => (p, None),
        };
        let start = self.port(line, t, off, s);
        let end = match dash {
            Some(i) => self.port(line, t, off + i + 1, &p[i + 1..]),
            None => start,
        };
        let (start, end) = (start?, end?);
        if end < start {
            let i = dash.unwrap_or(0);
            self.error(
                line.no,
                t.col_at(off + i + 1),
                format!("an end port not below the start port {start}"),
                quoted(&p[i + 1..]),
            );
            return None;
        }
        Some(PortMatch::Range { start, end })
    }

    fn port(&mut self, line: &Line<'_>, t: &Token<'_>, off: usize, s: &str) -> Option<u16> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            match parse_decimal(s).and_then(|v| u16::try_from(v).ok()) {
                Some(v) => Some(v),
                None => {
                    self.error(
                        line.no,
                        t.col_at(off),
                        "a port in range (0-65535)",
                        quoted(s),
                    );
                    None
                }
            }
        } else {
            self.error(
                line.no,
                t.col_at(off),
                "a port number, port range or *",
                quoted(s),
            );
            None
        }
    }

    fn log_statement(&mut self, line: &Line<'_>) {
        let mut spec = self.parsed.log.clone().unwrap_or(DEFAULT_LOG);
        let errors_before = self.errors.len();
        let mut i = 1;
        while let Some(t) = line.tokens.get(i).copied() {
            match t.text {
                "min-level" => {
                    let Some(v) = line.tokens.get(i + 1).copied() else {
                        self.missing(line, errors_before, "a log level (1-9)");
                        break;
                    };
                    match parse_decimal(v.text) {
                        Some(level @ 1..=9) => spec.min_level = level as u8,
                        _ => self.error_at(line, &v, "a log level in range (1-9)"),
                    }
                    i += 2;
                }
                "destination" => {
                    let Some(v) = line.tokens.get(i + 1).copied() else {
                        self.missing(line, errors_before, "stderr, syslog or file");
                        break;
                    };
                    i += 2;
                    match v.text {
                        "stderr" => spec.dest = LogDest::Stderr,
                        "syslog" => spec.dest = LogDest::Syslog,
                        "file" => {
                            let Some(name) = line.tokens.get(i).copied() else {
                                self.missing(line, errors_before, "a file name after file");
                                break;
                            };
                            spec.dest = LogDest::File(name.text.to_string());
                            i += 1;
                        }
                        _ => self.error_at(line, &v, "stderr, syslog or file"),
                    }
                }
                _ => {
                    self.error_at(line, &t, "min-level or destination");
                    break;
                }
            }
        }
        if self.errors.len() == errors_before {
            self.parsed.log = Some(spec);
        }
    }
}

/// A non-empty run of ASCII digits; None for anything else. Saturates instead of overflowing so
/// that a huge number is reported as out of range, not as garbage.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |acc, b| {
        acc.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}
