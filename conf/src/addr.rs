//! Address and port matchers of a rule, and how a socket address is compared with them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address half of `<addr[/prefix]|*>:<port[-port]|*>`.
///
/// The prefix is always explicit here: an address written without one gets the full length
/// (32 or 128), as in the original `config_parser.y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrMatch {
    /// `*`: every address of either family.
    Any,
    /// An IPv4 network. Also matches IPv4-mapped IPv6 socket addresses (`::ffff:a.b.c.d`), so a
    /// dual-stack socket talking to an IPv4 peer obeys the IPv4 rules.
    V4 { addr: Ipv4Addr, prefix: u8 },
    /// An IPv6 network. Matches IPv6 socket addresses; an IPv4 socket address only when the rule
    /// itself lies inside `::ffff:0:0/96` (an IPv4-mapped rule).
    V6 { addr: Ipv6Addr, prefix: u8 },
}

impl AddrMatch {
    /// True when the address of a socket is inside this network.
    ///
    /// Only the first `prefix` bits of both sides are compared, so `10.1.2.3/8` means the same as
    /// `10.0.0.0/8` (the original masked only the socket side for IPv4, which made such a rule
    /// match nothing; for IPv6 it compared prefixes as done here).
    pub fn matches(&self, ip: IpAddr) -> bool {
        let (v4, v6) = match ip {
            IpAddr::V4(v4) => (Some(v4), v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => (v6.to_ipv4_mapped(), v6),
        };
        match *self {
            AddrMatch::Any => true,
            AddrMatch::V4 { addr, prefix } => {
                v4.is_some_and(|v4| prefix_eq(addr.to_bits(), v4.to_bits(), prefix, 32))
            }
            AddrMatch::V6 { addr, prefix } => {
                let rule_is_mapped = prefix >= 96 && addr.to_ipv4_mapped().is_some();
                if v4.is_some() && !rule_is_mapped {
                    return false;
                }
                prefix_eq(addr.to_bits(), v6.to_bits(), prefix, 128)
            }
        }
    }

    /// The largest prefix length allowed for this family.
    pub fn max_prefix(&self) -> u8 {
        match self {
            AddrMatch::Any => 0,
            AddrMatch::V4 { .. } => 32,
            AddrMatch::V6 { .. } => 128,
        }
    }
}

/// Compares the top `prefix` bits of two `width`-bit numbers.
fn prefix_eq<T>(a: T, b: T, prefix: u8, width: u32) -> bool
where
    T: Into<u128>,
{
    let (a, b) = (a.into(), b.into());
    let prefix = u32::from(prefix).min(width);
    if prefix == 0 {
        return true;
    }
    let shift = width - prefix;
    (a >> shift) == (b >> shift)
}

/// Renders the way the grammar accepts it back: `*`, `10.0.0.0/8`, `[fe80::]/10`.
impl fmt::Display for AddrMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrMatch::Any => f.write_str("*"),
            AddrMatch::V4 { addr, prefix } => write!(f, "{addr}/{prefix}"),
            AddrMatch::V6 { addr, prefix } => write!(f, "[{addr}]/{prefix}"),
        }
    }
}

/// The port half of a rule's `addr:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortMatch {
    /// `*`: every port.
    Any,
    /// `start` or `start-end`, inclusive; `start <= end` always holds after parsing.
    Range { start: u16, end: u16 },
}

impl PortMatch {
    pub fn matches(&self, port: u16) -> bool {
        match *self {
            PortMatch::Any => true,
            PortMatch::Range { start, end } => start <= port && port <= end,
        }
    }
}

