//! `sdp explain [--conf FILE] PROG server|client ADDR:PORT`: one decision and its reason.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use conf::{LoadedBy, Policy, Role, Verdict};

/// `server`/`listen` or `client`/`connect`, as in the policy file.
pub fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "server" | "listen" => Ok(Role::Server),
        "client" | "connect" => Ok(Role::Client),
        _ => Err("expected server, listen, client or connect".to_string()),
    }
}

/// `10.0.0.1:80` or `[::1]:80`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| "expected ADDR:PORT, an IPv4 address or a bracketed IPv6 address and a port: 10.0.0.1:80 or [::1]:80".to_string())
}

pub fn explain(conf_file: Option<&Path>, program: &str, role: Role, addr: &SocketAddr) -> ExitCode {
    // The library matches `program_invocation_short_name`: the name without its directory.
    let short = program
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(program);

    let (policy, note, config_file) = match conf_file {
        Some(file) => match Policy::load(file) {
            Ok(p) => (p, None, file.to_path_buf()),
            Err(e) => return report_broken(&e),
        },
        None => {
            // The same resolution as the library's, so the answer is the one a process would get.
            let act = conf::activation(|k| std::env::var(k).ok(), LoadedBy::LdPreload);
            let resolved = Policy::resolve(&act, |p| {
                std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned())
            });
            if let Some(e) = resolved.error {
                return report_broken(&e);
            }
            let note = (!act.active)
                .then_some("note: LIBSDP_ENABLE=0 is set: libsdp would leave every socket alone");
            (resolved.policy, note, act.config_file)
        }
    };

    let v = policy.decide(short, role, addr);
    println!(
        "{short} {role} {addr} -> {} ({})",
        v.mode,
        reason(&policy, &v, role, &config_file)
    );
    if let Some(n) = note {
        println!("{n}");
    }
    ExitCode::SUCCESS
}

fn reason(policy: &Policy, v: &Verdict<'_>, role: Role, config_file: &Path) -> String {
    let src = policy.source_name();
    match (v.rule, v.why) {
        (Some(rule), _) => format!("rule at {src}:{}: {}", rule.line, rule.text),
        (None, "no-file-default") => {
            format!("default: no policy file {}", config_file.display())
        }
        (None, "no-match-default") => {
            format!("default: no {role} rule in {src} matches; unmatched sockets get both")
        }
        (None, "no-rules-default") => format!("default: {src} has no use rules"),
        (None, "always-sdp") => {
            "SIMPLE_LIBSDP or ALWAYS_USE_SDP is set: SDP for every socket".to_string()
        }
        (None, "fail-open") => format!("{src} is broken: every socket stays TCP"),
        (None, other) => format!("default: {other}"),
    }
}

fn report_broken(e: &conf::LoadError) -> ExitCode {
    match e {
        conf::LoadError::Parse(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!(
                "sdp explain: the policy file is broken; the library keeps every socket on TCP"
            );
        }
        conf::LoadError::Io { .. } => eprintln!("sdp explain: {e}"),
    }
    ExitCode::FAILURE
}
