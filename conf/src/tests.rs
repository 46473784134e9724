//! Grammar, error and decision tests of the policy.

use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ok(text: &str) -> Policy {
    match Policy::parse("t.conf", text) {
        Ok(p) => p,
        Err(e) => panic!("unexpected errors:\n{e}"),
    }
}

fn errs(text: &str) -> Vec<ParseError> {
    match Policy::parse("t.conf", text) {
        Ok(_) => panic!("expected errors for {text:?}"),
        Err(e) => e.0,
    }
}

/// The one error of `text`, as (line, column, expected, found).
fn one_err(text: &str) -> (u32, u32, String, String) {
    let e = errs(text);
    assert_eq!(e.len(), 1, "errors: {}", ParseErrors(e.clone()));
    let e = &e[0];
    (e.line, e.column, e.expected.clone(), e.found.clone())
}

fn only_rule(text: &str) -> Rule {
    let p = ok(text);
    assert_eq!(p.rule_count(), 1);
    p.rules(Role::Server)
        .iter()
        .chain(p.rules(Role::Client))
        .next()
        .unwrap()
        .clone()
}

// ---- grammar ------------------------------------------------------------------------------

#[test]
fn empty_file_parses_with_no_rules() {
    let p = ok("");
    assert_eq!(p.rule_count(), 0);
    assert!(p.log().is_none());
}

#[test]
fn comments_and_blank_lines_are_skipped() {
    let p =
        ok("# header\n\n   \t\n  # indented comment\nuse sdp server * *:* # trailing comment\n");
    assert_eq!(p.rule_count(), 1);
    assert_eq!(p.rules(Role::Server)[0].line, 5);
    assert_eq!(p.rules(Role::Server)[0].text, "use sdp server * *:*");
}

#[test]
fn crlf_line_ends_parse() {
    let p = ok("use sdp server * *:*\r\nuse tcp client * *:22\r\n");
    assert_eq!(p.rule_count(), 2);
}

#[test]
fn use_statement_fields() {
    let r = only_rule("use tcp client ssh* 10.0.0.0/8:22-25");
    assert_eq!(r.mode, Mode::Tcp);
    assert_eq!(r.role, Role::Client);
    assert_eq!(r.program, "ssh*");
    assert_eq!(
        r.addr,
        AddrMatch::V4 {
            addr: Ipv4Addr::new(10, 0, 0, 0),
            prefix: 8
        }
    );
    assert_eq!(r.ports, PortMatch::Range { start: 22, end: 25 });
    assert_eq!(r.line, 1);
}

#[test]
fn all_modes_and_role_synonyms() {
    for (word, mode) in [("sdp", Mode::Sdp), ("tcp", Mode::Tcp), ("both", Mode::Both)] {
        assert_eq!(only_rule(&format!("use {word} server * *:*")).mode, mode);
    }
    for (word, role) in [
        ("server", Role::Server),
        ("listen", Role::Server),
        ("client", Role::Client),
        ("connect", Role::Client),
    ] {
        assert_eq!(only_rule(&format!("use sdp {word} * *:*")).role, role);
    }
}

#[test]
fn roles_go_to_separate_lists_in_order() {
    let p = ok(
        "use sdp server a *:1\nuse tcp client b *:2\nuse both listen c *:3\nuse sdp connect d *:4\n",
    );
    let s: Vec<u32> = p.rules(Role::Server).iter().map(|r| r.line).collect();
    let c: Vec<u32> = p.rules(Role::Client).iter().map(|r| r.line).collect();
    assert_eq!(s, [1, 3]);
    assert_eq!(c, [2, 4]);
}

#[test]
fn address_without_prefix_gets_full_length() {
    assert_eq!(
        only_rule("use sdp server * 1.2.3.4:80").addr,
        AddrMatch::V4 {
            addr: Ipv4Addr::new(1, 2, 3, 4),
            prefix: 32
        }
    );
    assert_eq!(
        only_rule("use sdp server * [::1]:80").addr,
        AddrMatch::V6 {
            addr: Ipv6Addr::LOCALHOST,
            prefix: 128
        }
    );
}

