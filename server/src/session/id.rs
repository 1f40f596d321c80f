//! Session ids come from clients: they become a key of the bucket (and so
//! part of a NATS subject), so only a small safe alphabet is accepted.

use crate::error::ServerError;

/// Bytes of a session id at most.
pub const MAX_LEN: usize = 128;

/// Checks a session id from `field`: 1 to [`MAX_LEN`] characters of
/// `A-Z a-z 0-9 - _ =` and `.` (not first, not last, never two in a row, as
/// a dot separates subject tokens).
pub fn check(field: &'static str, id: &str) -> Result<(), ServerError> {
    let bad = |why: String| Err(ServerError::invalid(field, why));
    if id.is_empty() {
        return bad("must not be empty".into());
    }
    if id.len() > MAX_LEN {
        return bad(format!("at most {MAX_LEN} bytes, got {}", id.len()));
    }
    if let Some((i, c)) = id
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=' | '.')))
    {
        return bad(format!(
            "may hold only letters, digits and - _ = . ({:?} at byte {i} is not allowed)",
            c
        ));
    }
    if id.starts_with('.') || id.ends_with('.') || id.contains("..") {
        return bad("a '.' may not start or end it, nor follow another '.'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuids_and_dotted_names() {
        for id in [
            "0b0f4c1e-3d52-4e8a-9d1b-6f0c2a7b9e11",
            "agent_7.thread=3",
            "a",
            &"x".repeat(MAX_LEN),
        ] {
            check("session_id", id).unwrap();
        }
    }

    #[test]
    fn refuses_what_could_change_the_subject() {
        for id in [
            "",
            "a b",
            "a*",
            "a>",
            "a.b.",
            ".a",
            "a..b",
            "a/b",
            "a\nb",
            "é",
            "a\u{0}",
            &"x".repeat(MAX_LEN + 1),
        ] {
            let err = check("session_id", id).unwrap_err();
            assert!(err.to_string().starts_with("session_id: "), "{id:?}: {err}");
        }
    }
}
