//! Business rules in Rhai: the one hardened engine, rule files compiled with their
//! metadata, the host API scripts see ([`host`]), native functions ([`natives`]),
//! plugins ([`plugins`]), evaluation inside decisions and on events ([`runtime`]), the
//! compiled fast path of the decision hooks ([`compiled`]), the
//! stored, versioned, hot-reloaded rule set ([`service`]) and marketers' test cases
//! ([`testing`]).
//!
//! The only part of the engine that knows rhai.

pub mod compiled;
pub mod host;
pub mod natives;
pub mod plugins;
pub mod runtime;
pub mod service;
pub mod testing;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicFnPackage, BasicIteratorPackage, BasicMapPackage,
    BasicMathPackage, BasicStringPackage, LogicPackage, MoreStringPackage, Package,
};
pub use rhai::Engine;
use rhai::{Dynamic, Scope, AST};

pub use natives::Natives;
pub use plugins::Plugins;
pub use runtime::{RuleEffects, RuleSet};
pub use service::RuleService;

/// Most operations one evaluation may perform before it is stopped.
pub(crate) const MAX_OPERATIONS: u64 = 100_000;
const MAX_CALL_LEVELS: usize = 16;
const MAX_EXPR_DEPTH: usize = 32;
const MAX_FN_EXPR_DEPTH: usize = 32;
const MAX_STRING_SIZE: usize = 10_000;
const MAX_ARRAY_SIZE: usize = 1_000;
const MAX_MAP_SIZE: usize = 1_000;
const MAX_VARIABLES: usize = 256;
/// Most plugins one script may import.
const MAX_MODULES: usize = 16;
/// Operations between two looks at the clock.
const CLOCK_EVERY: u64 = 256;

/// The hooks a rule may define, with their arity.
pub const HOOKS: [(&str, usize); 3] = [("eligible", 3), ("score", 4), ("on_event", 2)];

thread_local! {
    /// The wall-clock deadline of the evaluation running on this thread.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Runs `f` with a wall-clock deadline: an evaluation still running at `deadline` is
/// stopped with an error saying so.
pub fn with_deadline<T>(deadline: Instant, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<Instant>);
    impl Drop for Reset {
        fn drop(&mut self) {
            DEADLINE.set(self.0);
        }
    }
    let _reset = Reset(DEADLINE.replace(Some(deadline)));
    f()
}

/// The message an evaluation stopped by its deadline fails with.
pub const DEADLINE_EXCEEDED: &str = "exceeded its time budget";

/// Builds the sandboxed engine every script runs in: only the language, arithmetic,
/// logic, math, string, array, map and function packages (no clock, no `sleep`, no
/// `exit`, no blobs); bounded operations, call depth, expression depth, string/array/map
/// sizes and variables; a wall-clock deadline (see [`with_deadline`]); no `eval`, no
/// printing, no module resolution (see [`engine_with`] for plugins); undeclared
/// variables are errors. The host API of [`host`] and the built-in natives are
/// registered.
pub fn engine() -> Engine {
    engine_with(&Natives::builtin(), None)
}