#[test]
fn ipv6_unbracketed_splits_at_last_colon() {
    // The original's example.
    let r = only_rule("use sdp connect * 1234:5678::0/64:*");
    assert_eq!(
        r.addr,
        AddrMatch::V6 {
            addr: "1234:5678::".parse().unwrap(),
            prefix: 64
        }
    );
    assert_eq!(r.ports, PortMatch::Any);
    let r = only_rule("use sdp connect * ::1:80");
    assert_eq!(
        r.addr,
        AddrMatch::V6 {
            addr: Ipv6Addr::LOCALHOST,
            prefix: 128
        }
    );
    assert_eq!(r.ports, PortMatch::Range { start: 80, end: 80 });
    let r = only_rule("use sdp connect * ::1/128:80");
    assert_eq!(
        r.addr,
        AddrMatch::V6 {
            addr: Ipv6Addr::LOCALHOST,
            prefix: 128
        }
    );
    let r = only_rule("use sdp connect * :::5000-5010");
    assert_eq!(
        r.addr,
        AddrMatch::V6 {
            addr: Ipv6Addr::UNSPECIFIED,
            prefix: 128
        }
    );
    assert_eq!(
        r.ports,
        PortMatch::Range {
            start: 5000,
            end: 5010
        }
    );
}

#[test]
fn ipv6_bracketed_forms() {
    let r = only_rule("use sdp connect * [fe80::]/10:443");
    assert_eq!(
        r.addr,
        AddrMatch::V6 {
            addr: "fe80::".parse().unwrap(),
            prefix: 10
        }
    );
    assert_eq!(
        r.ports,
        PortMatch::Range {
            start: 443,
            end: 443
        }
    );
    let r = only_rule("use sdp connect * [::ffff:10.0.0.1]:*");
    assert_eq!(
        r.addr,
        AddrMatch::V6 {
            addr: "::ffff:10.0.0.1".parse().unwrap(),
            prefix: 128
        }
    );
    // Both spellings mean the same rule.
    assert_eq!(
        only_rule("use sdp server * [::1]/128:80").addr,
        only_rule("use sdp server * ::1/128:80").addr
    );
}

#[test]
fn prefix_zero_and_max_accepted() {
    assert_eq!(
        only_rule("use sdp server * 0.0.0.0/0:*").addr,
        AddrMatch::V4 {
            addr: Ipv4Addr::UNSPECIFIED,
            prefix: 0
        }
    );
    assert_eq!(
        only_rule("use sdp server * 1.2.3.4/32:*").addr,
        AddrMatch::V4 {
            addr: Ipv4Addr::new(1, 2, 3, 4),
            prefix: 32
        }
    );
    assert_eq!(
        only_rule("use sdp server * ::/0:*").addr,
        AddrMatch::V6 {
            addr: Ipv6Addr::UNSPECIFIED,
            prefix: 0
        }
    );
    assert_eq!(
        only_rule("use sdp server * [::1]/128:*").addr,
        AddrMatch::V6 {
            addr: Ipv6Addr::LOCALHOST,
            prefix: 128
        }
    );
}

#[test]
fn port_forms() {
    assert_eq!(
        only_rule("use sdp server * *:0").ports,
        PortMatch::Range { start: 0, end: 0 }
    );
    assert_eq!(
        only_rule("use sdp server * *:65535").ports,
        PortMatch::Range {
            start: 65535,
            end: 65535
        }
    );
    assert_eq!(
        only_rule("use sdp server * *:1-65535").ports,
        PortMatch::Range {
            start: 1,
            end: 65535
        }
    );
    assert_eq!(
        only_rule("use sdp server * *:7-7").ports,
        PortMatch::Range { start: 7, end: 7 }
    );
    assert_eq!(only_rule("use sdp server * *:*").ports, PortMatch::Any);
}

#[test]
fn tabs_and_runs_of_blanks_separate_tokens() {
    let r = only_rule("\tuse   sdp\tserver \t memcached   *:11211   ");
    assert_eq!(r.program, "memcached");
    assert_eq!(r.text, "use   sdp\tserver \t memcached   *:11211");
}

