//! The GraphQL schema, built without the web framework so tests can execute it
//! in-process. Every Query, Mutation and Subscription field carries an [`auth::Allow`]
//! guard naming the roles it is open to; the caller is the [`crate::auth::Caller`] in the
//! request's data (in-process callers attach one with `Request::data`).

pub mod auth;
pub mod error;
pub mod experiments;
pub mod models;
pub mod mutation;
pub mod ope;
pub mod privacy;
pub mod query;
pub mod rules;
pub mod subscription;
pub mod types;

use std::sync::Arc;

use async_graphql::{Context, Schema};

use crate::app::Engine;
use crate::config::Settings;

pub type TailorSchema = Schema<query::Query, mutation::Mutation, subscription::Subscription>;

pub fn schema(engine: Arc<Engine>) -> TailorSchema {
    let builder = builder(&engine.settings).data(engine);
    builder.finish()
}

fn builder(
    settings: &Settings,
) -> async_graphql::SchemaBuilder<query::Query, mutation::Mutation, subscription::Subscription> {
    let mut builder = Schema::build(
        query::Query::default(),
        mutation::Mutation::default(),
        subscription::Subscription,
    )
    .limit_depth(settings.limits.max_query_depth)
    .limit_complexity(settings.limits.max_query_complexity)
    .limit_recursive_depth(settings.limits.max_recursive_depth)
    .limit_directives(settings.limits.max_directives)
    .extension(crate::api::limits::QueryGuard::new(
        settings.limits.max_aliases,
    ));
    if !settings.api.introspection() {
        builder = builder.disable_introspection();
    }
    if !settings.api.suggestions() {
        builder = builder.disable_suggestions();
    }
    builder
}

/// The schema without an engine, stopping every request once it is parsed and
/// validated (with every limit of `settings`): nothing executes. For checking request
/// bodies without a server, as the fuzz target does; a valid request's only error has
/// `extensions.code = "VALIDATED"`.
pub fn validator(settings: &Settings) -> TailorSchema {
    builder(settings)
        .extension(crate::api::limits::ValidateOnly)
        .finish()
}

/// The SDL of the schema, as committed in `schema/schema.graphql`.
pub fn sdl() -> String {
    builder(&Settings::default()).finish().sdl()
}

pub(crate) fn engine<'a>(ctx: &Context<'a>) -> &'a Arc<Engine> {
    // The schema is only ever built by `schema()`, which sets this data.
    ctx.data_unchecked::<Arc<Engine>>()
}