/// The sandboxed engine with `natives` registered and, when given, `plugins` as the
/// only modules scripts may `import`.
pub fn engine_with(natives: &Natives, plugins: Option<&Plugins>) -> Engine {
    let mut engine = Engine::new_raw();
    ArithmeticPackage::new().register_into_engine(&mut engine);
    BasicStringPackage::new().register_into_engine(&mut engine);
    MoreStringPackage::new().register_into_engine(&mut engine);
    BasicIteratorPackage::new().register_into_engine(&mut engine);
    BasicFnPackage::new().register_into_engine(&mut engine);
    LogicPackage::new().register_into_engine(&mut engine);
    BasicMathPackage::new().register_into_engine(&mut engine);
    BasicArrayPackage::new().register_into_engine(&mut engine);
    BasicMapPackage::new().register_into_engine(&mut engine);
    engine
        .set_max_operations(MAX_OPERATIONS)
        .set_max_call_levels(MAX_CALL_LEVELS)
        .set_max_expr_depths(MAX_EXPR_DEPTH, MAX_FN_EXPR_DEPTH)
        .set_max_string_size(MAX_STRING_SIZE)
        .set_max_array_size(MAX_ARRAY_SIZE)
        .set_max_map_size(MAX_MAP_SIZE)
        .set_max_variables(MAX_VARIABLES)
        .set_max_modules(if plugins.is_some() { MAX_MODULES } else { 0 })
        .set_strict_variables(true);
    engine.disable_symbol("eval");
    engine.on_print(|_| {});
    engine.on_debug(|_, _, _| {});
    engine.on_progress(|ops| {
        if ops % CLOCK_EVERY == 0 {
            if let Some(deadline) = DEADLINE.get() {
                if Instant::now() >= deadline {
                    return Some(Dynamic::from(DEADLINE_EXCEEDED));
                }
            }
        }
        None
    });
    host::register(&mut engine);
    natives.register(&mut engine);
    // What the compiled path must leave to Rhai: see `foreign_natives`.
    engine.set_default_tag(
        natives
            .foreign()
            .into_iter()
            .map(Dynamic::from)
            .collect::<rhai::Array>(),
    );
    if let Some(plugins) = plugins {
        engine.set_module_resolver(plugins.resolver());
    }
    engine
}

/// Names of functions `engine`'s natives define other than the built-ins: calls of
/// them are not compiled (an application may have replaced a host function).
fn foreign_natives(engine: &Engine) -> Vec<String> {
    engine
        .default_tag()
        .read_lock::<rhai::Array>()
        .map(|names| names.iter().map(|n| n.to_string()).collect())
        .unwrap_or_default()
}

/// A script error as one line: what went wrong, with the position where rhai has one.
pub fn describe(error: &rhai::EvalAltResult) -> String {
    match error {
        rhai::EvalAltResult::ErrorTerminated(..) => DEADLINE_EXCEEDED.to_owned(),
        rhai::EvalAltResult::ErrorTooManyOperations(..) => {
            format!("exceeded its budget of {MAX_OPERATIONS} operations")
        }
        other => other.to_string(),
    }
}

/// Metadata a rule declares with constants: `const NAME = "..."; const PRIORITY = 10;
/// const PLACEMENTS = ["homepage_hero"]; const ENABLED = true;`.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleMeta {
    pub name: String,
    /// Higher runs first (salience).
    pub priority: i64,
    /// Empty: every placement.
    pub placements: Vec<String>,
    pub enabled: bool,
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub meta: RuleMeta,
    pub hooks: Vec<&'static str>,
    /// The script with its imports embedded.
    pub ast: AST,
    /// The script followed by the driver that runs `eligible`/`score` over a decision's
    /// candidates in one evaluation (`None` without either hook).
    pub decide: Option<AST>,
    /// The script followed by the driver that runs `on_event`.
    pub event: Option<AST>,
    /// The decision hooks compiled to native code, when the rule is within the subset
    /// [`compiled`] translates; they agree with `decide`, which runs when they give up.
    pub compiled: Option<Arc<compiled::Program>>,
}

impl Rule {
    pub fn has(&self, hook: &str) -> bool {
        self.hooks.contains(&hook)
    }
}

/// Why a rule was refused, with its position (1-based; 0 when unknown).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct RuleError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl RuleError {
    fn whole(message: impl Into<String>) -> Self {
        RuleError {
            line: 0,
            column: 0,
            message: message.into(),
        }
    }

    fn at(position: rhai::Position, message: String) -> Self {
        RuleError {
            line: position.line().unwrap_or(0),
            column: position.position().unwrap_or(0),
            message,
        }
    }
}

/// The variables drivers read, bound per evaluation by [`runtime`].
const DRIVER_VARIABLES: [&str; 6] = [
    "__customer",
    "__ctx",
    "__items",
    "__weights",
    "__pinned",
    "__event",
];