#[test]
fn log_statement_both_orders_and_defaults() {
    let p = ok("log min-level 7 destination stderr");
    assert_eq!(
        p.log(),
        Some(&LogSpec {
            min_level: 7,
            dest: LogDest::Stderr
        })
    );
    let p = ok("log destination syslog min-level 3");
    assert_eq!(
        p.log(),
        Some(&LogSpec {
            min_level: 3,
            dest: LogDest::Syslog
        })
    );
    let p = ok("log destination file libsdp.log");
    assert_eq!(
        p.log(),
        Some(&LogSpec {
            min_level: 9,
            dest: LogDest::File("libsdp.log".into())
        })
    );
    let p = ok("log min-level 1");
    assert_eq!(
        p.log(),
        Some(&LogSpec {
            min_level: 1,
            dest: LogDest::Stderr
        })
    );
    // The original accepts a bare `log`.
    assert_eq!(
        ok("log").log(),
        Some(&LogSpec {
            min_level: 9,
            dest: LogDest::Stderr
        })
    );
}

#[test]
fn later_log_statements_override_earlier_fields() {
    let p = ok("log min-level 4 destination syslog\nlog min-level 8\n");
    assert_eq!(
        p.log(),
        Some(&LogSpec {
            min_level: 8,
            dest: LogDest::Syslog
        })
    );
}

#[test]
fn original_default_file_parses() {
    let text = "log min-level 9 destination file libsdp.log\nuse both server * *:*\nuse both client * *:*\n";
    let p = ok(text);
    assert_eq!(p.rule_count(), 2);
    assert_eq!(p.log().unwrap().dest, LogDest::File("libsdp.log".into()));
}

#[test]
fn shipped_example_file_parses() {
    let text = include_str!("../libsdp.conf");
    let p = ok(text);
    // The example is harmless: whatever it holds decides `both` for an arbitrary socket or
    // has no rule at all.
    let v = p.decide("anything", Role::Client, &sa("192.0.2.1:1234"));
    assert_eq!(v.mode, Mode::Both);
}

// ---- errors -------------------------------------------------------------------------------

#[test]
fn bad_mode_reports_token_and_column() {
    let e = errs("use sdpp client * *:*");
    assert_eq!(e.len(), 1);
    assert_eq!(
        e[0].to_string(),
        "t.conf:1:5: expected sdp, tcp or both, found \"sdpp\""
    );
}

#[test]
fn bad_role() {
    assert_eq!(
        one_err("use sdp serve * *:*"),
        (
            1,
            9,
            "server, listen, client or connect".into(),
            "\"serve\"".into()
        )
    );
}

#[test]
fn unknown_statement() {
    assert_eq!(
        one_err("\n  usr sdp server * *:*"),
        (2, 3, "use or log".into(), "\"usr\"".into())
    );
}

#[test]
fn keywords_are_lower_case() {
    assert_eq!(one_err("USE sdp server * *:*").1, 1);
    assert_eq!(one_err("use SDP server * *:*").1, 5);
}

#[test]
fn missing_fields_point_past_the_last_token() {
    assert_eq!(
        one_err("use"),
        (1, 4, "sdp, tcp or both".into(), "end of line".into())
    );
    assert_eq!(
        one_err("use sdp"),
        (
            1,
            8,
            "server, listen, client or connect".into(),
            "end of line".into()
        )
    );
    assert_eq!(
        one_err("use sdp server").2,
        "a program name or glob (* for all)"
    );
    let (l, c, exp, found) = one_err("use sdp server prog   # comment");
    assert_eq!((l, c, found.as_str()), (1, 20, "end of line"));
    assert!(exp.starts_with("<address>:<port>"), "{exp}");
}

#[test]
fn extra_token_after_rule() {
    assert_eq!(
        one_err("use sdp server * *:* extra"),
        (1, 22, "end of line".into(), "\"extra\"".into())
    );
}

#[test]
fn missing_colon_in_address_port() {
    let (_, c, exp, found) = one_err("use sdp server * 10.0.0.1");
    assert_eq!(c, 18);
    assert!(exp.starts_with("<address>:<port>"));
    assert_eq!(found, "\"10.0.0.1\"");
}

