//! JSON Lines input: one object per line, read with errors that name the line and the
//! field (`line 3.propensity`), shared by every JSONL import.

use serde::de::DeserializeOwned;

/// What is wrong with one line: the field (`line N` or `line N.path`) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub field: String,
    pub message: String,
}

/// The name of `path` within line `line_no` (`line 3`, `line 3.context.age`).
pub fn field(line_no: usize, path: &str) -> String {
    if path.is_empty() || path == "." {
        format!("line {line_no}")
    } else {
        format!("line {line_no}.{path}")
    }
}

/// Parses one line as a `T`, refusing anything after the object.
pub fn parse_line<T: DeserializeOwned>(line: &str, line_no: usize) -> Result<T, LineError> {
    let mut de = serde_json::Deserializer::from_str(line);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // serde_json ends its text with "at line 1 column N"; the line is ours to name.
        let text = e.inner().to_string();
        let message = text
            .rfind(" at line ")
            .map_or(text.as_str(), |at| &text[..at]);
        LineError {
            field: field(line_no, &e.path().to_string()),
            message: format!("{message} (column {})", e.inner().column()),
        }
    })?;
    de.end().map_err(|e| LineError {
        field: field(line_no, ""),
        message: format!("trailing characters (column {})", e.column()),
    })?;
    Ok(value)
}