impl fmt::Display for PortMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PortMatch::Any => f.write_str("*"),
            PortMatch::Range { start, end } if start == end => write!(f, "{start}"),
            PortMatch::Range { start, end } => write!(f, "{start}-{end}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str, prefix: u8) -> AddrMatch {
        AddrMatch::V4 {
            addr: s.parse().unwrap(),
            prefix,
        }
    }
    fn v6(s: &str, prefix: u8) -> AddrMatch {
        AddrMatch::V6 {
            addr: s.parse().unwrap(),
            prefix,
        }
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn any_matches_both_families() {
        assert!(AddrMatch::Any.matches(ip("10.0.0.1")));
        assert!(AddrMatch::Any.matches(ip("::1")));
    }

    #[test]
    fn v4_prefix_zero_matches_every_ipv4_only() {
        assert!(v4("0.0.0.0", 0).matches(ip("1.2.3.4")));
        assert!(v4("0.0.0.0", 0).matches(ip("255.255.255.255")));
        assert!(!v4("0.0.0.0", 0).matches(ip("2001:db8::1")));
    }

    #[test]
    fn v4_prefix_32_matches_exactly() {
        assert!(v4("10.0.0.1", 32).matches(ip("10.0.0.1")));
        assert!(!v4("10.0.0.1", 32).matches(ip("10.0.0.2")));
    }

    #[test]
    fn v4_prefix_compares_only_network_bits() {
        assert!(v4("10.0.0.0", 8).matches(ip("10.255.1.2")));
        assert!(!v4("10.0.0.0", 8).matches(ip("11.0.0.0")));
        assert!(v4("10.1.2.3", 8).matches(ip("10.9.9.9")));
        assert!(v4("192.168.1.0", 23).matches(ip("192.168.0.77")));
        assert!(!v4("192.168.1.0", 24).matches(ip("192.168.0.77")));
    }

    #[test]
    fn v4_rule_matches_ipv4_mapped_ipv6_socket_address() {
        assert!(v4("10.0.0.0", 8).matches(ip("::ffff:10.1.2.3")));
        assert!(!v4("10.0.0.0", 8).matches(ip("::ffff:11.1.2.3")));
        // Not mapped: an IPv6 address whose low bits look like 10.x is not IPv4.
        assert!(!v4("10.0.0.0", 8).matches(ip("::10.1.2.3")));
    }

    #[test]
    fn v6_prefixes_zero_and_128() {
        assert!(v6("::", 0).matches(ip("2001:db8::1")));
        assert!(v6("2001:db8::1", 128).matches(ip("2001:db8::1")));
        assert!(!v6("2001:db8::1", 128).matches(ip("2001:db8::2")));
        assert!(v6("fe80::", 10).matches(ip("febf::1")));
        assert!(!v6("fe80::", 10).matches(ip("fec0::1")));
    }

    #[test]
    fn v6_rule_does_not_match_ipv4_unless_mapped_rule() {
        assert!(!v6("::", 0).matches(ip("10.0.0.1")));
        assert!(!v6("::", 0).matches(ip("::ffff:10.0.0.1")));
        assert!(v6("::ffff:10.0.0.0", 104).matches(ip("10.0.0.1")));
        assert!(v6("::ffff:10.0.0.0", 104).matches(ip("::ffff:10.0.0.1")));
        assert!(!v6("::ffff:10.0.0.0", 104).matches(ip("11.0.0.1")));
    }

    #[test]
    fn ports() {
        assert!(PortMatch::Any.matches(0));
        assert!(PortMatch::Any.matches(65535));
        let r = PortMatch::Range { start: 22, end: 25 };
        assert!(!r.matches(21));
        assert!(r.matches(22));
        assert!(r.matches(25));
        assert!(!r.matches(26));
        assert!(PortMatch::Range { start: 80, end: 80 }.matches(80));
        assert!(
            PortMatch::Range {
                start: 0,
                end: 65535
            }
            .matches(65535)
        );
    }

    #[test]
    fn display_forms() {
        assert_eq!(AddrMatch::Any.to_string(), "*");
        assert_eq!(v4("10.0.0.0", 8).to_string(), "10.0.0.0/8");
        assert_eq!(v6("fe80::", 10).to_string(), "[fe80::]/10");
        assert_eq!(PortMatch::Range { start: 1, end: 1 }.to_string(), "1");
        assert_eq!(PortMatch::Range { start: 1, end: 9 }.to_string(), "1-9");
    }
}