#[test]
fn bad_addresses() {
    assert_eq!(
        one_err("use sdp server * 10.0.0.256:1"),
        (
            1,
            18,
            "an IPv4 or IPv6 address or *".into(),
            "\"10.0.0.256\"".into()
        )
    );
    assert_eq!(
        one_err("use sdp server * host.example:1").3,
        "\"host.example\""
    );
    assert_eq!(one_err("use sdp server * :1").3, "nothing");
    // "::1" alone: the last colon is taken as the port separator, leaving ":" as the address.
    assert_eq!(one_err("use sdp server * ::1").3, "\":\"");
    assert_eq!(one_err("use sdp server * 1::2::3:80").3, "\"1::2::3\"");
}

#[test]
fn prefix_out_of_range_points_at_the_prefix() {
    assert_eq!(
        one_err("use tcp server * 10.0.0.0/33:1"),
        (
            1,
            27,
            "a prefix length in range for IPv4 (0-32)".into(),
            "\"33\"".into()
        )
    );
    assert_eq!(
        one_err("use tcp server * ::1/129:1"),
        (
            1,
            22,
            "a prefix length in range for IPv6 (0-128)".into(),
            "\"129\"".into()
        )
    );
    assert_eq!(
        one_err("use tcp server * [::1]/200:1"),
        (
            1,
            24,
            "a prefix length in range for IPv6 (0-128)".into(),
            "\"200\"".into()
        )
    );
    assert_eq!(one_err("use tcp server * 10.0.0.0/:1").3, "nothing");
    assert_eq!(one_err("use tcp server * 10.0.0.0/x:1").3, "\"x\"");
    assert_eq!(
        one_err("use tcp server * 10.0.0.0/99999999999999999999999:1").2,
        "a prefix length in range for IPv4 (0-32)"
    );
}

#[test]
fn wildcard_address_takes_no_prefix() {
    let (_, c, _, found) = one_err("use tcp server * */8:1");
    assert_eq!((c, found.as_str()), (19, "\"/8\""));
}

#[test]
fn bracket_errors() {
    assert_eq!(
        one_err("use sdp server * [::1:80").2,
        "']' closing the IPv6 address"
    );
    assert_eq!(one_err("use sdp server * [::1:80").1, 18);
    assert_eq!(
        one_err("use sdp server * [10.0.0.1]:80"),
        (
            1,
            19,
            "an IPv6 address inside [ ]".into(),
            "\"10.0.0.1\"".into()
        )
    );
    assert_eq!(
        one_err("use sdp server * [::1]80"),
        (
            1,
            23,
            "':' and a port after the address".into(),
            "\"80\"".into()
        )
    );
    assert_eq!(one_err("use sdp server * [::1]").3, "end of token");
}

#[test]
fn port_out_of_range_points_at_the_port() {
    assert_eq!(
        one_err("use both client * *:70000"),
        (
            1,
            21,
            "a port in range (0-65535)".into(),
            "\"70000\"".into()
        )
    );
    assert_eq!(
        one_err("use both client * *:1-65536"),
        (
            1,
            23,
            "a port in range (0-65535)".into(),
            "\"65536\"".into()
        )
    );
    assert_eq!(
        one_err("use both client * *:99999999999999999999999").2,
        "a port in range (0-65535)"
    );
}

#[test]
fn port_syntax_errors() {
    assert_eq!(
        one_err("use both client * *:"),
        (
            1,
            21,
            "a port, port range or * after ':'".into(),
            "end of token".into()
        )
    );
    assert_eq!(
        one_err("use both client * *:http"),
        (
            1,
            21,
            "a port number, port range or *".into(),
            "\"http\"".into()
        )
    );
    assert_eq!(
        one_err("use both client * *:10-"),
        (
            1,
            24,
            "a port number, port range or *".into(),
            "nothing".into()
        )
    );
    assert_eq!(one_err("use both client * *:-5").3, "nothing");
    assert_eq!(one_err("use both client * *:+5").3, "\"+5\"");
}

#[test]
fn reversed_port_range() {
    assert_eq!(
        one_err("use both client * *:25-22"),
        (
            1,
            24,
            "an end port not below the start port 25".into(),
            "\"22\"".into()
        )
    );
}

#[test]
fn bad_address_and_bad_port_in_one_token_both_reported() {
    let e = errs("use both client * 10.0.0.0/40:70000");
    assert_eq!(e.len(), 2);
    assert_eq!((e[0].column, e[1].column), (28, 31));
}

