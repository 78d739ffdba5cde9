//! Text from workers made safe to print: what a worker sends (`STATUS=`,
//! `ERRNO=`, `X_PROCMAN_ERROR`, `X_PROCMAN_RECYCLE`, tracebacks, a
//! zygote's warnings) reaches the text log, `procman status` and `procman
//! reload`, and must neither start a line of its own (which could pass for
//! one of procman's) nor drive the operator's terminal.
//!
//! [`text`] is for the text log and the control client: every control
//! character (C0, DEL, C1), the Unicode line and paragraph separators and
//! the bidirectional overrides (which reorder what a terminal shows) become
//! visible escapes: `\n`, `\r`, `\t`, `\x1b`, `\u{9b}`. A backslash is kept
//! as it is (paths and regexes stay readable): an escape in the output may
//! have been typed by the worker, but it is plain text either way.
//!
//! [`json`] is for a serialized JSON document: serde_json already escapes
//! C0 controls and quotes; this also writes DEL, C1 and the others above
//! as `\u00XX` escapes. Outside strings a JSON text holds only ASCII
//! punctuation, digits, letters and spaces, so every such character is
//! inside a string, where the escape means the same character: the
//! document parses to the same value.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` is shown escaped.
fn hidden(c: char) -> bool {
    c.is_control() // C0, DEL and C1
        || matches!(c, '\u{2028}' | '\u{2029}' // line, paragraph separators
            | '\u{200e}' | '\u{200f}' | '\u{061c}' // direction marks
            | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') // bidi
}

/// `s` with every hidden character written as a visible escape (see the
/// module notes); borrowed when there is none.
pub fn text(s: &str) -> Cow<'_, str> {
    if !s.chars().any(hidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if hidden(c) && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if hidden(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A serialized JSON document with the hidden characters serde_json leaves
/// as they are written as `\u` escapes (see the module notes).
pub fn json(doc: String) -> String {
    if !doc.chars().any(hidden) {
        return doc;
    }
    let mut out = String::with_capacity(doc.len() + 8);
    for c in doc.chars() {
        if hidden(c) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn controls_become_visible_escapes() {
        assert_eq!(text("plain [x] \\n"), "plain [x] \\n");
        assert!(matches!(text("plain"), Cow::Borrowed(_)));
        assert_eq!(
            text("a\nb\r\tc\x1b[2Jd\x7f\u{9b}31m\u{202e}e\u{2028}"),
            "a\\nb\\r\\tc\\x1b[2Jd\\x7f\\u{9b}31m\\u{202e}e\\u{2028}"
        );
        assert_eq!(text("naïve café ✓"), "naïve café ✓");
    }

    #[test]
    fn json_escapes_keep_the_value() {
        let value = serde_json::json!({"m": "a\u{1b}b\u{7f}c\u{9b}d\u{202e}e\n"});
        let doc = json(value.to_string());
        assert!(doc.is_ascii(), "{doc}");
        assert!(!doc.contains('\u{1b}'));
        let back: serde_json::Value = serde_json::from_str(&doc).expect("still JSON");
        assert_eq!(back, value);
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_cases(256))]

        #[test]
        fn escaped_text_is_one_line_of_nothing_hidden(s in any::<String>()) {
            let out = text(&s);
            prop_assert!(!out.chars().any(hidden));
        }

        #[test]
        fn escaped_json_parses_to_the_same_value(s in any::<String>()) {
            let value = serde_json::json!({"message": s, "n": 1});
            let doc = json(value.to_string());
            prop_assert!(!doc.chars().any(hidden));
            let back: serde_json::Value = serde_json::from_str(&doc).expect("JSON");
            prop_assert_eq!(back, value);
        }
    }
}
