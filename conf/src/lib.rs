//! libsdp policy: which stream sockets go over SDP, which stay on TCP.
//!
//! The file (`/etc/libsdp.conf`, or `LIBSDP_CONFIG_FILE`) keeps the grammar of the original
//! OFED libsdp, see [`parse`](crate::Policy::parse) and the shipped `conf/libsdp.conf`:
//!
//! ```text
//! use sdp|tcp|both server|listen|client|connect <program-glob> <addr[/prefix]|*>:<port[-port]|*>
//! log min-level <1-9> destination stderr|syslog|file <name>
//! ```
//!
//! Decisions ([`Policy::decide`]):
//!
//! | situation | decision | `Verdict::why` |
//! |---|---|---|
//! | `SIMPLE_LIBSDP` / `ALWAYS_USE_SDP` | sdp | `always-sdp` |
//! | the file does not exist | both | `no-file-default` |
//! | the file is broken (fail open) | tcp | `fail-open` |
//! | the first rule of the role's list that matches | its mode | `rule` |
//! | the file has rules, none matches | both | `no-match-default` |
//! | the file has no `use` rule at all | both | `no-rules-default` |
//!
//! The original libsdp returned `both` when no rule matched (`get_family_by_first_matching_rule`
//! in `match.c`), kept here. When the file had no rule at all (or did not exist) it switched to
//! "simple SDP" mode, SDP for everything; here both of those cases give `both` instead (DESIGN.md
//! §8): `both` still tries SDP first and falls back to TCP, so a program without an SDP peer keeps
//! working, and an empty file means the same as no file.
//!
//! Other differences from the original, all on inputs it handled surprisingly:
//! - `/0` is "every address of the family"; the original turned a zero prefix into a full-length
//!   one (`prefixlen ?: 32`), so `10.0.0.0/0` matched only 10.0.0.0.
//! - Only the prefix bits of the rule's address count (`10.1.2.3/8` = `10.0.0.0/8`); the original
//!   masked only the socket side for IPv4, so such a rule never matched.
//! - An IPv4 rule for `0.0.0.0` matches the wildcard address (or, with `/0`, every IPv4 address);
//!   the original let any `0.0.0.0` rule match every address of both families.
//! - IPv4-mapped IPv6 socket addresses obey IPv4 rules; the original compared families and so
//!   never matched a dual-stack socket against an IPv4 rule.
//! - IPv6 may also be written bracketed, `[::1]/128:80`; a prefix or port out of range, a
//!   reversed port range and a level outside 1-9 are errors instead of silent non-matches.
//!
//! The crate is pure logic; the only I/O is [`Policy::load`], reading one file with std::fs.

#![forbid(unsafe_code)]

mod addr;
mod env;
mod error;
mod glob;
mod parse;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;

pub use addr::{AddrMatch, PortMatch};
pub use env::{Activation, DEFAULT_CONFIG_FILE, LoadedBy, activation, loaded_by};
pub use error::{LoadError, ParseError, ParseErrors};
pub use glob::glob_match;

/// Which side of a connection a socket is: the rule lists are separate for the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `server` or `listen`: matched at `listen()` against the local (bound) address.
    Server,
    /// `client` or `connect`: matched at `connect()` against the remote address.
    Client,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a socket may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// SDP only: a connect that cannot go over SDP fails; a listener accepts only SDP clients.
    Sdp,
    /// Plain kernel TCP, libsdp stays out of the way.
    Tcp,
    /// SDP when the peer can, TCP otherwise.
    Both,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sdp => "sdp",
            Mode::Tcp => "tcp",
            Mode::Both => "both",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `use` statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub mode: Mode,
    pub role: Role,
    /// fnmatch glob on the program's short name (`program_invocation_short_name`).
    pub program: String,
    pub addr: AddrMatch,
    pub ports: PortMatch,
    /// 1-based line of the statement in its file.
    pub line: u32,
    /// The statement as written (blanks around it and any comment removed).
    pub text: String,
}

impl Rule {
    /// True when this rule applies to `program` with socket address `addr` (role not checked:
    /// the rule lists are per role).
    pub fn matches(&self, program: &str, addr: &SocketAddr) -> bool {
        glob_match(&self.program, program)
            && self.addr.matches(addr.ip())
            && self.ports.matches(addr.port())
    }
}

/// The canonical form, which parses back to the same rule: `use sdp server memcach* *:11211`.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "use {} {} {} {}:{}",
            self.mode, self.role, self.program, self.addr, self.ports
        )
    }
}

/// A `log` statement's settings. Fields left out of the statement keep their defaults: level 9
/// (errors only), destination stderr. Several `log` statements apply in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSpec {
    /// 1 (everything, debug) to 9 (errors only).
    pub min_level: u8,
    pub dest: LogDest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogDest {
    Stderr,
    Syslog,
    /// The name as written; where it lands (absolute path, /var/log, /tmp with uid) is the
    /// logger's business.
    File(String),
}

/// Where a policy came from; decides the answer when no rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Parsed from a file.
    File,
    /// There was no file: `both` everywhere.
    NoFile,
    /// `SIMPLE_LIBSDP` / `ALWAYS_USE_SDP`: `sdp` everywhere.
    AlwaysSdp,
    /// The file was broken or unreadable: `tcp` everywhere.
    FailOpen,
}

