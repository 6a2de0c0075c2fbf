//! Rhai expressions outside rule files: the formulas of derived features and the
//! predicates of segments.
//!
//! - [`Formula`]: a number computed from other features, each read as a variable named
//!   after the feature (`min(1.0, email_opens_30d / 5.0 + page_views_30d / 10.0)`);
//! - [`Predicate`]: true or false for one customer, read through a `customer` value with
//!   the rules' host API: `customer.traits` (a map; a missing trait is `()`),
//!   `customer.feature("name")` (float, the default when the customer has none) and
//!   `customer.event_count("page_view", "7d")` (integer).
//!
//! Both are single expressions (no statements, `let` or loops; closures are allowed),
//! compiled once with the sandboxed engine of [`crate::rules::engine`] and kept as an
//! [`AST`]. Evaluating one never panics: a runtime error, a result of the wrong type, a
//! non-finite number or an exhausted budget is an [`EvalError`].
//!
//! The engine's own operation limit does not reach into closures called by native
//! functions (`array.map(|x| ...)` starts each call from the caller's count), so every
//! evaluation here also runs under [`OPERATIONS_BUDGET`], counted per thread across all
//! nested calls.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock};

use rhai::{ASTNode, Dynamic, Engine, EvalAltResult, Expr, FnCallExpr, FnPtr, ParseError, Scope};
use rhai::{ParseErrorType, Position, AST};
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::error::Error;
use crate::features::Window;
use crate::segments::condition::Facts;

/// Most operations one evaluation may perform, closures called by native functions
/// included.
pub const OPERATIONS_BUDGET: u64 = 100_000;
/// Longest source accepted, in bytes.
pub const MAX_SOURCE_LEN: usize = 10_000;
/// Most features one formula may read.
pub const MAX_INPUTS: usize = 64;
/// Deepest trait value handed to a predicate; deeper values read as `()`.
const MAX_TRAIT_DEPTH: usize = 16;

static ENGINE: LazyLock<Engine> = LazyLock::new(build_engine);

thread_local! {
    /// Operations performed by the evaluation running on this thread.
    static OPERATIONS: Cell<u64> = const { Cell::new(0) };
}

fn build_engine() -> Engine {
    let mut engine = crate::rules::engine();
    engine.on_progress(|_| {
        let spent = OPERATIONS.with(|ops| {
            let spent = ops.get() + 1;
            ops.set(spent);
            spent
        });
        (spent > OPERATIONS_BUDGET).then(|| Dynamic::from(OPERATIONS_BUDGET))
    });
    engine
        .register_type_with_name::<ScriptCustomer>("Customer")
        .register_get("traits", ScriptCustomer::traits)
        .register_fn("feature", ScriptCustomer::feature)
        .register_fn("event_count", ScriptCustomer::event_count);
    engine
}

/// Why a source was refused: 1-based line and column, 0 when unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CompileError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.message)
        } else {
            write!(
                f,
                "line {}, column {}: {}",
                self.line, self.column, self.message
            )
        }
    }
}

impl CompileError {
    fn at(pos: Position, message: impl Into<String>) -> Self {
        CompileError {
            line: pos.line().unwrap_or(0),
            column: pos.position().unwrap_or(0),
            message: message.into(),
        }
    }

    fn whole(message: impl Into<String>) -> Self {
        Self::at(Position::NONE, message)
    }
}

impl From<ParseError> for CompileError {
    fn from(e: ParseError) -> Self {
        Self::at(e.position(), e.err_type().to_string())
    }
}

/// Why one evaluation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(String);

impl From<Box<EvalAltResult>> for EvalError {
    /// The error where it happened, without the calls it passed through.
    fn from(e: Box<EvalAltResult>) -> Self {
        let mut root = &*e;
        while let EvalAltResult::ErrorInFunctionCall(_, _, inner, _) = root {
            root = inner;
        }
        match root {
            EvalAltResult::ErrorTooManyOperations(_) | EvalAltResult::ErrorTerminated(..) => {
                EvalError(format!(
                    "exceeded its budget of {OPERATIONS_BUDGET} operations"
                ))
            }
            other => EvalError(other.to_string()),
        }
    }
}

