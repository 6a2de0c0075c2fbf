//! What bounds one request before and while the schema sees it: the batch cap and the
//! reading of a GraphQL body ([`parse_batch`]), the alias cap and syntax errors that do
//! not quote the query ([`QueryGuard`], an async-graphql extension around parsing), and
//! the per-key rate limit
//! ([`RateLimit`]). Depth, complexity, directives and recursion are async-graphql's own
//! limits, set in `graphql::schema`; the body size and the request timeout are layers of
//! the router.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextValidation,
};
use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, Selection};
use async_graphql::ValidationResult;
use async_graphql::{BatchRequest, ServerError, ServerResult, Variables};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use quick_cache::sync::Cache;
use quick_cache::Weighter;

use crate::config::Limits;

/// A GraphQL body that is refused before any operation is parsed: the text is fit to
/// send (it never quotes the body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyRefused(pub String);

/// Reads a GraphQL POST body (one request or a non-empty JSON array of them), refusing
/// malformed JSON and batches over `limits.max_batch_operations`.
pub fn parse_batch(body: &[u8], limits: &Limits) -> Result<BatchRequest, BodyRefused> {
    let batch: BatchRequest = serde_json::from_slice(body)
        .map_err(|e| BodyRefused(format!("body: not a GraphQL request: {}", json_error(&e))))?;
    let operations = operations(&batch);
    if operations > limits.max_batch_operations {
        return Err(BodyRefused(format!(
            "body: a batch of {operations} operations; at most {} are allowed",
            limits.max_batch_operations
        )));
    }
    Ok(batch)
}

/// How many operations a request holds (a single request is one).
pub fn operations(batch: &BatchRequest) -> usize {
    match batch {
        BatchRequest::Single(_) => 1,
        BatchRequest::Batch(requests) => requests.len(),
    }
}

/// A serde_json error without the values it may quote (`invalid type: string "…"`
/// would echo whatever the client sent, personal data included): its category, what
/// was expected, and where.
pub fn json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let at = format!("at line {} column {}", e.line(), e.column());
    match e.classify() {
        Category::Io => "cannot be read".into(),
        Category::Syntax => format!("malformed JSON {at}"),
        Category::Eof => format!("JSON ends early {at}"),
        Category::Data => {
            let text = e.to_string();
            // "invalid type: string \"x\", expected a map at line 1 column 9"
            let expected = text
                .split_once(", expected ")
                .map(|(_, rest)| rest.rsplit_once(" at line ").map_or(rest, |(exp, _)| exp));
            let missing = text
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(field, _)| field);
            match (missing, expected) {
                (Some(field), _) => format!("missing field `{field}` {at}"),
                (None, Some(expected)) => format!("wrong value, expected {expected} {at}"),
                (None, None) => format!("wrong value {at}"),
            }
        }
    }
}

/// Around parsing: refuses a document with more than `max_aliases` aliased fields (its
/// fragments included): aliases multiply the work of one field without adding depth, and
/// their complexity is the field's own. And rewrites syntax errors, which quote the
/// offending line of the query (literals, personal data included), to what was expected
/// and where.
///
/// It also keeps the documents it let through, by query text (at most 1 MiB of text in
/// all, texts up to 16 KiB): clients send the same few queries with different variables,
/// and parsing one again was 6% of a decision's server CPU. A document is kept only once
/// async-graphql's own checks on the parsed text (recursion depth, directives) and the
/// alias cap have passed, and those depend on the text alone; validation, which reads the
/// variables, still runs on every request. This extension is the only one around
/// parsing: one placed after it would not see cached queries.
pub struct QueryGuard {
    max_aliases: usize,
    documents: Arc<Documents>,
}

/// Parsed documents by query text, weighed by the text's length: a document's size
/// follows its text's, so the bound holds whatever texts clients send.
type Documents = Cache<String, Arc<ExecutableDocument>, QueryBytes>;

/// The query texts of the kept documents, in bytes, at most.
const CACHED_QUERY_BYTES: u64 = 1024 * 1024;
/// Longer query texts are parsed every time (they are not what a frontend repeats).
const MAX_CACHED_QUERY_BYTES: usize = 16 * 1024;

#[derive(Clone)]
struct QueryBytes;

