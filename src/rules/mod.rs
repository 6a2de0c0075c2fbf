//! Business rules in Rhai: the one hardened engine, and rule files compiled and checked
//! with their metadata.
//!
//! The only module that knows rhai. This first part compiles and checks rules
//! (`tailor rules check DIR`); running them inside decisions, plugins, hot reload and the
//! GraphQL lifecycle build on it.

use std::path::{Path, PathBuf};

use rhai::{Dynamic, Engine, AST};

/// Most operations one evaluation may perform before it is stopped.
const MAX_OPERATIONS: u64 = 100_000;
const MAX_CALL_LEVELS: usize = 16;
const MAX_EXPR_DEPTH: usize = 32;
const MAX_FN_EXPR_DEPTH: usize = 32;
const MAX_STRING_SIZE: usize = 10_000;
const MAX_ARRAY_SIZE: usize = 1_000;
const MAX_MAP_SIZE: usize = 1_000;
const MAX_VARIABLES: usize = 256;

/// The hooks a rule may define, with their arity.
pub const HOOKS: [(&str, usize); 3] = [("eligible", 3), ("score", 4), ("on_event", 2)];

/// Builds the sandboxed engine every rule runs in: bounded operations, call depth,
/// expression depth, string/array/map sizes and variables; no `eval`, no printing, no
/// modules (plugins come with their own resolver); undeclared variables are errors.
pub fn engine() -> Engine {
    let mut engine = Engine::new();
    engine
        .set_max_operations(MAX_OPERATIONS)
        .set_max_call_levels(MAX_CALL_LEVELS)
        .set_max_expr_depths(MAX_EXPR_DEPTH, MAX_FN_EXPR_DEPTH)
        .set_max_string_size(MAX_STRING_SIZE)
        .set_max_array_size(MAX_ARRAY_SIZE)
        .set_max_map_size(MAX_MAP_SIZE)
        .set_max_variables(MAX_VARIABLES)
        .set_max_modules(0)
        .set_strict_variables(true);
    engine.disable_symbol("eval");
    engine.on_print(|_| {});
    engine.on_debug(|_, _, _| {});
    engine
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
    pub ast: AST,
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
}

/// Compiles one rule; `default_name` is used when the script declares no `NAME`.
pub fn compile(engine: &Engine, default_name: &str, source: &str) -> Result<Rule, RuleError> {
    let ast = engine.compile(source).map_err(|e| {
        let pos = e.position();
        RuleError {
            line: pos.line().unwrap_or(0),
            column: pos.position().unwrap_or(0),
            message: e.err_type().to_string(),
        }
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
    Ok(Rule { meta, hooks, ast })
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

/// Compiles every `*.rhai` file in `dir`, in name order.
pub fn check_dir(dir: &Path) -> std::io::Result<Vec<Checked>> {
    let engine = engine();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let source = std::fs::read_to_string(&path)?;
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(Checked {
                result: compile(&engine, &stem, &source),
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
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
        for checked in check_dir(&dir).unwrap() {
            if let Err(e) = checked.result {
                panic!("{}:{e}", checked.path.display());
            }
        }
    }
}
