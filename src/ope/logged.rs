//! One logged bandit round, its checks, and the JSONL exchange format.
//!
//! ## JSONL
//!
//! One JSON object per line (blank lines are skipped):
//!
//! ```json
//! {"context": {"age": 34, "mobile": 1}, "actions": ["a", "b", "c"], "action": "b",
//!  "propensity": 0.25, "reward": 1}
//! ```
//!
//! - `actions`: the candidate action ids of the round, no duplicates, not empty;
//! - `action`: the id the logging policy chose, one of `actions`;
//! - `propensity`: the probability, at decision time, that the logging policy chose
//!   `action`, in (0, 1];
//! - `reward`: what the chosen action earned, a finite number;
//! - `context`: numeric context features (optional, defaults to `{}`).
//!
//! Other fields are refused by name, so a misspelt optional field does not pass silently.
//! Errors name the line (1-based) and the field: `line 3.propensity: must be in (0, 1]`.
//! [`write_jsonl`] writes the same format, one round per line, so a log exported here
//! reads back equal.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, ErrorKind, Write};

use serde::{Deserialize, Serialize};

use super::{OpeError, OpeResult};
use crate::jsonl;

/// One round the logging policy decided: the candidates, the one it chose, with what
/// probability, and what that earned.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedRound {
    /// Candidate action ids, the logged one among them.
    pub actions: Vec<String>,
    /// Index into `actions` of the logged action.
    pub chosen: usize,
    /// The logging policy's probability of `chosen`, in (0, 1], as known at decision time.
    pub propensity: f64,
    pub reward: f64,
    /// Numeric context features (may be empty).
    pub context: BTreeMap<String, f64>,
}

impl LoggedRound {
    /// The id of the logged action. Panics only on a round that fails [`Self::check`].
    pub fn chosen_action(&self) -> &str {
        &self.actions[self.chosen]
    }

    /// Checks the round's own invariants; errors name `field` followed by the culprit
    /// (`rounds[3].propensity`).
    pub fn check(&self, field: &str) -> OpeResult<()> {
        let at = |name: &str| format!("{field}.{name}");
        if self.actions.is_empty() {
            return Err(OpeError::invalid(at("actions"), "must not be empty"));
        }
        let mut seen = HashSet::with_capacity(self.actions.len());
        for (i, id) in self.actions.iter().enumerate() {
            if !seen.insert(id.as_str()) {
                return Err(OpeError::invalid(
                    at(&format!("actions[{i}]")),
                    format!("duplicate action '{id}'"),
                ));
            }
        }
        if self.chosen >= self.actions.len() {
            return Err(OpeError::invalid(
                at("chosen"),
                format!(
                    "index {} out of range for {} actions",
                    self.chosen,
                    self.actions.len()
                ),
            ));
        }
        check_propensity(self.propensity).map_err(|m| OpeError::invalid(at("propensity"), m))?;
        if !self.reward.is_finite() {
            return Err(OpeError::invalid(at("reward"), "must be finite"));
        }
        if let Some((name, _)) = self.context.iter().find(|(_, v)| !v.is_finite()) {
            return Err(OpeError::invalid(
                at(&format!("context.{name}")),
                "must be finite",
            ));
        }
        Ok(())
    }
}

fn check_propensity(p: f64) -> Result<(), &'static str> {
    if p > 0.0 && p <= 1.0 {
        Ok(())
    } else {
        Err("must be in (0, 1]")
    }
}

/// One line of the JSONL format, as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonlRound {
    #[serde(default)]
    context: BTreeMap<String, f64>,
    actions: Vec<String>,
    action: String,
    propensity: f64,
    reward: f64,
}

/// One line of the JSONL format, as written (borrowed from the round).
#[derive(Serialize)]
struct JsonlRoundRef<'a> {
    context: &'a BTreeMap<String, f64>,
    actions: &'a [String],
    action: &'a str,
    propensity: f64,
    reward: f64,
}