impl Weighter<String, Arc<ExecutableDocument>> for QueryBytes {
    fn weight(&self, query: &String, _: &Arc<ExecutableDocument>) -> u64 {
        query.len() as u64
    }
}

impl QueryGuard {
    pub fn new(max_aliases: usize) -> QueryGuard {
        QueryGuard {
            max_aliases,
            // Frontend queries are a few hundred bytes: some 2,000 of them fit.
            documents: Arc::new(Cache::with_weighter(2_000, CACHED_QUERY_BYTES, QueryBytes)),
        }
    }
}

impl ExtensionFactory for QueryGuard {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(QueryGuardExtension {
            max_aliases: self.max_aliases,
            documents: self.documents.clone(),
        })
    }
}

struct QueryGuardExtension {
    max_aliases: usize,
    documents: Arc<Documents>,
}

/// A syntax error without the quoted source: `line:column: expected …`.
fn syntax_error(mut error: ServerError) -> ServerError {
    if !error.message.contains('\n') {
        return error;
    }
    let expected = error
        .message
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("= "))
        .unwrap_or("unexpected input")
        .to_owned();
    error.message = match error.locations.first() {
        Some(at) => format!("syntax error at {}:{}: {expected}", at.line, at.column),
        None => format!("syntax error: {expected}"),
    };
    error
}

#[async_trait::async_trait]
impl Extension for QueryGuardExtension {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        if let Some(document) = self.documents.get(query) {
            return Ok(ExecutableDocument::clone(&document));
        }
        let document = next
            .run(ctx, query, variables)
            .await
            .map_err(syntax_error)?;
        let aliases = aliases(&document);
        if aliases > self.max_aliases {
            let mut error = ServerError::new(
                format!(
                    "query has {aliases} aliases; at most {} are allowed",
                    self.max_aliases
                ),
                None,
            );
            error
                .extensions
                .get_or_insert_with(Default::default)
                .set("code", "BAD_REQUEST");
            return Err(error);
        }
        if query.len() <= MAX_CACHED_QUERY_BYTES {
            self.documents
                .insert(query.to_owned(), Arc::new(document.clone()));
        }
        Ok(document)
    }
}

/// Stops a request after validation (see `graphql::validator`).
pub struct ValidateOnly;

impl ExtensionFactory for ValidateOnly {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(ValidateOnly)
    }
}

#[async_trait::async_trait]
impl Extension for ValidateOnly {
    async fn validation(
        &self,
        ctx: &ExtensionContext<'_>,
        next: NextValidation<'_>,
    ) -> Result<ValidationResult, Vec<ServerError>> {
        next.run(ctx).await?;
        let mut done = ServerError::new("validated; not executed", None);
        done.extensions
            .get_or_insert_with(Default::default)
            .set("code", "VALIDATED");
        Err(vec![done])
    }
}

/// Aliased fields in every operation and fragment of `document`.
fn aliases(document: &ExecutableDocument) -> usize {
    let mut stack: Vec<&async_graphql::parser::types::SelectionSet> = Vec::new();
    match &document.operations {
        DocumentOperations::Single(op) => stack.push(&op.node.selection_set.node),
        DocumentOperations::Multiple(ops) => {
            stack.extend(ops.values().map(|op| &op.node.selection_set.node))
        }
    }
    stack.extend(
        document
            .fragments
            .values()
            .map(|f| &f.node.selection_set.node),
    );
    let mut count = 0;
    // A stack rather than recursion: the document is the client's.
    while let Some(set) = stack.pop() {
        for item in &set.items {
            match &item.node {
                Selection::Field(field) => {
                    count += usize::from(field.node.alias.is_some());
                    stack.push(&field.node.selection_set.node);
                }
                Selection::InlineFragment(fragment) => {
                    stack.push(&fragment.node.selection_set.node);
                }
                Selection::FragmentSpread(_) => {}
            }
        }
    }
    count
}

