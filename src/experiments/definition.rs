//! What an experiment is: its key and salt, its variants (the first is the control) with
//! weights and overrides, traffic, targeting, layer and status, and the validation that
//! turns a caller's [`ExperimentInput`] into an [`Experiment`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::assignment::BUCKETS;
use crate::config::PolicyKind;
use crate::customers::validate_id;
use crate::error::{Error, Result};

/// Longest experiment key, variant key, layer name or salt.
pub const MAX_NAME_LEN: usize = 64;
/// Most variants of one experiment.
pub const MAX_VARIANTS: usize = 20;
/// Most rule names one variant may list.
pub const MAX_RULES: usize = 100;

/// Where an experiment is in its life: `draft` → `running` → `stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Defined; assigns nobody.
    Draft,
    /// Assigns eligible customers on every decision.
    Running,
    /// Assigns nobody any more; its results are kept. Final.
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Running => "running",
            Status::Stopped => "stopped",
        }
    }

    /// Allowed: draft → running, draft → stopped, running → stopped, and staying put.
    pub fn can_become(self, next: Status) -> bool {
        matches!(
            (self, next),
            (Status::Draft, Status::Running | Status::Stopped) | (Status::Running, Status::Stopped)
        ) || self == next
    }
}

/// Which rules run for customers in a variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "names")]
pub enum RuleOverride {
    /// Only these rules (by name) run; names that are not active are skipped.
    Only(Vec<String>),
    /// No rule runs (items' own frequency caps still apply).
    None,
}

/// What a variant changes for the decisions of its customers. `None` changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyKind>,
    /// The saved model version to score with instead of the active one (the pipeline's
    /// model stage does; this module does not score).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<RuleOverride>,
    /// A content item id shown first whenever it is an eligible candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub key: String,
    /// Relative share of the experiment's traffic (> 0; need not sum to anything).
    pub weight: f64,
    #[serde(default)]
    pub overrides: Overrides,
}

/// The buckets `[start, end)` of a layer's own bucket space that one experiment owns.
/// Experiments of one layer that are not stopped own disjoint ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRange {
    pub start: u32,
    pub end: u32,
}

impl LayerRange {
    pub fn contains(&self, bucket: u32) -> bool {
        (self.start..self.end).contains(&bucket)
    }

    pub fn overlaps(&self, other: &LayerRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSlot {
    pub name: String,
    pub range: LayerRange,
}

/// A validated experiment, as stored (the body of a `DefinitionKind::Experiment`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Experiment {
    pub key: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Hashed with the customer id to assign variants; the key unless given.
    pub salt: String,
    /// At least two; `variants[0]` is the control.
    pub variants: Vec<Variant>,
    /// Share of eligible customers in the experiment, in [0.01, 100] (a layer's range is
    /// this share rounded to whole buckets of 0.01%).
    pub traffic_percent: f64,
    /// Only members of this segment are eligible; `None`: everyone.
    #[serde(default)]
    pub targeting_segment: Option<String>,
    /// The layer and the slice of it this experiment owns (allocated at creation).
    #[serde(default)]
    pub layer: Option<LayerSlot>,
    pub status: Status,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub stopped_at: Option<DateTime<Utc>>,
}

impl Experiment {
    pub fn control(&self) -> &Variant {
        // Validation guarantees at least two variants.
        &self.variants[0]
    }

    /// Traffic as a number of buckets out of [`BUCKETS`], at least 1.
    pub fn traffic_buckets(&self) -> u32 {
        traffic_buckets(self.traffic_percent)
    }

    pub fn weights(&self) -> Vec<f64> {
        self.variants.iter().map(|v| v.weight).collect()
    }
}

pub(crate) fn traffic_buckets(percent: f64) -> u32 {
    // Validation keeps percent in [0.01, 100]: the result is in [1, BUCKETS].
    ((percent * f64::from(BUCKETS) / 100.0).round() as u32).clamp(1, BUCKETS)
}

/// A variant as a caller sends it, before validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VariantInput {
    pub key: String,
    pub weight: f64,
    /// `thompson_sampling` (or `thompson`), `epsilon_greedy` or `model_greedy`.
    pub policy: Option<String>,
    pub model_version: Option<String>,
    /// Run only these rules; an empty list runs none.
    pub rules: Option<Vec<String>>,
    pub pin: Option<String>,
}