/// Runs the rule's decision hooks over `__items` in one evaluation and returns
/// `[eligible results, score results]`: one eligible result per item (when the hook
/// exists), one score result per item still eligible and not pinned.
fn decide_driver(eligible: bool, score: bool) -> String {
    // Iterating the array (with its counter) costs less than indexing it, and a hook's
    // result goes straight into its list: the driver runs once per rule and candidate.
    let body = match (eligible, score) {
        (true, false) => "for __item in __items { __e.push(eligible(__customer, __item, __ctx)); }",
        (false, true) => {
            "for (__item, __i) in __items { if !__pinned[__i] { __s.push(score(__customer, __item, __ctx, __weights[__i])); } }"
        }
        _ => {
            "for (__item, __i) in __items { let __ok = eligible(__customer, __item, __ctx); __e.push(__ok); \
             if __ok == true && !__pinned[__i] { __s.push(score(__customer, __item, __ctx, __weights[__i])); } }"
        }
    };
    format!("let __e = []; let __s = [];\n{body}\n[__e, __s]")
}

/// Compiles one rule; `default_name` is used when the script declares no `NAME`.
/// `import`s are resolved now, against the engine's plugins, and embedded.
pub fn compile(engine: &Engine, default_name: &str, source: &str) -> Result<Rule, RuleError> {
    let ast = engine
        .compile_into_self_contained(&Scope::new(), source)
        .map_err(|e| match *e {
            rhai::EvalAltResult::ErrorParsing(kind, position) => {
                RuleError::at(position, kind.to_string())
            }
            other => RuleError::at(other.position(), describe(&other)),
        })?;
    let mut meta = RuleMeta {
        name: default_name.to_owned(),
        priority: 0,
        placements: Vec::new(),
        enabled: true,
    };
    for (name, _, value) in ast.iter_literal_variables(true, false) {
        match name {
            "NAME" => meta.name = string(name, value)?,
            "PRIORITY" => {
                meta.priority = value
                    .as_int()
                    .map_err(|_| RuleError::whole("PRIORITY must be an integer"))?
            }
            "ENABLED" => {
                meta.enabled = value
                    .as_bool()
                    .map_err(|_| RuleError::whole("ENABLED must be true or false"))?
            }
            "PLACEMENTS" => {
                let list = value
                    .into_array()
                    .map_err(|_| RuleError::whole("PLACEMENTS must be an array of strings"))?;
                meta.placements = list
                    .into_iter()
                    .map(|v| string("PLACEMENTS", v))
                    .collect::<Result<_, _>>()?;
            }
            _ => {}
        }
    }
    crate::customers::validate_id("NAME", &meta.name)
        .map_err(|e| RuleError::whole(e.to_string()))?;
    let mut hooks = Vec::new();
    for (hook, arity) in HOOKS {
        let defined: Vec<usize> = ast
            .iter_functions()
            .filter(|f| f.name == hook)
            .map(|f| f.params.len())
            .collect();
        if defined.is_empty() {
            continue;
        }
        if !defined.contains(&arity) {
            return Err(RuleError::whole(format!(
                "{hook} takes {arity} parameters, not {}",
                defined[0]
            )));
        }
        hooks.push(hook);
    }
    if hooks.is_empty() {
        return Err(RuleError::whole(
            "defines none of the hooks eligible(customer, item, ctx), score(customer, item, ctx, score), on_event(customer, event)",
        ));
    }
    let mut scope = Scope::new();
    for name in DRIVER_VARIABLES {
        scope.push(name, ());
    }
    let driver = |text: String| {
        engine
            .compile_with_scope(&scope, text)
            .map(|driver| ast.merge(&driver))
            .map_err(|e| RuleError::whole(format!("internal driver: {e}")))
    };
    let (eligible, score) = (hooks.contains(&"eligible"), hooks.contains(&"score"));
    let decide = if eligible || score {
        Some(driver(decide_driver(eligible, score))?)
    } else {
        None
    };
    let compiled = if decide.is_some() {
        compiled::Program::translate(&ast, &foreign_natives(engine)).map(Arc::new)
    } else {
        None
    };
    let event = if hooks.contains(&"on_event") {
        Some(driver("on_event(__customer, __event)".into())?)
    } else {
        None
    };
    Ok(Rule {
        meta,
        hooks,
        ast,
        decide,
        event,
        compiled,
    })
}

