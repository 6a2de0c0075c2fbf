//! Plugins: `plugins/*.rhai`, modules of reusable functions that rules `import` by file
//! name (`import "scoring" as s; ... s::boost(x)`). They are compiled and evaluated once,
//! in the same sandbox as rules, and are the only modules a script can import: there
//! is no access to files, so `import "../anything"` is simply an unknown module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rhai::module_resolvers::StaticModuleResolver;
use rhai::{Engine, Module, Scope};

use super::{describe, with_deadline, RuleError};

/// The longest a plugin's top level may run when it is loaded.
const LOAD_BUDGET: Duration = Duration::from_secs(1);

/// One compiled plugin.
#[derive(Clone)]
pub struct Plugin {
    pub name: String,
    pub source: String,
    pub module: Arc<Module>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("name", &self.name).finish()
    }
}

/// The loaded plugins, by name.
#[derive(Debug, Clone, Default)]
pub struct Plugins {
    plugins: BTreeMap<String, Plugin>,
}

impl Plugins {
    /// Compiles `source` as the plugin `name` with `engine` (a sandboxed engine without
    /// plugins: plugins do not import each other) and evaluates its top level.
    pub fn compile(engine: &Engine, name: &str, source: &str) -> Result<Plugin, RuleError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(RuleError::whole(format!(
                "plugin name '{name}' must be letters, digits, '_' or '-'"
            )));
        }
        let ast = engine.compile(source).map_err(|e| {
            let position = e.position();
            RuleError::at(position, e.err_type().to_string())
        })?;
        let module = with_deadline(Instant::now() + LOAD_BUDGET, || {
            Module::eval_ast_as_new(Scope::new(), &ast, engine)
        })
        .map_err(|e| RuleError::at(e.position(), describe(&e)))?;
        Ok(Plugin {
            name: name.to_owned(),
            source: source.to_owned(),
            module: Arc::new(module),
        })
    }

    /// Loads every `*.rhai` file of `dir`. A plugin that does not compile is left out and
    /// reported with its path; a missing directory means no plugins.
    pub fn load_dir(engine: &Engine, dir: &Path) -> (Plugins, Vec<(PathBuf, RuleError)>) {
        let mut plugins = Plugins::default();
        let mut errors = Vec::new();
        let Ok(paths) = super::rhai_files(dir) else {
            return (plugins, errors);
        };
        for path in paths {
            let name = super::stem(&path);
            let result = std::fs::read_to_string(&path)
                .map_err(|e| RuleError::whole(format!("cannot read: {e}")))
                .and_then(|source| Plugins::compile(engine, &name, &source));
            match result {
                Ok(plugin) => plugins.insert(plugin),
                Err(e) => errors.push((path, e)),
            }
        }
        (plugins, errors)
    }

    pub fn insert(&mut self, plugin: Plugin) {
        self.plugins.insert(plugin.name.clone(), plugin);
    }

    pub fn get(&self, name: &str) -> Option<&Plugin> {
        self.plugins.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Plugin> {
        self.plugins.values()
    }

    /// Whether any plugin may count impressions (decisions then load them).
    pub fn use_impressions(&self) -> bool {
        self.plugins
            .values()
            .any(|p| p.source.contains("impressions"))
    }

    /// The resolver that lets scripts import these plugins and nothing else.
    pub fn resolver(&self) -> StaticModuleResolver {
        let mut resolver = StaticModuleResolver::new();
        for plugin in self.plugins.values() {
            resolver.insert(plugin.name.clone(), plugin.module.as_ref().clone());
        }
        resolver
    }
}
