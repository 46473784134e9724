//! Program-name globs with the semantics of `fnmatch(pattern, name, 0)`, which is what the
//! original libsdp called on `program_invocation_short_name`.
//!
//! - `*` matches any run of characters, including none (with flags 0 it also matches `/` and a
//!   leading `.`);
//! - `?` matches exactly one character;
//! - `[...]` matches one character from a set: ranges `a-z`, negation with a leading `!` or `^`,
//!   a `]` first in the set is literal, POSIX classes such as `[:digit:]`;
//! - `\x` matches `x` literally;
//! - a `[` with no closing `]` is an ordinary character, as in glibc.

/// Returns true when `name` matches the glob `pattern`.
/// Allocation-free for ASCII (the usual case: it runs inside `connect` and `listen` hooks).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    if pattern.is_ascii() && name.is_ascii() {
        return match_from(pattern.as_bytes(), name.as_bytes());
    }
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    match_from(&pattern, &name)
}

/// A unit of text the matcher works on: a byte of ASCII text or a char.
trait Sym: Copy {
    fn ch(self) -> char;
}

impl Sym for u8 {
    fn ch(self) -> char {
        char::from(self)
    }
}

impl Sym for char {
    fn ch(self) -> char {
        self
    }
}

/// Iterative matcher: on a mismatch, backtrack to the most recent `*` and let it swallow one
/// more character. One level of backtracking suffices for `*` globs, so this is linear-ish and
/// never recurses (a hostile pattern cannot blow the stack of the host program).
fn match_from<T: Sym>(pattern: &[T], name: &[T]) -> bool {
    let mut p = 0;
    let mut n = 0;
    // (pattern index after the star, name index the star currently stops at)
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        let step = if p < pattern.len() {
            match pattern[p].ch() {
                '*' => {
                    star = Some((p + 1, n));
                    p += 1;
                    continue;
                }
                '?' => Some(1),
                '[' => match bracket(&pattern[p..], name[n].ch()) {
                    Some((matched, len)) => matched.then_some(len),
                    // Unterminated set: a literal '['.
                    None => (name[n].ch() == '[').then_some(1),
                },
                '\\' if p + 1 < pattern.len() => (pattern[p + 1].ch() == name[n].ch()).then_some(2),
                c => (c == name[n].ch()).then_some(1),
            }
        } else {
            None
        };
        match step {
            Some(len) => {
                p += len;
                n += 1;
            }
            None => match star {
                Some((after_star, stopped_at)) => {
                    p = after_star;
                    n = stopped_at + 1;
                    star = Some((after_star, stopped_at + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| c.ch() == '*')
}

/// Matches one character against the set starting at `pattern[0] == '['`.
/// Returns (matched, pattern length of the set), or None when the set is not terminated.
fn bracket<T: Sym>(pattern: &[T], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pattern.get(i).map(|c| c.ch()), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let ch = pattern.get(i)?.ch();
        if ch == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if ch == '['
            && pattern.get(i + 1).map(|c| c.ch()) == Some(':')
            && let Some(end) = find_class_end(pattern, i + 2)
        {
            matched |= class_matches(&pattern[i + 2..end], c);
            i = end + 2;
            continue;
        }
        let (lo, next) = if ch == '\\' && i + 1 < pattern.len() {
            (pattern[i + 1].ch(), i + 2)
        } else {
            (ch, i + 1)
        };
        if pattern.get(next).map(|c| c.ch()) == Some('-')
            && pattern.get(next + 1).is_some_and(|e| e.ch() != ']')
        {
            let (hi, after) = if pattern[next + 1].ch() == '\\' && next + 2 < pattern.len() {
                (pattern[next + 2].ch(), next + 3)
            } else {
                (pattern[next + 1].ch(), next + 2)
            };
            matched |= lo <= c && c <= hi;
            i = after;
        } else {
            matched |= lo == c;
            i = next;
        }
    }
}

/// Index of the ':' of the closing ":]" of a class name starting at `from`.
fn find_class_end<T: Sym>(pattern: &[T], from: usize) -> Option<usize> {
    let mut j = from;
    while j + 1 < pattern.len() {
        if pattern[j].ch() == ':' && pattern[j + 1].ch() == ']' {
            return Some(j);
        }
        if !pattern[j].ch().is_ascii_alphabetic() {
            return None;
        }
        j += 1;
    }
    None
}

fn class_matches<T: Sym>(class: &[T], c: char) -> bool {
    // Class names are short ASCII words; compare without allocating.
    let mut buf = [0u8; 8];
    if class.len() > buf.len() {
        return false;
    }
    for (b, s) in buf.iter_mut().zip(class) {
        *b = u8::try_from(s.ch()).unwrap_or(0);
    }
    match &buf[..class.len()] {
        b"alpha" => c.is_ascii_alphabetic(),
        b"digit" => c.is_ascii_digit(),
        b"alnum" => c.is_ascii_alphanumeric(),
        b"upper" => c.is_ascii_uppercase(),
        b"lower" => c.is_ascii_lowercase(),
        b"space" => c.is_ascii_whitespace(),
        b"punct" => c.is_ascii_punctuation(),
        b"xdigit" => c.is_ascii_hexdigit(),
        b"blank" => c == ' ' || c == '\t',
        b"cntrl" => c.is_ascii_control(),
        b"print" => c.is_ascii_graphic() || c == ' ',
        b"graph" => c.is_ascii_graphic(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn star_matches_any_run() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "memcached"));
        assert!(glob_match("memcach*", "memcached"));
        assert!(glob_match("memcach*", "memcach"));
        assert!(!glob_match("memcach*", "memcac"));
        assert!(glob_match("*cached", "memcached"));
        assert!(glob_match("m*c*d", "memcached"));
        assert!(!glob_match("m*c*x", "memcached"));
        assert!(glob_match("**", "a"));
    }

    #[test]
    fn star_matches_slash_and_dot_like_fnmatch_flags_zero() {
        assert!(glob_match("*", ".hidden"));
        assert!(glob_match("a*b", "a/b"));
    }

    #[test]
    fn question_mark_matches_one_char() {
        assert!(glob_match("t?cp", "ttcp"));
        assert!(!glob_match("t?cp", "tcp"));
        assert!(!glob_match("?", ""));
    }

    #[test]
    fn literal_must_match_whole_name() {
        assert!(glob_match("redis-server", "redis-server"));
        assert!(!glob_match("redis", "redis-server"));
        assert!(!glob_match("redis-server", "redis"));
    }

    #[test]
    fn brackets_sets_ranges_and_negation() {
        assert!(glob_match("db[0-9]", "db2"));
        assert!(!glob_match("db[0-9]", "dbx"));
        assert!(glob_match("db[!0-9]", "dbx"));
        assert!(glob_match("db[^0-9]", "dbx"));
        assert!(!glob_match("db[!0-9]", "db7"));
        assert!(glob_match("[]a]", "]"));
        assert!(glob_match("[a-]", "-"));
        assert!(glob_match("x[[:digit:]]y", "x5y"));
        assert!(!glob_match("x[[:digit:]]y", "xay"));
    }

    #[test]
    fn unterminated_bracket_is_literal() {
        assert!(glob_match("a[b", "a[b"));
        assert!(!glob_match("a[b", "ab"));
    }

    #[test]
    fn backslash_escapes() {
        assert!(glob_match(r"a\*", "a*"));
        assert!(!glob_match(r"a\*", "ab"));
        assert!(glob_match(r"a\?", "a?"));
    }

    #[test]
    fn non_ascii_names() {
        assert!(glob_match("pr?g", "prög"));
        assert!(glob_match("*ö*", "prög"));
    }

    proptest::proptest! {
        #[test]
        fn byte_and_char_matchers_agree(p in "[a-c*?\\[\\]!^:-]{0,10}", n in "[a-c\\[\\]:-]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let nc: Vec<char> = n.chars().collect();
            proptest::prop_assert_eq!(
                super::match_from(p.as_bytes(), n.as_bytes()),
                super::match_from(&pc, &nc)
            );
        }

        #[test]
        fn a_name_without_metacharacters_matches_only_itself(a in "[a-z0-9_.-]{0,12}", b in "[a-z0-9_.-]{0,12}") {
            proptest::prop_assert_eq!(glob_match(&a, &b), a == b);
            proptest::prop_assert!(glob_match("*", &b));
        }
    }
}
