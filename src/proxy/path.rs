//! The path check every request passes before routing: a request can only
//! reach the module whose price it pays.

use crate::error::ApiError;

/// Refuses `.` and `..` segments (raw or percent-encoded, even twice) and
/// encoded `/` or `\`: an upstream that normalises them would serve
/// another module than the one whose price was paid.
pub fn check_path(path: &str) -> Result<(), ApiError> {
    // The common path has none of these bytes: nothing to decode.
    if !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return Ok(());
    }
    for segment in path.split('/') {
        // Decoding up to three times catches %252e (an upstream that
        // decodes twice) as well as %2e.
        let mut decoded = std::borrow::Cow::Borrowed(segment);
        for round in 0..=3 {
            if decoded == "." || decoded == ".." || decoded.contains(['/', '\\']) {
                return Err(ApiError::BadPath);
            }
            if round == 3 || !decoded.contains('%') {
                break;
            }
            decoded = std::borrow::Cow::Owned(percent_decode(&decoded));
        }
    }
    Ok(())
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_and_encoded_slashes_are_bad_paths() {
        for bad in [
            "/rag/../legal/draft",
            "/rag/./x",
            "/rag/%2e%2e/legal/draft",
            "/rag/%2E./legal",
            "/rag/.%2e/legal",
            "/rag/..%2flegal/draft",
            "/rag/a%2Fb",
            "/rag/a%5cb",
            "/rag/a%5Cb",
            "/rag/a\\b",
            "/rag/%252e%252e/legal",
            "/rag/..",
            "/rag/%2e",
        ] {
            assert_eq!(check_path(bad), Err(ApiError::BadPath), "{bad}");
        }
        for good in [
            "/rag/search",
            "/rag/",
            "/rag",
            "/rag/file.txt",
            "/rag/...",
            "/rag/a..b",
            "/rag/q%20x",
            "/rag/%41",
            "/rag/100%",
        ] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
    }
}