fn check_source(source: &str) -> Result<(), CompileError> {
    if source.trim().is_empty() {
        return Err(CompileError::whole("must not be empty"));
    }
    if source.len() > MAX_SOURCE_LEN {
        return Err(CompileError::whole(format!(
            "must be at most {MAX_SOURCE_LEN} bytes"
        )));
    }
    Ok(())
}

/// Runs `f` with this thread's operation count reset, so the budget covers exactly one
/// evaluation (or the constant folding of one compilation).
fn budgeted<T>(f: impl FnOnce() -> T) -> T {
    OPERATIONS.with(|ops| ops.set(0));
    f()
}

/// A compiled numeric expression over other features. Equal when the sources are equal
/// (the AST follows from the source); serialised as the source.
#[derive(Clone)]
pub struct Formula {
    source: String,
    /// The free variables, in order of first use: the features it reads.
    inputs: Vec<String>,
    ast: Arc<AST>,
}

impl Formula {
    /// Compiles `source`; every free variable is an input (a feature name).
    pub fn compile(source: &str) -> Result<Self, CompileError> {
        check_source(source)?;
        let mut scope = Scope::new();
        let mut inputs: Vec<String> = Vec::new();
        // Strict variables make the parser stop at the first undefined variable; each
        // pass declares the one it found, so the last pass knows them all.
        loop {
            let error = match budgeted(|| ENGINE.compile_expression_with_scope(&scope, source)) {
                Ok(ast) => {
                    return Ok(Formula {
                        source: source.to_owned(),
                        inputs,
                        ast: Arc::new(ast),
                    })
                }
                Err(e) => e,
            };
            match error.err_type() {
                ParseErrorType::VariableUndefined(name) if inputs.len() < MAX_INPUTS => {
                    inputs.push(name.clone());
                    // Not a constant: the optimiser would fold its value into the AST.
                    scope.push(name.clone(), 0.0_f64);
                }
                ParseErrorType::VariableUndefined(_) => {
                    return Err(CompileError::whole(format!(
                        "reads more than {MAX_INPUTS} features"
                    )))
                }
                _ => return Err(error.into()),
            }
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The features it reads, in order of first use.
    pub fn inputs(&self) -> &[String] {
        &self.inputs
    }

    /// The value, given each input's value. An integer result reads as a float; any
    /// other type, NaN or an infinity is an error.
    pub fn evaluate(&self, input: &mut dyn FnMut(&str) -> f64) -> Result<f64, EvalError> {
        let mut scope = Scope::new();
        for name in &self.inputs {
            scope.push_constant(name.clone(), input(name));
        }
        let value: Dynamic = budgeted(|| ENGINE.eval_ast_with_scope(&mut scope, &self.ast))
            .map_err(EvalError::from)?;
        let number = if let Ok(f) = value.as_float() {
            f
        } else if let Ok(i) = value.as_int() {
            i as f64
        } else {
            return Err(EvalError(format!(
                "returned {}, not a number",
                value.type_name()
            )));
        };
        if number.is_finite() {
            Ok(number)
        } else {
            Err(EvalError(format!("returned {number}, not a finite number")))
        }
    }
}

impl PartialEq for Formula {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Debug for Formula {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Formula").field(&self.source).finish()
    }
}

impl Serialize for Formula {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// What a predicate reads, found in its AST.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reads {
    /// Features named by `customer.feature("literal")`.
    pub features: BTreeSet<String>,
    /// (event type, window) pairs named by `customer.event_count("literal", "literal")`,
    /// in order of first use.
    pub events: Vec<(String, Window)>,
    /// It calls `timestamp()`.
    pub clock: bool,
    /// It names a feature, event type or window only at run time (a computed argument,
    /// or `feature`/`event_count` through a function pointer): it may read any feature
    /// and any event count.
    pub dynamic: bool,
}

/// A compiled boolean expression over one `customer`. Equal when the sources are equal.
#[derive(Clone)]
pub struct Predicate {
    source: String,
    reads: Reads,
    ast: Arc<AST>,
}

/// The variable a predicate reads the customer from.
const CUSTOMER: &str = "customer";

impl Predicate {
    /// Compiles `source`. Its only variable is `customer`; a literal window given to
    /// `event_count` must be a valid window.
    pub fn compile(source: &str) -> Result<Self, CompileError> {
        check_source(source)?;
        let mut scope = Scope::new();
        // Not a constant: the optimiser would try to evaluate calls on it.
        scope.push(CUSTOMER, Dynamic::UNIT);
        let ast = budgeted(|| ENGINE.compile_expression_with_scope(&scope, source))?;
        let reads = reads(&ast)?;
        Ok(Predicate {
            source: source.to_owned(),
            reads,
            ast: Arc::new(ast),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    /// Whether the predicate holds for `customer`. Anything but `true` or `false` is an
    /// error.
    pub fn evaluate(&self, customer: Arc<dyn Facts>) -> Result<bool, EvalError> {
        let mut scope = Scope::new();
        scope.push_constant(
            CUSTOMER,
            ScriptCustomer {
                facts: customer,
                traits: Arc::new(OnceLock::new()),
            },
        );
        let value: Dynamic = budgeted(|| ENGINE.eval_ast_with_scope(&mut scope, &self.ast))
            .map_err(EvalError::from)?;
        value
            .as_bool()
            .map_err(|type_name| EvalError(format!("returned {type_name}, not true or false")))
    }
}

impl PartialEq for Predicate {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Debug for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Predicate").field(&self.source).finish()
    }
}

/// Walks the AST for the host functions it calls and with what.
fn reads(ast: &AST) -> Result<Reads, CompileError> {
    let mut reads = Reads::default();
    let mut error = None;
    ast.walk(&mut |path: &[ASTNode]| {
        let Some(ASTNode::Expr(expr)) = path.last() else {
            return true;
        };
        match expr {
            Expr::FnCall(call, pos) => record_call(&mut reads, call, false, *pos),
            Expr::MethodCall(call, pos) => record_call(&mut reads, call, true, *pos),
            Expr::DynamicConstant(value, _) => {
                // `Fn("feature")`, folded to a constant by the optimiser.
                if value
                    .read_lock::<FnPtr>()
                    .is_some_and(|f| is_host_fn(f.fn_name()))
                {
                    reads.dynamic = true;
                }
                Ok(())
            }
            _ => Ok(()),
        }
        .map_err(|e| error = Some(e))
        .is_ok()
    });
    match error {
        Some(e) => Err(e),
        None => Ok(reads),
    }
}

fn is_host_fn(name: &str) -> bool {
    matches!(name, "feature" | "event_count" | "timestamp")
}

fn record_call(
    reads: &mut Reads,
    call: &FnCallExpr,
    method: bool,
    pos: Position,
) -> Result<(), CompileError> {
    match call.name.as_str() {
        "feature" => match literal_args::<1>(call, method) {
            Some([name]) => {
                reads.features.insert(name.to_owned());
            }
            None => reads.dynamic = true,
        },
        "event_count" => match literal_args::<2>(call, method) {
            Some([event_type, window]) => {
                let window = Window::parse("window", window).map_err(|e| match e {
                    Error::Invalid { message, .. } => CompileError::at(pos, message),
                    other => CompileError::at(pos, other.to_string()),
                })?;
                let pair = (event_type.to_owned(), window);
                if !reads.events.contains(&pair) {
                    reads.events.push(pair);
                }
            }
            None => reads.dynamic = true,
        },
        "timestamp" => reads.clock = true,
        // A function pointer made from a computed name may be any of the above.
        "Fn" => match call.args.as_slice() {
            [Expr::StringConstant(name, _)] if !is_host_fn(name) => {}
            _ => reads.dynamic = true,
        },
        _ => {}
    }
    Ok(())
}

/// The last `N` arguments when they are all string literals. A method call's arguments
/// exclude the object; a function call carries it first.
fn literal_args<const N: usize>(call: &FnCallExpr, method: bool) -> Option<[&str; N]> {
    let expected = if method { N } else { N + 1 };
    if call.args.len() != expected {
        return None;
    }
    let mut out = [""; N];
    for (slot, arg) in out.iter_mut().zip(&call.args[expected - N..]) {
        match arg {
            Expr::StringConstant(s, _) => *slot = s.as_str(),
            _ => return None,
        }
    }
    Some(out)
}

/// The `customer` a predicate sees. Read-only: every host function takes it by value.
#[derive(Clone)]
struct ScriptCustomer {
    facts: Arc<dyn Facts>,
    /// The traits as a Rhai map, converted on first use.
    traits: Arc<OnceLock<rhai::Map>>,
}

impl ScriptCustomer {
    fn traits(&mut self) -> rhai::Map {
        self.traits
            .get_or_init(|| {
                self.facts
                    .traits()
                    .iter()
                    .map(|(k, v)| (k.as_str().into(), to_dynamic(v, 1)))
                    .collect()
            })
            .clone()
    }

    fn feature(self, name: &str) -> f64 {
        self.facts.feature(name)
    }

    fn event_count(self, event_type: &str, window: &str) -> Result<rhai::INT, Box<EvalAltResult>> {
        let within = Window::parse("window", window).map_err(|e| e.to_string())?;
        let count = self.facts.event_count(event_type, within);
        Ok(rhai::INT::try_from(count).unwrap_or(rhai::INT::MAX))
    }
}

/// JSON as Rhai sees it: `null` is `()`, integers are `INT`, other numbers floats.
fn to_dynamic(value: &Value, depth: usize) -> Dynamic {
    if depth > MAX_TRAIT_DEPTH {
        return Dynamic::UNIT;
    }
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(items) => Dynamic::from_array(
            items
                .iter()
                .map(|item| to_dynamic(item, depth + 1))
                .collect(),
        ),
        Value::Object(map) => Dynamic::from_map(
            map.iter()
                .map(|(k, v)| (k.as_str().into(), to_dynamic(v, depth + 1)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};
    use std::collections::HashMap;

    #[test]
    fn a_formula_reads_its_free_variables() {
        let f = Formula::compile("min(1.0, opens / 5.0 + views / 10) + opens * 0").unwrap();
        assert_eq!(f.inputs(), ["opens", "views"]);
        let mut values = |n: &str| if n == "opens" { 2.5 } else { 5.0 };
        assert_eq!(f.evaluate(&mut values), Ok(1.0));
        let closure =
            Formula::compile("[1, 2].map(|x| x * views).reduce(|a, b| a + b, 0.0)").unwrap();
        assert_eq!(
            closure.inputs(),
            ["views"],
            "closure parameters are not inputs"
        );
        assert_eq!(closure.evaluate(&mut |_| 2.0), Ok(6.0));
        assert_eq!(
            Formula::compile("3").unwrap().evaluate(&mut |_| 0.0),
            Ok(3.0)
        );
    }

    #[test]
    fn formula_errors_carry_line_and_column() {
        let cases = [
            ("", (0, 0)),
            ("1 +", (1, 4)),
            ("a +\n  (b", (2, 5)),
            ("let x = 1", (1, 1)),
            ("loop { }", (1, 1)),
            ("eval(\"1\")", (1, 1)),
        ];
        for (source, (line, column)) in cases {
            let err = Formula::compile(source).unwrap_err();
            assert_eq!((err.line, err.column), (line, column), "{source}: {err}");
            assert!(!err.message.is_empty());
        }
        let wide = (0..=MAX_INPUTS)
            .map(|i| format!("f{i}"))
            .collect::<Vec<_>>();
        let err = Formula::compile(&format!("[{}].len()", wide.join(", "))).unwrap_err();
        assert_eq!(err.to_string(), "reads more than 64 features");
    }

    #[test]
    fn a_formula_fails_without_panicking() {
        let cases = [
            ("\"high\"", "returned string, not a number"),
            ("x > 1", "returned bool, not a number"),
            ("x / 0.0", "returned inf, not a finite number"),
            ("x - x / 0.0 + x / 0.0", "returned NaN, not a finite number"),
            ("1 / 0", "Division by zero"),
            ("(|f| f.call(f)).call(|f| f.call(f))", "Stack overflow"),
        ];
        for (source, expected) in cases {
            let err = Formula::compile(source)
                .unwrap()
                .evaluate(&mut |_| 1.0)
                .unwrap_err();
            assert!(err.to_string().contains(expected), "{source}: {err}");
        }
    }

    /// Nested closures called by native functions: the engine's own limit restarts
    /// for each call, the evaluation budget does not.
    fn endless() -> String {
        let long = "x".repeat(500);
        format!(
            "\"{long}\".split(\"\").reduce(|s, a| s + \"{long}\".split(\"\").reduce(|t, b| t + 1, 0), 0)"
        )
    }

    #[test]
    fn evaluation_is_bounded_by_the_budget() {
        let started = std::time::Instant::now();
        let err = Formula::compile(&endless())
            .unwrap()
            .evaluate(&mut |_| 0.0)
            .unwrap_err();
        assert_eq!(err.to_string(), "exceeded its budget of 100000 operations");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        // The budget is per evaluation: the next one starts afresh.
        let ok = Formula::compile("[1, 2, 3].reduce(|a, b| a + b, 0)").unwrap();
        assert_eq!(ok.evaluate(&mut |_| 0.0), Ok(6.0));
    }

    struct TestFacts {
        traits: Map<String, Value>,
        features: HashMap<String, f64>,
    }

    impl Facts for TestFacts {
        fn traits(&self) -> &Map<String, Value> {
            &self.traits
        }
        fn feature(&self, name: &str) -> f64 {
            self.features.get(name).copied().unwrap_or(0.0)
        }
        fn event_count(&self, event_type: &str, within: Window) -> u64 {
            if event_type == "page_view" && within == Window::days(7) {
                4
            } else {
                0
            }
        }
    }

    fn customer() -> Arc<dyn Facts> {
        Arc::new(TestFacts {
            traits: json!({"plan": "pro", "age": 31, "score": 2.5, "tags": ["vip"],
                           "address": {"country": "FR"}, "gone": null})
            .as_object()
            .cloned()
            .unwrap(),
            features: HashMap::from([("ltv".to_owned(), 120.0)]),
        })
    }

    #[test]
    fn a_predicate_reads_the_customer() {
        let cases = [
            ("customer.traits.plan == \"pro\"", true),
            (
                "customer.traits.age > 30 && customer.traits.score < 3.0",
                true,
            ),
            ("customer.traits.tags.contains(\"vip\")", true),
            ("customer.traits.address.country == \"FR\"", true),
            ("customer.traits.missing == ()", true),
            ("customer.traits.gone == ()", true),
            ("customer.traits[\"plan\"] != \"free\"", true),
            ("customer.feature(\"ltv\") >= 100.0", true),
            ("customer.feature(\"unknown\") == 0.0", true),
            ("customer.event_count(\"page_view\", \"7d\") == 4", true),
            ("customer.event_count(\"page_view\", \"1w\") > 3", true),
            ("customer.event_count(\"page_view\", \"30d\") > 0", false),
            ("[\"ltv\"].all(|n| customer.feature(n) > 100.0)", true),
            (
                "if customer.traits.plan == \"pro\" { true } else { false }",
                true,
            ),
        ];
        for (source, expected) in cases {
            let p = Predicate::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
            assert_eq!(p.evaluate(customer()), Ok(expected), "{source}");
        }
    }

    #[test]
    fn a_predicate_fails_without_panicking() {
        let cases = [
            (
                "customer.feature(\"ltv\")",
                "returned f64, not true or false",
            ),
            ("customer.traits.plan", "returned string, not true or false"),
            (
                "customer.event_count(\"page_view\", customer.traits.plan) > 0",
                "'pro' is not a window",
            ),
            ("customer.traits.plan.nothing()", "Function not found"),
            ("customer.traits.plan - 1 > 0", "Function not found"),
        ];
        for (source, expected) in cases {
            let err = Predicate::compile(source)
                .unwrap()
                .evaluate(customer())
                .unwrap_err();
            assert!(err.to_string().contains(expected), "{source}: {err}");
        }
        let budget = format!("{} > 0", endless());
        let err = Predicate::compile(&budget)
            .unwrap()
            .evaluate(customer())
            .unwrap_err();
        assert_eq!(err.to_string(), "exceeded its budget of 100000 operations");
    }

    #[test]
    fn predicate_errors_carry_line_and_column() {
        let cases = [
            ("customer.traits.plan ==", (1, 24), "Script is incomplete"),
            ("plan == \"pro\"", (1, 1), "Undefined variable: plan"),
            (
                "customer.traits.plan == \"pro\" &&\n  customer.event_count(\"click\", \"3y\") > 1",
                (2, 12),
                "'3y' is not a window such as 30d, 12h or 90m",
            ),
            (
                "customer.event_count(\"click\", \"900d\") > 1",
                (1, 10),
                "must be between 1m and 366d",
            ),
            ("customer.traits.plan = \"pro\"", (1, 22), "Unexpected '='"),
        ];
        for (source, (line, column), message) in cases {
            let err = Predicate::compile(source).unwrap_err();
            assert_eq!((err.line, err.column), (line, column), "{source}: {err}");
            assert_eq!(err.message, message, "{source}");
        }
    }

    #[test]
    fn a_predicate_reports_what_it_reads() {
        let p = Predicate::compile(
            "customer.feature(\"ltv\") > 1.0 && feature(customer, \"engagement_score\") < 0.5
             || customer.event_count(\"purchase\", \"30d\") > 0
             || [1].some(|x| customer.event_count(\"view\", \"12h\") > x)
             || customer.event_count(\"purchase\", customer.traits.window) > 0",
        );
        // The last call computes its window: dynamic.
        let reads = p.unwrap().reads().clone();
        assert_eq!(
            reads.features,
            BTreeSet::from(["engagement_score".to_owned(), "ltv".to_owned()])
        );
        assert_eq!(
            reads.events,
            vec![
                ("purchase".to_owned(), Window::days(30)),
                ("view".to_owned(), Window::parse("w", "12h").unwrap()),
            ]
        );
        assert!(reads.dynamic);
        assert!(!reads.clock);

        let cases = [
            ("customer.traits.plan == \"pro\"", false, false),
            ("customer.feature(\"a\" + \"b\") > 1.0", false, false),
            ("customer.feature(customer.traits.plan) > 1.0", true, false),
            ("Fn(\"feature\").call(customer, \"ltv\") > 1.0", true, false),
            (
                "Fn(\"fea\" + \"ture\").call(customer, \"ltv\") > 1.0",
                true,
                false,
            ),
            (
                "Fn(customer.traits.plan).call(customer, \"ltv\") > 1.0",
                true,
                false,
            ),
            ("[1].map(|x| x + 1).len() > 0", false, false),
            ("timestamp().elapsed > 1.0", false, true),
        ];
        for (source, dynamic, clock) in cases {
            let reads = Predicate::compile(source).unwrap().reads().clone();
            assert_eq!((reads.dynamic, reads.clock), (dynamic, clock), "{source}");
        }
        let folded = Predicate::compile("customer.feature(\"a\" + \"b\") > 1.0").unwrap();
        assert_eq!(folded.reads().features, BTreeSet::from(["ab".to_owned()]));
    }

    #[test]
    fn equality_and_serialisation_follow_the_source() {
        let a = Formula::compile("x + 1").unwrap();
        assert_eq!(a, Formula::compile("x + 1").unwrap());
        assert_ne!(a, Formula::compile("x + 2").unwrap());
        assert_eq!(serde_json::to_value(&a).unwrap(), json!("x + 1"));
        let p = Predicate::compile("customer.traits.vip == true").unwrap();
        assert_eq!(p.source(), "customer.traits.vip == true");
        assert_eq!(
            p,
            Predicate::compile("customer.traits.vip == true").unwrap()
        );
    }
}
