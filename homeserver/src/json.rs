//! Limits on the shape of JSON from outside, checked once at the door.
//!
//! What Hearth accepts it must be able to store, sign and serve back to every client. JSON
//! parsers have recursion limits (serde_json's is 128, and ruma's push rules parse whole events
//! with it), so a body nested deeper than [`MAX_JSON_DEPTH`] is refused before anything reads
//! it, instead of being stored and breaking every reader of its room later.

/// Deepest nesting a JSON request body may have. An event's content is at most this deep, and
/// the envelopes it is served in (event, timeline, room, response) stay within every parser's
/// limit.
pub const MAX_JSON_DEPTH: usize = 64;

/// How deeply `json` nests arrays and objects (0 for a scalar), counted without recursion.
/// Brackets inside strings are not counted. The text is assumed to be JSON already checked to
/// parse; on anything else the answer is only an upper bound.
pub fn depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// serde_json refuses to parse nesting this deep into a recursive structure.
const SERDE_RECURSION_LIMIT: usize = 128;

/// Whether serde_json (and so ruma, where it parses whole events) can parse `json` into a
/// recursive structure. Everything stored since the door checked depth can; some events stored
/// before cannot.
pub fn parses_with_serde(json: &[u8]) -> bool {
    depth(json) < SERDE_RECURSION_LIMIT
}

/// Whether JSON text nests no deeper than [`MAX_JSON_DEPTH`].
pub fn within_depth(json: &[u8]) -> bool {
    depth(json) <= MAX_JSON_DEPTH
}

/// Arbitrary JSON for the property tests (proptest): values nested past every limit, strings
/// full of NULs, quotes, backslashes and brackets, written out with random escapes and spacing.
/// `PROPTEST_CASES` sets how many cases each property runs (256 by default).
#[cfg(test)]
pub(crate) mod arbitrary {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    /// A string mixing any characters with those that trip JSON handling up.
    pub fn tricky_string() -> impl Strategy<Value = String> {
        let char = prop_oneof![
            4 => any::<char>(),
            1 => Just('\0'),
            1 => Just('"'),
            1 => Just('\\'),
            1 => prop::sample::select(vec!['[', ']', '{', '}', ',', ':']),
            1 => prop::sample::select(vec!['\n', '\u{1}', '/', 'u', '\u{ffff}', '\u{10ffff}']),
        ];
        prop::collection::vec(char, 0..10).prop_map(|chars| chars.into_iter().collect())
    }