/// Requests per API key (or JWT subject): a token bucket refilled at
/// `limits.rate_per_key_per_second` and holding `limits.rate_burst`.
pub struct RateLimit {
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl RateLimit {
    /// The limiter of `limits`; `None` while the rate is 0 (no limit).
    pub fn new(limits: &Limits) -> Option<Arc<RateLimit>> {
        let rate = NonZeroU32::new(limits.rate_per_key_per_second)?;
        let burst = NonZeroU32::new(limits.rate_burst).unwrap_or(rate);
        let quota = Quota::per_second(rate).allow_burst(burst);
        Some(Arc::new(RateLimit {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        }))
    }

    /// Takes `n` requests from `key`'s bucket: `Err(wait)` when it holds too few, with
    /// how long until it does (rounded up to whole seconds, at least one, for
    /// `Retry-After`).
    pub fn check(&self, key: &str, n: usize) -> Result<(), Duration> {
        let n = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let key = key.to_owned();
        match self.limiter.check_key_n(&key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Err(Duration::from_secs(wait.as_secs() + 1))
            }
            // More than the burst at once never fits.
            Err(_) => Err(Duration::from_secs(1)),
        }
    }

    /// Forgets keys whose buckets are full again, so the map holds only recent callers.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        query: String,
        kind: Option<Kind>,
    }

    #[derive(Debug, serde::Deserialize)]
    enum Kind {
        A,
    }

    #[test]
    fn json_errors_never_quote_the_body() {
        let cases = [
            (
                r#"{"query": 5}"#,
                "wrong value, expected a string at line 1",
            ),
            (
                r#"{"query": "secret@example.com", "kind": "secret"}"#,
                "wrong value, expected",
            ),
            (r#"{"query": ["secret"]}"#, "wrong value, expected a string"),
            (r#"{"query": "#, "JSON ends early"),
            (r#"{"query": secret}"#, "malformed JSON"),
            (r#"{"kind": "A"}"#, "missing field `query`"),
        ];
        for (body, start) in cases {
            let e = serde_json::from_slice::<Body>(body.as_bytes()).unwrap_err();
            let text = json_error(&e);
            assert!(text.starts_with(start), "{body}: {text}");
            assert!(!text.contains("secret"), "{body}: {text}");
        }
        let e = serde_json::from_slice::<BatchRequest>(
            br#"{"query": "secret", "variables": "secret"}"#,
        )
        .unwrap_err();
        assert!(!json_error(&e).contains("secret"), "{}", json_error(&e));
    }

    #[test]
    fn batches_are_capped() {
        let limits = Limits {
            max_batch_operations: 2,
            ..Limits::default()
        };
        let one = r#"{"query": "{ __typename }"}"#;
        assert!(parse_batch(one.as_bytes(), &limits).is_ok());
        assert!(parse_batch(format!("[{one},{one}]").as_bytes(), &limits).is_ok());
        let e = parse_batch(format!("[{one},{one},{one}]").as_bytes(), &limits).unwrap_err();
        assert_eq!(e.0, "body: a batch of 3 operations; at most 2 are allowed");
        let e = parse_batch(br#"{"query": 5}"#, &limits).unwrap_err();
        assert!(e.0.starts_with("body: not a GraphQL request"), "{e:?}");
    }

    #[test]
    fn syntax_errors_do_not_quote_the_query() {
        let query = "{ a(email: \"secret@example.com) }";
        let e = async_graphql::parser::parse_query(query).unwrap_err();
        let error = syntax_error(ServerError::from(e));
        assert_eq!(error.message, "syntax error at 1:12: expected value");
        let plain = ServerError::new("Recursion limit exceeded.", None);
        assert_eq!(syntax_error(plain.clone()), plain);
    }

    #[test]
    fn aliases_are_counted_in_operations_and_fragments() {
        let doc = async_graphql::parser::parse_query(
            "query { a: x b: x { c: y } ...F } fragment F on Q { d: z e }",
        )
        .unwrap();
        assert_eq!(aliases(&doc), 4);
    }

    #[test]
    fn the_rate_limit_is_per_key() {
        let limits = Limits {
            rate_per_key_per_second: 1,
            rate_burst: 2,
            ..Limits::default()
        };
        let limit = RateLimit::new(&limits).unwrap();
        assert!(limit.check("a", 1).is_ok());
        assert!(limit.check("a", 1).is_ok());
        assert!(limit.check("a", 1).unwrap_err() >= Duration::from_secs(1));
        assert!(limit.check("b", 2).is_ok());
        assert!(limit.check("c", 3).is_err(), "more than the burst at once");
        assert!(RateLimit::new(&Limits::default()).is_none());
    }
}