#[test]
fn several_errors_in_one_line_all_reported() {
    let e = errs("use sdpp clint * 10.0.0.0/33:70000 junk");
    let cols: Vec<u32> = e.iter().map(|e| e.column).collect();
    assert_eq!(cols, [5, 10, 27, 30, 36]);
}

#[test]
fn every_error_of_the_file_is_reported_in_order() {
    let text = "use sdpp client * *:*\nuse tcp server * 10.0.0.0/33:1\nuse both client * *:70000\n";
    let e = errs(text);
    assert_eq!(e.len(), 3);
    let shown = ParseErrors(e).to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(
        lines,
        [
            "t.conf:1:5: expected sdp, tcp or both, found \"sdpp\"",
            "t.conf:2:27: expected a prefix length in range for IPv4 (0-32), found \"33\"",
            "t.conf:3:21: expected a port in range (0-65535), found \"70000\"",
        ]
    );
}

#[test]
fn good_lines_between_bad_ones_do_not_hide_errors() {
    let e = errs("use sdp server * *:*\nbogus\nuse tcp client * *:*\nuse x\n");
    let lines: Vec<u32> = e.iter().map(|e| e.line).collect();
    assert_eq!(lines, [2, 4]);
}

#[test]
fn log_errors() {
    assert_eq!(
        one_err("log min-level 0"),
        (1, 15, "a log level in range (1-9)".into(), "\"0\"".into())
    );
    assert_eq!(one_err("log min-level 10").3, "\"10\"");
    assert_eq!(one_err("log min-level x").3, "\"x\"");
    assert_eq!(
        one_err("log min-level"),
        (1, 14, "a log level (1-9)".into(), "end of line".into())
    );
    assert_eq!(
        one_err("log destination tty"),
        (1, 17, "stderr, syslog or file".into(), "\"tty\"".into())
    );
    assert_eq!(
        one_err("log destination"),
        (1, 16, "stderr, syslog or file".into(), "end of line".into())
    );
    assert_eq!(
        one_err("log destination file"),
        (1, 21, "a file name after file".into(), "end of line".into())
    );
    assert_eq!(
        one_err("log level 3"),
        (1, 5, "min-level or destination".into(), "\"level\"".into())
    );
}

#[test]
fn columns_count_characters_not_bytes() {
    // "ö" is two bytes in UTF-8; the port still sits at character column 23.
    assert_eq!(
        one_err("use sdp server prög *:70000"),
        (
            1,
            23,
            "a port in range (0-65535)".into(),
            "\"70000\"".into()
        )
    );
}

#[test]
fn non_ascii_garbage_is_an_error_not_a_panic() {
    assert_eq!(one_err("ü").3, "\"ü\"");
    assert_eq!(one_err("use sdp server * \u{fffd}:1").1, 18);
}

#[test]
fn error_display_format() {
    let e = ParseError {
        source: "bad.conf".into(),
        line: 1,
        column: 5,
        expected: "sdp, tcp or both".into(),
        found: "\"sdpp\"".into(),
    };
    assert_eq!(
        e.to_string(),
        "bad.conf:1:5: expected sdp, tcp or both, found \"sdpp\""
    );
}

// ---- decisions ----------------------------------------------------------------------------

#[test]
fn first_match_wins() {
    let p = ok(
        "use tcp client * 10.0.0.0/8:22\nuse sdp client * 10.0.0.0/8:*\nuse both client * *:*\n",
    );
    let v = p.decide("ssh", Role::Client, &sa("10.1.1.1:22"));
    assert_eq!(
        (v.mode, v.rule.unwrap().line, v.why),
        (Mode::Tcp, 1, "rule")
    );
    let v = p.decide("ssh", Role::Client, &sa("10.1.1.1:23"));
    assert_eq!((v.mode, v.rule.unwrap().line), (Mode::Sdp, 2));
    let v = p.decide("ssh", Role::Client, &sa("11.1.1.1:22"));
    assert_eq!((v.mode, v.rule.unwrap().line), (Mode::Both, 3));
}

#[test]
fn brief_example_memcached() {
    let p = ok(
        "use tcp client * 10.0.0.0/8:22\nuse sdp server memcach* *:11211\nuse both client * *:*\n",
    );
    let v = p.decide("memcached", Role::Server, &sa("0.0.0.0:11211"));
    assert_eq!(v.mode, Mode::Sdp);
    assert_eq!(v.rule.unwrap().line, 2);
    assert_eq!(v.rule.unwrap().text, "use sdp server memcach* *:11211");
}

