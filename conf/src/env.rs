//! Activation: whether libsdp acts in this process, which policy file it reads, and the
//! "always SDP" override. Pure functions of the environment, so the table is testable.

use std::path::PathBuf;

/// The policy file read when `LIBSDP_CONFIG_FILE` is unset or empty.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/libsdp.conf";

/// How the library came into the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadedBy {
    /// The user asked for it: `LD_PRELOAD` names libsdp.
    LdPreload,
    /// Loaded system-wide from /etc/ld.so.preload (or any way other than `LD_PRELOAD`).
    EtcLdSoPreload,
}

/// What the environment decides for this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// False: every call passes straight through, no policy is read.
    pub active: bool,
    /// The policy file to read (it may not exist: then `both` everywhere).
    pub config_file: PathBuf,
    /// `SIMPLE_LIBSDP` or `ALWAYS_USE_SDP` is set: SDP for every stream socket, file ignored.
    pub always_sdp: bool,
}

/// Decides activation from the environment.
///
/// | `LIBSDP_ENABLE` | loaded by `LD_PRELOAD` | loaded from /etc/ld.so.preload |
/// |---|---|---|
/// | unset, empty or any other value | active | dormant |
/// | `1` | active | active |
/// | `0` | dormant | dormant |
///
/// `LIBSDP_CONFIG_FILE` (non-empty) replaces /etc/libsdp.conf. `SIMPLE_LIBSDP` or
/// `ALWAYS_USE_SDP` set to a non-empty value forces SDP (the original tested only for presence;
/// an empty value is treated as unset here so that `SIMPLE_LIBSDP= prog` can switch it off).
pub fn activation(get_env: impl Fn(&str) -> Option<String>, loaded_by: LoadedBy) -> Activation {
    let by_default = loaded_by == LoadedBy::LdPreload;
    let active = match get_env("LIBSDP_ENABLE").as_deref().map(str::trim) {
        Some("1") => true,
        Some("0") => false,
        _ => by_default,
    };
    let config_file = get_env("LIBSDP_CONFIG_FILE")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE), PathBuf::from);
    let set = |name: &str| get_env(name).is_some_and(|v| !v.is_empty());
    let always_sdp = set("SIMPLE_LIBSDP") || set("ALWAYS_USE_SDP");
    Activation {
        active,
        config_file,
        always_sdp,
    }
}

/// `LdPreload` iff `LD_PRELOAD` names a `libsdp*.so` (possibly versioned, `libsdp.so.1`).
/// ld.so separates entries by blanks or colons.
pub fn loaded_by(ld_preload_env: Option<&str>) -> LoadedBy {
    let names_libsdp = ld_preload_env.is_some_and(|v| {
        v.split([' ', ':', '\t', '\n'])
            .filter(|e| !e.is_empty())
            .any(|entry| {
                let base = entry.rsplit('/').next().unwrap_or(entry);
                base.starts_with("libsdp") && (base.ends_with(".so") || base.contains(".so."))
            })
    });
    if names_libsdp {
        LoadedBy::LdPreload
    } else {
        LoadedBy::EtcLdSoPreload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn enable_table() {
        use LoadedBy::*;
        let cases: &[(Option<&str>, LoadedBy, bool)] = &[
            (None, LdPreload, true),
            (None, EtcLdSoPreload, false),
            (Some("1"), LdPreload, true),
            (Some("1"), EtcLdSoPreload, true),
            (Some("0"), LdPreload, false),
            (Some("0"), EtcLdSoPreload, false),
            (Some(""), LdPreload, true),
            (Some(""), EtcLdSoPreload, false),
            (Some("yes"), EtcLdSoPreload, false),
            (Some(" 1 "), EtcLdSoPreload, true),
        ];
        for &(value, by, want) in cases {
            let vars: Vec<(&str, &str)> = value.map(|v| ("LIBSDP_ENABLE", v)).into_iter().collect();
            let a = activation(env(&vars), by);
            assert_eq!(a.active, want, "LIBSDP_ENABLE={value:?} loaded by {by:?}");
        }
    }

    #[test]
    fn config_file_default_and_override() {
        let a = activation(env(&[]), LoadedBy::LdPreload);
        assert_eq!(a.config_file, PathBuf::from("/etc/libsdp.conf"));
        let a = activation(
            env(&[("LIBSDP_CONFIG_FILE", "/tmp/x.conf")]),
            LoadedBy::LdPreload,
        );
        assert_eq!(a.config_file, PathBuf::from("/tmp/x.conf"));
        let a = activation(env(&[("LIBSDP_CONFIG_FILE", "")]), LoadedBy::LdPreload);
        assert_eq!(a.config_file, PathBuf::from("/etc/libsdp.conf"));
    }

    #[test]
    fn always_sdp_from_either_variable_when_non_empty() {
        assert!(!activation(env(&[]), LoadedBy::LdPreload).always_sdp);
        assert!(activation(env(&[("SIMPLE_LIBSDP", "1")]), LoadedBy::LdPreload).always_sdp);
        assert!(activation(env(&[("ALWAYS_USE_SDP", "yes")]), LoadedBy::LdPreload).always_sdp);
        assert!(!activation(env(&[("SIMPLE_LIBSDP", "")]), LoadedBy::LdPreload).always_sdp);
    }

    #[test]
    fn loaded_by_recognises_libsdp_entries() {
        assert_eq!(loaded_by(None), LoadedBy::EtcLdSoPreload);
        assert_eq!(loaded_by(Some("")), LoadedBy::EtcLdSoPreload);
        assert_eq!(loaded_by(Some("/usr/lib/libsdp.so")), LoadedBy::LdPreload);
        assert_eq!(loaded_by(Some("libsdp.so")), LoadedBy::LdPreload);
        assert_eq!(loaded_by(Some("/opt/libsdp.so.1")), LoadedBy::LdPreload);
        assert_eq!(
            loaded_by(Some("/a/libfoo.so:/b/libsdp-debug.so")),
            LoadedBy::LdPreload
        );
        assert_eq!(
            loaded_by(Some("/a/libfoo.so /b/libsdp.so")),
            LoadedBy::LdPreload
        );
        assert_eq!(loaded_by(Some("/a/libfoo.so")), LoadedBy::EtcLdSoPreload);
        assert_eq!(
            loaded_by(Some("/libsdp/libfoo.so")),
            LoadedBy::EtcLdSoPreload
        );
        assert_eq!(loaded_by(Some("/a/libsdp.a")), LoadedBy::EtcLdSoPreload);
    }
}