/// Logged rounds in the JSONL format above, in file order. Stops at the first bad line.
pub fn read_jsonl(reader: impl BufRead) -> OpeResult<Vec<LoggedRound>> {
    let mut rounds = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line_no = n + 1;
        let line = line.map_err(|e| match e.kind() {
            // Not UTF-8: the file's content is at fault, not the disk.
            ErrorKind::InvalidData => OpeError::invalid(format!("line {line_no}"), e.to_string()),
            _ => OpeError::Io(e),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        rounds.push(parse_line(&line, line_no)?);
    }
    Ok(rounds)
}

fn parse_line(line: &str, line_no: usize) -> OpeResult<LoggedRound> {
    let field = |path: &str| jsonl::field(line_no, path);
    let r: JsonlRound =
        jsonl::parse_line(line, line_no).map_err(|e| OpeError::invalid(e.field, e.message))?;
    if r.actions.is_empty() {
        return Err(OpeError::invalid(field("actions"), "must not be empty"));
    }
    let chosen = r
        .actions
        .iter()
        .position(|a| *a == r.action)
        .ok_or_else(|| {
            OpeError::invalid(
                field("action"),
                format!("'{}' is not one of the round's actions", r.action),
            )
        })?;
    let round = LoggedRound {
        actions: r.actions,
        chosen,
        propensity: r.propensity,
        reward: r.reward,
        context: r.context,
    };
    round.check(&field(""))?;
    Ok(round)
}

/// Writes `rounds` in the JSONL format above, one line each. Every round is checked first
/// (errors name `rounds[i]`), so what is written always reads back.
pub fn write_jsonl(mut writer: impl Write, rounds: &[LoggedRound]) -> OpeResult<()> {
    for (i, round) in rounds.iter().enumerate() {
        round.check(&format!("rounds[{i}]"))?;
    }
    for round in rounds {
        let line = JsonlRoundRef {
            context: &round.context,
            actions: &round.actions,
            action: round.chosen_action(),
            propensity: round.propensity,
            reward: round.reward,
        };
        serde_json::to_writer(&mut writer, &line).map_err(std::io::Error::from)?;
        writer.write_all(b"\n")?;
    }
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(actions: &[&str], chosen: usize, propensity: f64, reward: f64) -> LoggedRound {
        LoggedRound {
            actions: actions.iter().map(|a| a.to_string()).collect(),
            chosen,
            propensity,
            reward,
            context: BTreeMap::new(),
        }
    }

    #[test]
    fn check_names_the_field() {
        let cases: Vec<(LoggedRound, &str)> = vec![
            (round(&[], 0, 0.5, 1.0), "r.actions: must not be empty"),
            (
                round(&["a", "b", "a"], 0, 0.5, 1.0),
                "r.actions[2]: duplicate action 'a'",
            ),
            (
                round(&["a", "b"], 2, 0.5, 1.0),
                "r.chosen: index 2 out of range for 2 actions",
            ),
            (
                round(&["a"], 0, 0.0, 1.0),
                "r.propensity: must be in (0, 1]",
            ),
            (
                round(&["a"], 0, 1.5, 1.0),
                "r.propensity: must be in (0, 1]",
            ),
            (
                round(&["a"], 0, -0.1, 1.0),
                "r.propensity: must be in (0, 1]",
            ),
            (
                round(&["a"], 0, f64::NAN, 1.0),
                "r.propensity: must be in (0, 1]",
            ),
            (
                round(&["a"], 0, 0.5, f64::INFINITY),
                "r.reward: must be finite",
            ),
            (
                LoggedRound {
                    context: [("age".to_string(), f64::NAN)].into(),
                    ..round(&["a"], 0, 0.5, 1.0)
                },
                "r.context.age: must be finite",
            ),
        ];
        for (r, expect) in cases {
            assert_eq!(r.check("r").unwrap_err().to_string(), expect);
        }
        round(&["a", "b"], 1, 1.0, -3.0).check("r").unwrap();
    }

    #[test]
    fn jsonl_reads_a_line_and_skips_blank_ones() {
        let input = concat!(
            "\n",
            r#"{"context": {"age": 34, "mobile": 1}, "actions": ["a", "b", "c"], "action": "b","#,
            r#" "propensity": 0.25, "reward": 1}"#,
            "\n  \n",
            r#"{"actions": ["x"], "action": "x", "propensity": 1, "reward": 0}"#,
        );
        let rounds = read_jsonl(input.as_bytes()).unwrap();
        assert_eq!(
            rounds,
            vec![
                LoggedRound {
                    context: [("age".to_string(), 34.0), ("mobile".to_string(), 1.0)].into(),
                    ..round(&["a", "b", "c"], 1, 0.25, 1.0)
                },
                round(&["x"], 0, 1.0, 0.0),
            ]
        );
        assert_eq!(rounds[0].chosen_action(), "b");
        assert!(read_jsonl("".as_bytes()).unwrap().is_empty());
    }

    #[test]
    fn jsonl_round_trip() {
        let rounds = vec![
            LoggedRound {
                context: [("x".to_string(), 0.1 + 0.2), ("y".to_string(), -1e-300)].into(),
                ..round(&["a", "b \"quoted\"", "ünï"], 2, 1.0 / 3.0, 0.7)
            },
            round(&["only"], 0, 1.0, -2.5),
        ];
        let mut out = Vec::new();
        write_jsonl(&mut out, &rounds).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert_eq!(
            text.lines().nth(1).unwrap(),
            r#"{"context":{},"actions":["only"],"action":"only","propensity":1.0,"reward":-2.5}"#
        );
        assert_eq!(read_jsonl(text.as_bytes()).unwrap(), rounds);
    }

    #[test]
    fn write_refuses_a_round_that_would_not_read_back() {
        let rounds = vec![round(&["a"], 0, 1.0, 0.0), round(&["a"], 0, 0.0, 1.0)];
        let mut out = Vec::new();
        let err = write_jsonl(&mut out, &rounds).unwrap_err();
        assert_eq!(err.to_string(), "rounds[1].propensity: must be in (0, 1]");
        assert!(out.is_empty(), "nothing is written when a round is bad");
    }

    #[test]
    fn jsonl_errors_name_the_line_and_the_field() {
        let good = r#"{"actions": ["a", "b"], "action": "a", "propensity": 0.5, "reward": 1}"#;
        let check = |line: &str, expect: &str| {
            let input = format!("{good}\n\n{line}\n{good}\n");
            let err = read_jsonl(input.as_bytes()).unwrap_err();
            assert_eq!(err.to_string(), expect, "for {line}");
        };
        check("not json", "line 3: expected ident (column 2)");
        check(
            r#"{"actions": ["a"], "action": "a", "propensity": 0.5, "reward": 1} x"#,
            "line 3: trailing characters (column 67)",
        );
        check(
            r#"{"actions": ["a", "b"], "action": "c", "propensity": 0.5, "reward": 1}"#,
            "line 3.action: 'c' is not one of the round's actions",
        );
        check(
            r#"{"actions": ["a", "b"], "action": "a", "propensity": 0, "reward": 1}"#,
            "line 3.propensity: must be in (0, 1]",
        );
        check(
            r#"{"actions": ["a", "b"], "action": "a", "propensity": 1.01, "reward": 1}"#,
            "line 3.propensity: must be in (0, 1]",
        );
        check(
            r#"{"actions": ["a", "b"], "action": "a", "propensity": "high", "reward": 1}"#,
            "line 3.propensity: invalid type: string \"high\", expected f64 (column 59)",
        );
        check(
            r#"{"actions": ["a", "b"], "action": "a", "propensity": 0.5}"#,
            "line 3: missing field `reward` (column 57)",
        );
        check(
            r#"{"actions": ["a", "b"], "action": "a", "propensity": 0.5, "reward": null}"#,
            "line 3.reward: invalid type: null, expected f64 (column 72)",
        );
        check(
            r#"{"actions": ["a", "b"], "action": "a", "propensity": 0.5, "reward": 1e999}"#,
            "line 3.reward: number out of range (column 73)",
        );
        check(
            r#"{"context": {"age": "old"}, "actions": ["a"], "action": "a", "propensity": 0.5, "reward": 1}"#,
            "line 3.context.age: invalid type: string \"old\", expected f64 (column 25)",
        );
        check(
            r#"{"actions": [], "action": "a", "propensity": 0.5, "reward": 1}"#,
            "line 3.actions: must not be empty",
        );
        check(
            r#"{"actions": ["a", "a"], "action": "a", "propensity": 0.5, "reward": 1}"#,
            "line 3.actions[1]: duplicate action 'a'",
        );
        check(
            r#"{"actions": ["a"], "action": "a", "propensity": 0.5, "reward": 1, "weight": 2}"#,
            "line 3.weight: unknown field `weight`, expected one of `context`, `actions`, `action`, `propensity`, `reward` (column 74)",
        );
    }

    #[test]
    fn jsonl_bad_encoding_names_the_line() {
        let mut input =
            b"{\"actions\": [\"a\"], \"action\": \"a\", \"propensity\": 1, \"reward\": 1}\n"
                .to_vec();
        input.extend_from_slice(b"{\"actions\": [\"\xff\"]}\n");
        let err = read_jsonl(input.as_slice()).unwrap_err();
        assert!(err.to_string().starts_with("line 2: "), "{err}");
    }
}