#[test]
fn roles_do_not_mix() {
    let p = ok("use sdp server * *:80\nuse tcp client * *:80\n");
    assert_eq!(
        p.decide("x", Role::Server, &sa("1.2.3.4:80")).mode,
        Mode::Sdp
    );
    assert_eq!(
        p.decide("x", Role::Client, &sa("1.2.3.4:80")).mode,
        Mode::Tcp
    );
}

#[test]
fn no_match_defaults_to_both() {
    let p = ok("use sdp server memcached *:11211\n");
    let v = p.decide("redis-server", Role::Server, &sa("0.0.0.0:6379"));
    assert_eq!(
        (v.mode, v.rule, v.why),
        (Mode::Both, None, "no-match-default")
    );
    // A server rule never decides for a client.
    let v = p.decide("memcached", Role::Client, &sa("1.2.3.4:11211"));
    assert_eq!(v.why, "no-match-default");
}

#[test]
fn file_without_rules_defaults_to_both() {
    let p = ok("# nothing here\nlog min-level 9\n");
    let v = p.decide("x", Role::Client, &sa("1.2.3.4:80"));
    assert_eq!((v.mode, v.why), (Mode::Both, "no-rules-default"));
}

#[test]
fn program_globs() {
    let p = ok("use sdp client t?cp *:*\nuse tcp client db[0-9]* *:*\nuse both client * *:*\n");
    let a = sa("1.2.3.4:5");
    assert_eq!(p.decide("ttcp", Role::Client, &a).mode, Mode::Sdp);
    assert_eq!(p.decide("tcp", Role::Client, &a).mode, Mode::Both);
    assert_eq!(p.decide("db2sysc", Role::Client, &a).mode, Mode::Tcp);
    assert_eq!(p.decide("dbx", Role::Client, &a).mode, Mode::Both);
}

#[test]
fn ipv6_rules_match_ipv6_sockets() {
    let p = ok("use sdp client * [fe80::]/10:*\nuse tcp client * ::1:*\nuse both client * *:*\n");
    assert_eq!(
        p.decide("x", Role::Client, &sa("[fe80::1]:80")).mode,
        Mode::Sdp
    );
    assert_eq!(p.decide("x", Role::Client, &sa("[::1]:80")).mode, Mode::Tcp);
    assert_eq!(
        p.decide("x", Role::Client, &sa("[2001:db8::1]:80")).mode,
        Mode::Both
    );
    assert_eq!(
        p.decide("x", Role::Client, &sa("127.0.0.1:80"))
            .rule
            .unwrap()
            .line,
        3
    );
}

#[test]
fn ipv4_mapped_socket_address_matches_ipv4_rules() {
    let p = ok("use sdp client * 10.0.0.0/8:*\nuse tcp client * *:*\n");
    let v = p.decide("x", Role::Client, &sa("[::ffff:10.2.3.4]:80"));
    assert_eq!((v.mode, v.rule.unwrap().line), (Mode::Sdp, 1));
    assert_eq!(
        p.decide("x", Role::Client, &sa("[::ffff:11.2.3.4]:80"))
            .mode,
        Mode::Tcp
    );
}

#[test]
fn ipv4_rules_do_not_match_plain_ipv6() {
    let p = ok("use sdp server * 0.0.0.0/0:*\n");
    assert_eq!(
        p.decide("x", Role::Server, &sa("[::]:80")).why,
        "no-match-default"
    );
    assert_eq!(p.decide("x", Role::Server, &sa("0.0.0.0:80")).why, "rule");
}

#[test]
fn wildcard_bind_matches_only_wildcard_or_star_rules() {
    let p = ok("use sdp server * 0.0.0.0:80\nuse tcp server * 10.0.0.0/8:80\n");
    assert_eq!(
        p.decide("x", Role::Server, &sa("0.0.0.0:80")).mode,
        Mode::Sdp
    );
    assert_eq!(
        p.decide("x", Role::Server, &sa("10.0.0.1:80")).mode,
        Mode::Tcp
    );
}