/// A parsed policy: the server rules, the client rules, the log settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    server: Vec<Rule>,
    client: Vec<Rule>,
    log: Option<LogSpec>,
    source: String,
    origin: Origin,
}

/// The answer of [`Policy::decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub mode: Mode,
    /// The rule that decided, when one did.
    pub rule: Option<&'a Rule>,
    /// `rule`, `no-file-default`, `no-match-default`, `no-rules-default`, `always-sdp` or
    /// `fail-open`.
    pub why: &'static str,
}

/// What [`Policy::resolve`] settled on, with the error to report once if the file was bad.
#[derive(Debug)]
pub struct Resolved {
    pub policy: Policy,
    /// Set when the file exists but could not be read or parsed: the policy is then
    /// [`Policy::tcp_only`]. A missing file is not an error.
    pub error: Option<LoadError>,
}

impl Policy {
    /// Parses a policy file's text. `source_name` is used in error messages and
    /// [`source_name`](Self::source_name). Returns every mistake of the file, not just the first.
    pub fn parse(source_name: &str, text: &str) -> Result<Policy, ParseErrors> {
        let parsed = parse::parse(source_name, text)?;
        Ok(Policy {
            server: parsed.server,
            client: parsed.client,
            log: parsed.log,
            source: source_name.to_string(),
            origin: Origin::File,
        })
    }

    /// Reads and parses a file. Bytes that are not UTF-8 become U+FFFD and are then reported by
    /// the parser where they stand.
    pub fn load(path: &Path) -> Result<Policy, LoadError> {
        let bytes = std::fs::read(path).map_err(|error| LoadError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        let text = String::from_utf8_lossy(&bytes);
        Ok(Policy::parse(&path.display().to_string(), &text)?)
    }

    /// No policy file: `both` for every socket.
    pub fn default_both() -> Policy {
        Policy::fixed("(no policy file)", Origin::NoFile)
    }

    /// `SIMPLE_LIBSDP` / `ALWAYS_USE_SDP`: `sdp` for every socket.
    pub fn always_sdp() -> Policy {
        Policy::fixed("(SIMPLE_LIBSDP)", Origin::AlwaysSdp)
    }

    /// Fail open after a broken file: `tcp` for every socket.
    pub fn tcp_only() -> Policy {
        Policy::fixed("(broken policy file)", Origin::FailOpen)
    }

    fn fixed(source: &str, origin: Origin) -> Policy {
        Policy {
            server: Vec::new(),
            client: Vec::new(),
            log: None,
            source: source.to_string(),
            origin,
        }
    }

    /// The policy a process gets for an [`Activation`]: always-SDP if asked for; else the file
    /// (read with `read`, normally `std::fs::read_to_string`); a missing file gives
    /// [`default_both`](Self::default_both); an unreadable or broken file gives
    /// [`tcp_only`](Self::tcp_only) plus the error to report. The library and `sdp explain` both
    /// use this, so they cannot disagree.
    pub fn resolve(
        activation: &Activation,
        read: impl FnOnce(&Path) -> io::Result<String>,
    ) -> Resolved {
        if activation.always_sdp {
            return Resolved {
                policy: Policy::always_sdp(),
                error: None,
            };
        }
        let path = activation.config_file.as_path();
        match read(path) {
            Ok(text) => match Policy::parse(&path.display().to_string(), &text) {
                Ok(policy) => Resolved {
                    policy,
                    error: None,
                },
                Err(e) => Resolved {
                    policy: Policy::tcp_only(),
                    error: Some(LoadError::Parse(e)),
                },
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Resolved {
                policy: Policy::default_both(),
                error: None,
            },
            Err(error) => Resolved {
                policy: Policy::tcp_only(),
                error: Some(LoadError::Io {
                    path: path.to_path_buf(),
                    error,
                }),
            },
        }
    }

    /// The decision for `program` (short name) in `role` at `addr` (the local address for a
    /// server, the remote one for a client). First match wins.
    pub fn decide(&self, program: &str, role: Role, addr: &SocketAddr) -> Verdict<'_> {
        let fixed = |mode, why| Verdict {
            mode,
            rule: None,
            why,
        };
        match self.origin {
            Origin::AlwaysSdp => return fixed(Mode::Sdp, "always-sdp"),
            Origin::FailOpen => return fixed(Mode::Tcp, "fail-open"),
            Origin::NoFile => return fixed(Mode::Both, "no-file-default"),
            Origin::File => {}
        }
        if let Some(rule) = self.rules(role).iter().find(|r| r.matches(program, addr)) {
            return Verdict {
                mode: rule.mode,
                rule: Some(rule),
                why: "rule",
            };
        }
        if self.rule_count() == 0 {
            fixed(Mode::Both, "no-rules-default")
        } else {
            fixed(Mode::Both, "no-match-default")
        }
    }

    /// The merged `log` statements of the file, if it had any.
    pub fn log(&self) -> Option<&LogSpec> {
        self.log.as_ref()
    }

    /// The rules of one role, in file order.
    pub fn rules(&self, role: Role) -> &[Rule] {
        match role {
            Role::Server => &self.server,
            Role::Client => &self.client,
        }
    }

    /// Number of `use` rules of both roles.
    pub fn rule_count(&self) -> usize {
        self.server.len() + self.client.len()
    }

    /// The file name given to `parse`/`load`, or a description such as `(no policy file)`.
    pub fn source_name(&self) -> &str {
        &self.source
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }
}

#[cfg(test)]
mod tests;