fn string(name: &str, value: Dynamic) -> Result<String, RuleError> {
    value
        .into_string()
        .map_err(|_| RuleError::whole(format!("{name} must be a string")))
}

/// The result of checking one file.
pub struct Checked {
    pub path: PathBuf,
    pub result: Result<Rule, RuleError>,
}

/// The `*.rhai` files of `dir`, in name order.
pub fn rhai_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rhai") && p.is_file())
        .collect();
    paths.sort();
    Ok(paths)
}

/// The file's name without `.rhai`: a rule's default name, a plugin's module name.
pub fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Compiles every `*.rhai` file in `dir`, in name order, with `engine` (which holds the
/// plugins rules may import).
pub fn check_dir(engine: &Engine, dir: &Path) -> std::io::Result<Vec<Checked>> {
    rhai_files(dir)?
        .into_iter()
        .map(|path| {
            let source = std::fs::read_to_string(&path)?;
            Ok(Checked {
                result: compile(engine, &stem(&path), &source),
                path,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_compiles_with_its_metadata_and_hooks() {
        let source = r#"
            const NAME = "vip boost";
            const PRIORITY = 10;
            const PLACEMENTS = ["homepage_hero", "sidebar"];
            const ENABLED = false;
            fn eligible(customer, item, ctx) { true }
            fn score(customer, item, ctx, score) { score * 2.0 }
        "#;
        let rule = compile(&engine(), "file", source).unwrap();
        assert_eq!(
            rule.meta,
            RuleMeta {
                name: "vip boost".into(),
                priority: 10,
                placements: vec!["homepage_hero".into(), "sidebar".into()],
                enabled: false,
            }
        );
        assert_eq!(rule.hooks, vec!["eligible", "score"]);
    }

    #[test]
    fn errors_carry_line_and_column() {
        let cases = [
            ("fn eligible(c, i, x) {\n  let x = ;\n}", (2, 11)),
            (
                "fn eligible(c, i, x) { true }\nfn score(c, i, x) { 1.0 }",
                (0, 0),
            ),
            ("const X = 1;", (0, 0)),
            ("fn eligible(c, i, x) { eval(\"true\") }", (1, 24)),
            (
                "const PRIORITY = \"high\";\nfn eligible(c, i, x) { true }",
                (0, 0),
            ),
        ];
        for (source, (line, column)) in cases {
            let err = compile(&engine(), "r", source).unwrap_err();
            assert_eq!((err.line, err.column), (line, column), "{source}: {err}");
            assert!(!err.message.is_empty());
        }
    }

    #[test]
    fn evaluation_is_bounded() {
        let engine = engine();
        let rule = compile(&engine, "r", "fn eligible(c, i, x) { loop { } }").unwrap();
        let mut scope = rhai::Scope::new();
        let result =
            engine.call_fn::<bool>(&mut scope, &rule.ast, "eligible", (1_i64, 2_i64, 3_i64));
        assert!(
            result.is_err(),
            "an endless loop is stopped by the operations limit"
        );
    }

    #[test]
    fn the_committed_rules_compile() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let natives = Natives::builtin();
        let (plugins, errors) =
            Plugins::load_dir(&engine_with(&natives, None), &root.join("plugins"));
        assert!(errors.is_empty(), "{errors:?}");
        let engine = std::sync::Arc::new(engine_with(&natives, Some(&plugins)));
        let dir = root.join("rules");
        for checked in check_dir(&engine, &dir).unwrap() {
            if let Err(e) = checked.result {
                panic!("{}:{e}", checked.path.display());
            }
        }
        for report in testing::run_dir(&engine, &dir).unwrap() {
            assert!(
                report.failed.is_empty() && report.passed > 0,
                "{}: {:?}",
                report.path.display(),
                report.failed
            );
        }
    }
}