/// An experiment as a caller sends it, before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentInput {
    pub key: String,
    pub description: Option<String>,
    pub salt: Option<String>,
    pub variants: Vec<VariantInput>,
    pub traffic_percent: f64,
    pub targeting_segment: Option<String>,
    pub layer: Option<String>,
}

/// Keys, variant keys, layer names and salts: 1–64 of `[A-Za-z0-9_.:-]`, so they are
/// safe in storage keys, metric labels and the `salt:customer` hash input.
pub fn validate_name(field: &str, raw: &str) -> Result<()> {
    if raw.is_empty() || raw.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            field,
            format!("must be 1–{MAX_NAME_LEN} characters"),
        ));
    }
    if let Some(c) = raw
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
    {
        return Err(Error::invalid(
            field,
            format!("may contain only letters, digits, '_', '-', '.', ':' (found {c:?})"),
        ));
    }
    Ok(())
}

fn parse_policy(field: &str, raw: &str) -> Result<PolicyKind> {
    PolicyKind::parse(raw).ok_or_else(|| {
        Error::invalid(
            field,
            format!(
                "unknown policy '{raw}' (expected one of {})",
                PolicyKind::names()
            ),
        )
    })
}

impl ExperimentInput {
    /// Checks everything that needs no lookup and builds a draft experiment (layer range
    /// not yet allocated: `layer` is returned apart). Fields are named as in GraphQL,
    /// under `input.`.
    pub fn validate(self, now: DateTime<Utc>) -> Result<(Experiment, Option<String>)> {
        validate_name("input.key", &self.key)?;
        let salt = match self.salt {
            Some(salt) => {
                validate_name("input.salt", &salt)?;
                salt
            }
            None => self.key.clone(),
        };
        if let Some(d) = &self.description {
            if d.len() > 1_000 {
                return Err(Error::invalid(
                    "input.description",
                    "longer than 1000 bytes",
                ));
            }
        }
        if !self.traffic_percent.is_finite()
            || self.traffic_percent < 0.01
            || self.traffic_percent > 100.0
        {
            return Err(Error::invalid(
                "input.trafficPercent",
                "must be between 0.01 and 100",
            ));
        }
        if self.variants.len() < 2 || self.variants.len() > MAX_VARIANTS {
            return Err(Error::invalid(
                "input.variants",
                format!("must have 2–{MAX_VARIANTS} variants (the first is the control)"),
            ));
        }
        let mut variants = Vec::with_capacity(self.variants.len());
        for (i, v) in self.variants.into_iter().enumerate() {
            let field = |name: &str| format!("input.variants[{i}].{name}");
            validate_name(&field("key"), &v.key)?;
            if variants.iter().any(|seen: &Variant| seen.key == v.key) {
                return Err(Error::invalid(
                    field("key"),
                    format!("duplicate variant '{}'", v.key),
                ));
            }
            if !v.weight.is_finite() || v.weight <= 0.0 || v.weight > 1e6 {
                return Err(Error::invalid(
                    field("weight"),
                    "must be a number greater than 0 (at most 1e6)",
                ));
            }
            let policy = v
                .policy
                .as_deref()
                .map(|p| parse_policy(&field("policy"), p))
                .transpose()?;
            if let Some(m) = &v.model_version {
                validate_name(&field("modelVersion"), m)?;
            }
            let rules = match v.rules {
                None => None,
                Some(names) if names.is_empty() => Some(RuleOverride::None),
                Some(names) => {
                    if names.len() > MAX_RULES {
                        return Err(Error::invalid(
                            field("rules"),
                            format!("at most {MAX_RULES} rules"),
                        ));
                    }
                    for (j, name) in names.iter().enumerate() {
                        validate_id(&field(&format!("rules[{j}]")), name)?;
                    }
                    Some(RuleOverride::Only(names))
                }
            };
            if let Some(pin) = &v.pin {
                validate_id(&field("pin"), pin)?;
            }
            variants.push(Variant {
                key: v.key,
                weight: v.weight,
                overrides: Overrides {
                    policy,
                    model_version: v.model_version,
                    rules,
                    pin: v.pin,
                },
            });
        }
        if let Some(segment) = &self.targeting_segment {
            validate_id("input.targetingSegment", segment)?;
        }
        if let Some(layer) = &self.layer {
            validate_name("input.layer", layer)?;
        }
        Ok((
            Experiment {
                key: self.key,
                description: self.description,
                salt,
                variants,
                traffic_percent: self.traffic_percent,
                targeting_segment: self.targeting_segment,
                layer: None,
                status: Status::Draft,
                created_at: now,
                started_at: None,
                stopped_at: None,
            },
            self.layer,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> ExperimentInput {
        ExperimentInput {
            key: "hero".into(),
            description: None,
            salt: None,
            variants: vec![
                VariantInput {
                    key: "control".into(),
                    weight: 1.0,
                    ..Default::default()
                },
                VariantInput {
                    key: "treatment".into(),
                    weight: 1.0,
                    policy: Some("epsilon_greedy".into()),
                    rules: Some(vec![]),
                    pin: Some("banner-1".into()),
                    ..Default::default()
                },
            ],
            traffic_percent: 50.0,
            targeting_segment: None,
            layer: Some("homepage".into()),
        }
    }

    #[test]
    fn a_valid_input_becomes_a_draft_with_the_key_as_salt() {
        let (e, layer) = input().validate(Utc::now()).expect("valid");
        assert_eq!(e.salt, "hero");
        assert_eq!(e.status, Status::Draft);
        assert_eq!(e.traffic_buckets(), 5_000);
        assert_eq!(layer.as_deref(), Some("homepage"));
        assert_eq!(
            e.variants[1].overrides,
            Overrides {
                policy: Some(PolicyKind::EpsilonGreedy),
                model_version: None,
                rules: Some(RuleOverride::None),
                pin: Some("banner-1".into()),
            }
        );
    }

    /// Each bad input is refused naming the field, as GraphQL names it.
    #[test]
    fn bad_input_names_the_field() {
        type Tweak = fn(&mut ExperimentInput);
        let cases: &[(Tweak, &str)] = &[
            (|i| i.key = String::new(), "input.key"),
            (|i| i.key = "has space".into(), "input.key"),
            (|i| i.salt = Some("x/y".into()), "input.salt"),
            (|i| i.traffic_percent = 0.0, "input.trafficPercent"),
            (|i| i.traffic_percent = 100.5, "input.trafficPercent"),
            (|i| i.traffic_percent = f64::NAN, "input.trafficPercent"),
            (|i| i.variants.truncate(1), "input.variants"),
            (|i| i.variants[1].weight = -1.0, "input.variants[1].weight"),
            (
                |i| i.variants[0].weight = f64::INFINITY,
                "input.variants[0].weight",
            ),
            (
                |i| i.variants[1].key = "control".into(),
                "input.variants[1].key",
            ),
            (
                |i| i.variants[1].policy = Some("greedy".into()),
                "input.variants[1].policy",
            ),
            (
                |i| i.variants[1].rules = Some(vec![String::new()]),
                "input.variants[1].rules[0]",
            ),
            (
                |i| i.variants[1].pin = Some(String::new()),
                "input.variants[1].pin",
            ),
            (
                |i| i.variants[0].model_version = Some("v 1".into()),
                "input.variants[0].modelVersion",
            ),
            (|i| i.layer = Some(String::new()), "input.layer"),
            (
                |i| i.targeting_segment = Some(String::new()),
                "input.targetingSegment",
            ),
        ];
        for (tweak, field) in cases {
            let mut i = input();
            tweak(&mut i);
            match i.validate(Utc::now()) {
                Err(Error::Invalid { field: got, .. }) => assert_eq!(&got, field),
                other => panic!("expected an error naming {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn status_moves_forward_only() {
        use Status::*;
        let allowed = [
            (Draft, Running),
            (Draft, Stopped),
            (Running, Stopped),
            (Draft, Draft),
            (Running, Running),
            (Stopped, Stopped),
        ];
        for from in [Draft, Running, Stopped] {
            for to in [Draft, Running, Stopped] {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from:?} → {to:?}"
                );
            }
        }
    }
}
