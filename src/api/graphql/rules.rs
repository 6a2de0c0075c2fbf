//! Rules over GraphQL: `rules`, `rule(name)`, `putRule`, `deleteRule`,
//! `activateRuleVersion` (rollback).

use async_graphql::{Context, Object};
use chrono::{DateTime, Utc};

use super::auth::Allow;
use super::engine;
use super::error::{gql, GqlResult};
use crate::rules::service::{RuleInfo, RuleVersion};

/// A business rule: its active version, compiled.
pub struct RuleObject(pub RuleInfo);

#[Object(name = "Rule")]
impl RuleObject {
    async fn name(&self) -> &str {
        &self.0.active.rule.meta.name
    }
    /// The active version.
    async fn version(&self) -> u32 {
        self.0.active.version
    }
    /// Higher runs first.
    async fn priority(&self) -> i64 {
        self.0.active.rule.meta.priority
    }
    /// Empty: every placement.
    async fn placements(&self) -> &[String] {
        &self.0.active.rule.meta.placements
    }
    async fn enabled(&self) -> bool {
        self.0.active.rule.meta.enabled
    }
    /// The hooks the script defines: `eligible`, `score`, `on_event`.
    async fn hooks(&self) -> Vec<&str> {
        self.0.active.rule.hooks.clone()
    }
    async fn source(&self) -> &str {
        &self.0.active.source
    }
    /// `api`, or `file:NAME.rhai` for a rule loaded from the rules directory.
    async fn origin(&self) -> &str {
        &self.0.origin
    }
    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
    /// Every stored version, oldest first.
    async fn versions(&self, ctx: &Context<'_>) -> GqlResult<Vec<RuleVersionObject>> {
        let versions = engine(ctx)
            .rules
            .versions(&self.0.active.rule.meta.name)
            .await
            .map_err(gql)?;
        Ok(versions.into_iter().map(RuleVersionObject).collect())
    }
}

/// One stored version of a rule.
pub struct RuleVersionObject(pub RuleVersion);

#[Object(name = "RuleVersion")]
impl RuleVersionObject {
    async fn version(&self) -> u32 {
        self.0.version
    }
    async fn source(&self) -> &str {
        &self.0.source
    }
    async fn origin(&self) -> &str {
        &self.0.origin
    }
    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }
}

#[derive(Default)]
pub struct RuleQuery;

#[Object]
impl RuleQuery {
    /// Every active rule, in the order rules run (highest priority first).
    #[graphql(guard = "Allow::MARKETER")]
    async fn rules(&self, ctx: &Context<'_>) -> Vec<RuleObject> {
        engine(ctx)
            .rules
            .list()
            .into_iter()
            .map(RuleObject)
            .collect()
    }

    #[graphql(guard = "Allow::MARKETER")]
    async fn rule(&self, ctx: &Context<'_>, name: String) -> Option<RuleObject> {
        engine(ctx).rules.get(&name).map(RuleObject)
    }
}

#[derive(Default)]
pub struct RuleMutation;

#[Object]
impl RuleMutation {
    /// Compiles a Rhai rule and, if it compiles, stores it as the next version of the
    /// rule and activates it. The name is `name`, else the script's `NAME` constant. A
    /// script that does not compile is refused with `extensions.line`/`column` and the
    /// version before stays active.
    #[graphql(guard = "Allow::MARKETER")]
    async fn put_rule(
        &self,
        ctx: &Context<'_>,
        source: String,
        name: Option<String>,
    ) -> GqlResult<RuleObject> {
        let info = engine(ctx)
            .rules
            .put(name.as_deref(), &source)
            .await
            .map_err(gql)?;
        Ok(RuleObject(info))
    }

    /// Deletes a rule and every version of it. `false` if there was none.
    #[graphql(guard = "Allow::MARKETER")]
    async fn delete_rule(&self, ctx: &Context<'_>, name: String) -> GqlResult<bool> {
        engine(ctx).rules.delete(&name).await.map_err(gql)
    }

    /// Makes a stored version active again (rollback), after compiling it.
    #[graphql(guard = "Allow::MARKETER")]
    async fn activate_rule_version(
        &self,
        ctx: &Context<'_>,
        name: String,
        version: u32,
    ) -> GqlResult<RuleObject> {
        let info = engine(ctx)
            .rules
            .activate(&name, version)
            .await
            .map_err(gql)?;
        Ok(RuleObject(info))
    }
}