    pub fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
            tricky_string().prop_map(Value::String),
        ]
    }

    /// Values a few levels deep and a few wide.
    pub fn value() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(5, 40, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((tricky_string(), inner), 0..5)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    /// A [`value`] wrapped in up to `max` arrays and objects, to reach past
    /// [`super::MAX_JSON_DEPTH`] and serde_json's recursion limit.
    pub fn deep_value(max: usize) -> impl Strategy<Value = Value> {
        (value(), prop::collection::vec((any::<bool>(), tricky_string()), 0..max)).prop_map(
            |(mut value, wrappers)| {
                for (array, key) in wrappers {
                    value = match array {
                        true => Value::Array(vec![value]),
                        false => Value::Object(Map::from_iter([(key, value)])),
                    };
                }
                value
            },
        )
    }

    /// How a value is written: every string character escaped as `\uXXXX`, or only what must be;
    /// with whitespace between tokens, or none.
    #[derive(Debug, Clone, Copy)]
    pub struct Style {
        pub escape_all: bool,
        pub spaced: bool,
    }

    pub fn style() -> impl Strategy<Value = Style> {
        (any::<bool>(), any::<bool>()).prop_map(|(escape_all, spaced)| Style { escape_all, spaced })
    }

    /// `value` as JSON text in `style`.
    pub fn write(value: &Value, style: Style) -> String {
        let mut out = String::new();
        write_into(&mut out, value, style);
        out
    }

    fn write_string(out: &mut String, text: &str, style: Style) {
        if !style.escape_all {
            out.push_str(&Value::String(text.to_owned()).to_string());
            return;
        }
        out.push('"');
        for unit in text.encode_utf16() {
            out.push_str(&format!("\\u{unit:04x}"));
        }
        out.push('"');
    }

    fn write_into(out: &mut String, value: &Value, style: Style) {
        let space = if style.spaced { " \n\t" } else { "" };
        match value {
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(space);
                    write_into(out, item, style);
                }
                out.push_str(space);
                out.push(']');
            }
            Value::Object(map) => {
                out.push('{');
                for (i, (key, item)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(space);
                    write_string(out, key, style);
                    out.push_str(space);
                    out.push(':');
                    write_into(out, item, style);
                }
                out.push_str(space);
                out.push('}');
            }
            Value::String(text) => write_string(out, text, style),
            scalar => out.push_str(&scalar.to_string()),
        }
    }

    /// How deeply `value` nests arrays and objects (0 for a scalar): the reference for
    /// [`super::depth`].
    pub fn depth_of(value: &Value) -> usize {
        match value {
            Value::Array(items) => 1 + items.iter().map(depth_of).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(depth_of).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// Whether a string or an object key in `value` holds a NUL.
    pub fn has_nul(value: &Value) -> bool {
        match value {
            Value::String(text) => text.contains('\0'),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(map) => map.iter().any(|(key, item)| key.contains('\0') || has_nul(item)),
            _ => false,
        }
    }

    /// `text` with one byte replaced, inserted or removed at `at` (modulo its length).
    pub fn mutate(text: &[u8], at: usize, byte: u8, how: u8) -> Vec<u8> {
        let mut bytes = text.to_vec();
        if bytes.is_empty() {
            return vec![byte];
        }
        let at = at % bytes.len();
        match how % 3 {
            0 => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            _ => {
                bytes.remove(at);
            }
        }
        bytes
    }

    /// A byte JSON gives meaning to, or any byte.
    pub fn json_byte() -> impl Strategy<Value = u8> {
        prop_oneof![any::<u8>(), prop::sample::select(b"[]{}\",:\\u0 \x00\xff".to_vec()),]
    }

    /// The configuration of every property test: proptest's own, whose case count
    /// `PROPTEST_CASES` sets.
    pub fn config() -> ProptestConfig {
        ProptestConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{arbitrary::*, *};

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn depth_agrees_with_a_reference_depth_of_the_parsed_value(value in deep_value(150), style in style()) {
            let text = write(&value, style);
            prop_assert_eq!(depth(text.as_bytes()), depth_of(&value), "{}", text);
            // serde_json parses what is within its recursion limit, and finds the same value.
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(parsed) => prop_assert_eq!(depth(text.as_bytes()), depth_of(&parsed)),
                Err(e) => prop_assert!(depth_of(&value) >= SERDE_RECURSION_LIMIT, "serde_json refused {text}: {e}"),
            }
        }

        #[test]
        fn depth_never_panics_and_bounds_the_brackets(bytes in prop::collection::vec(json_byte(), 0..200)) {
            let opening = bytes.iter().filter(|b| matches!(b, b'[' | b'{')).count();
            prop_assert!(depth(&bytes) <= opening);
        }
    }

    #[test]
    fn depth_counts_nesting_and_ignores_brackets_in_strings() {
        assert_eq!(depth(b"1"), 0);
        assert_eq!(depth(b"{}"), 1);
        assert_eq!(depth(br#"{"a":[1,{"b":[]}]}"#), 4);
        assert_eq!(depth(br#"{"a":"[[[[{{{{"}"#), 1);
        assert_eq!(depth(br#"{"a":"\"[[[["}"#), 1);
        assert_eq!(depth(br#"["\\",[["\\\"]"]]]"#), 3);
        let deep = format!("{}{}", "[".repeat(126), "]".repeat(126));
        assert_eq!(depth(deep.as_bytes()), 126);
        assert!(!within_depth(deep.as_bytes()));
        let edge = format!("{}{}", "[".repeat(MAX_JSON_DEPTH), "]".repeat(MAX_JSON_DEPTH));
        assert!(within_depth(edge.as_bytes()));
    }
}