#[test]
fn port_range_boundaries_in_decisions() {
    let p = ok("use tcp server * *:22-25\n");
    for (port, hit) in [(21, false), (22, true), (25, true), (26, false)] {
        let v = p.decide("x", Role::Server, &sa(&format!("1.1.1.1:{port}")));
        assert_eq!(v.why == "rule", hit, "port {port}");
    }
}

#[test]
fn fixed_policies() {
    let a = sa("1.2.3.4:80");
    let mode_why = |p: Policy, role| {
        let v = p.decide("x", role, &a);
        (v.mode, v.why)
    };
    assert_eq!(
        mode_why(Policy::default_both(), Role::Client),
        (Mode::Both, "no-file-default")
    );
    assert_eq!(
        mode_why(Policy::always_sdp(), Role::Server),
        (Mode::Sdp, "always-sdp")
    );
    assert_eq!(
        mode_why(Policy::tcp_only(), Role::Server),
        (Mode::Tcp, "fail-open")
    );
    assert!(Policy::default_both().log().is_none());
}

#[test]
fn rule_display_is_canonical() {
    let p =
        ok("use  sdp listen memcach*   10.1.0.0/16:11211-11213\nuse tcp connect * [fe80::1]:*\n");
    assert_eq!(
        p.rules(Role::Server)[0].to_string(),
        "use sdp server memcach* 10.1.0.0/16:11211-11213"
    );
    assert_eq!(
        p.rules(Role::Client)[0].to_string(),
        "use tcp client * [fe80::1]/128:*"
    );
}

// ---- resolve and load ---------------------------------------------------------------------

fn act(file: &str, always_sdp: bool) -> Activation {
    Activation {
        active: true,
        config_file: PathBuf::from(file),
        always_sdp,
    }
}

#[test]
fn resolve_missing_file_is_both_without_error() {
    let r = Policy::resolve(&act("/nope", false), |_| {
        Err(io::Error::from(io::ErrorKind::NotFound))
    });
    assert!(r.error.is_none());
    assert_eq!(r.policy.origin(), Origin::NoFile);
}

#[test]
fn resolve_broken_file_fails_open_with_errors() {
    let r = Policy::resolve(&act("/etc/x.conf", false), |_| {
        Ok("use sdpp client * *:*\n".to_string())
    });
    assert_eq!(r.policy.origin(), Origin::FailOpen);
    let e = r.error.unwrap();
    assert_eq!(
        e.to_string(),
        "/etc/x.conf:1:5: expected sdp, tcp or both, found \"sdpp\""
    );
}

#[test]
fn resolve_unreadable_file_fails_open() {
    let r = Policy::resolve(&act("/etc/x.conf", false), |_| {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    });
    assert_eq!(r.policy.origin(), Origin::FailOpen);
    assert!(matches!(r.error, Some(LoadError::Io { .. })));
}

#[test]
fn resolve_always_sdp_ignores_the_file() {
    let r = Policy::resolve(&act("/etc/x.conf", true), |_| panic!("must not read"));
    assert_eq!(r.policy.origin(), Origin::AlwaysSdp);
}

#[test]
fn resolve_good_file() {
    let r = Policy::resolve(&act("/etc/x.conf", false), |p| {
        assert_eq!(p, Path::new("/etc/x.conf"));
        Ok("use sdp server * *:*\n".to_string())
    });
    assert!(r.error.is_none());
    assert_eq!(r.policy.source_name(), "/etc/x.conf");
    assert_eq!(r.policy.rule_count(), 1);
}

#[test]
fn load_reads_a_file_and_names_it_in_errors() {
    let dir = std::env::temp_dir().join(format!("conf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.conf");
    std::fs::write(&good, "use sdp server * *:*\n").unwrap();
    assert_eq!(Policy::load(&good).unwrap().rule_count(), 1);
    let bad = dir.join("bad.conf");
    std::fs::write(&bad, b"use sdp server * *:\xff\n").unwrap();
    let e = Policy::load(&bad).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}:1:20:", bad.display())),
        "{e}"
    );
    let missing = Policy::load(&dir.join("missing.conf")).unwrap_err();
    assert!(missing.is_not_found());
    std::fs::remove_dir_all(&dir).unwrap();
}
