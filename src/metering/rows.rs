//! The text of the usage rows charge.lua appends to a stream (the `rows`
//! field: one line per event, tab-separated, escaped like Postgres `COPY`
//! text) and of its `ok` answer. The gateway writes the fields it cannot
//! vouch for; the ledger's flusher reads them back (`ledger::event`).

/// Escapes `value` as a field of a row (and of `COPY` text): backslash,
/// tab, newline and carriage return. What the gateway passes to
/// charge.lua for the text it cannot vouch for (user, request id, actor).
pub fn escape_field(out: &mut Vec<u8>, value: &str) {
    // Without an early exit the test compiles to a vector loop: most
    // fields (ids, plans, dates) need no escape, and a byte-at-a-time
    // `any` took 1.7 times the instructions (callgrind, docs/BENCHMARKS.md).
    // Other control bytes send it down the exact path, which copies them.
    let maybe = value
        .bytes()
        .fold(false, |seen, b| seen | (b < 0x20) | (b == b'\\'));
    if !maybe {
        out.extend_from_slice(value.as_bytes());
        return;
    }
    for &b in value.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// A decimal integer, optionally negative, as Lua's `%d` writes it: the
/// numbers of a row, and those of charge.lua's answer.
pub fn integer(digits: &[u8]) -> Option<i64> {
    let (negative, digits) = match digits.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if negative { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::escape_field;

    fn escaped(value: &str) -> String {
        let mut out = Vec::new();
        escape_field(&mut out, value);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn only_backslash_tab_newline_and_return_are_escaped() {
        assert_eq!(escaped("user-42"), "user-42");
        assert_eq!(escaped("a\\b\tc\nd\re"), "a\\\\b\\tc\\nd\\re");
        // Other control bytes take the careful path and come out as they are.
        assert_eq!(escaped("a\u{1}b\u{1f}"), "a\u{1}b\u{1f}");
        assert_eq!(escaped("é\t"), "é\\t");
        // Longer than a vector's width, the escape at the very end.
        let long = format!("{}\\", "x".repeat(100));
        assert_eq!(escaped(&long), format!("{}\\\\", "x".repeat(100)));
    }
}
