//! `key=value` formatting and quoting of log fields (see "Fields" in the
//! [`crate::logging`] module doc). A leaf module: it depends on nothing else
//! in the crate, so [`crate::audit`] and the logger can both use it.

use std::borrow::Cow;

use log::Level;

/// The stable field names used in log lines.
pub const KEYS: &[&str] = &[
    "op", "volume", "server", "ip", "port", "key", "version", "user", "result", "error", "path",
    "reason", "msg",
];

/// Target used by [`crate::audit::record`]; routed to the audit facility.
pub const AUDIT_TARGET: &str = "kmfs::audit";

/// Quotes a value for a `key=value` field (see the module doc).
pub fn quote_value(v: &str) -> Cow<'_, str> {
    let plain = !v.is_empty()
        && v.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '"' | '=' | '\\'));
    if plain {
        return Cow::Borrowed(v);
    }
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if c.is_control() => s.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => s.push(c),
        }
    }
    s.push('"');
    Cow::Owned(s)
}

/// Formats `key=value` pairs separated by spaces, values quoted with
/// [`quote_value`]. Keys are reduced to `[a-z0-9_]`.
pub fn kv(pairs: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (k, v) in pairs {
        if !s.is_empty() {
            s.push(' ');
        }
        s.extend(k.chars().map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        }));
        s.push('=');
        s.push_str(&quote_value(v));
    }
    s
}

/// Whether a message already is `key=value ...` (starts with `word=`).
fn looks_like_kv(msg: &str) -> bool {
    match msg.split_once('=') {
        Some((k, _)) => {
            !k.is_empty()
                && k.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        }
        None => false,
    }
}

/// The body of a line (after `time=`) for one `log` record.
pub(super) fn format_body(level: Level, volume: &str, target: &str, msg: &str) -> String {
    let mut body = format!("level={} volume={}", level, quote_value(volume));
    if !target.starts_with("kmfs") {
        body.push_str(" src=");
        body.push_str(&quote_value(target));
    }
    body.push(' ');
    if looks_like_kv(msg) {
        body.push_str(msg);
    } else {
        body.push_str("msg=");
        body.push_str(&quote_value(msg));
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted() {
        assert_eq!(quote_value("km1"), "km1");
        assert_eq!(quote_value(""), "\"\"");
        assert_eq!(quote_value("a b"), "\"a b\"");
        assert_eq!(quote_value("x=y"), "\"x=y\"");
        assert_eq!(quote_value("say \"hi\"\\"), "\"say \\\"hi\\\"\\\\\"");
        assert_eq!(
            quote_value("l1\nserial=9 hash=00"),
            "\"l1\\nserial=9 hash=00\""
        );
        assert_eq!(
            kv(&[("op", "unwrap"), ("Error", "timed out"), ("b@d", "1")]),
            "op=unwrap error=\"timed out\" b_d=1"
        );
    }

    #[test]
    fn body_formatting() {
        assert_eq!(
            format_body(Level::Info, "vol 1", "kmfs::fs", "op=mount result=ok"),
            "level=INFO volume=\"vol 1\" op=mount result=ok"
        );
        assert_eq!(
            format_body(Level::Warn, "v", "kmfs", "mount ready"),
            "level=WARN volume=v msg=\"mount ready\""
        );
        assert_eq!(
            format_body(Level::Info, "v", "rustls::conn", "x=1"),
            "level=INFO volume=v src=rustls::conn x=1"
        );
        assert_eq!(
            format_body(Level::Info, "v", "kmfs", "Hello=1"),
            "level=INFO volume=v msg=\"Hello=1\""
        );
    }
}
