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

#[cfg(test)]
mod tests {
    use super::*;

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
