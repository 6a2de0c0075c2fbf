//! The compiled fast path of the decision hooks. When a rule is compiled, its `eligible`
//! and `score` hooks, with the script functions they call (plugin functions included),
//! are translated from the Rhai AST into a small tree ([`Node`]) that [`Program::run`]
//! evaluates natively, without the interpreter's cost per call.
//!
//! Only a loop-free, recursion-free subset of the language is translated: literals,
//! parameters and `let` locals, `=`, `if`/`else`, `return`, blocks, `!`, unary `-`,
//! `&&`, `||`, `??`, comparisons and `+ - * / %`, array literals, `type_of`, `pin()`,
//! calls of script functions, and the host API's properties and methods. A rule outside
//! the subset is not translated and runs in Rhai as before.
//!
//! At run time, anything the evaluator does not do exactly as Rhai does (a type
//! combination it does not implement, an error of any kind, a value over the sandbox's
//! size limits) makes it give up ([`Bail`]); the caller then runs the rule in Rhai, so
//! verdicts and error messages are always Rhai's.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::OnceLock;

use rhai::{
    ASTFlags, ASTNode, Dynamic, Expr, FnAccess, FnCallExpr, ImmutableString, Position,
    ScriptFuncDef, Stmt, AST,
};

use super::host::{self, CtxData, CustomerData, ItemView, Time};
use super::{MAX_ARRAY_SIZE, MAX_MAP_SIZE, MAX_STRING_SIZE};
use crate::features::Window;

/// Deepest chain of script calls translated (the sandbox allows 16 levels).
const MAX_DEPTH: usize = 8;
/// Most local variables over all translated functions (the sandbox allows 256).
const MAX_SLOTS: usize = 128;

/// The evaluator gave up: the caller runs the rule in Rhai.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bail;

/// A translated rule: its functions and which of them are the hooks.
#[derive(Debug)]
pub struct Program {
    fns: Vec<Func>,
    eligible: Option<usize>,
    score: Option<usize>,
    /// An upper bound of the operations Rhai counts for one candidate (both hooks and
    /// the driver): a decision whose bound nears the sandbox's budget runs in Rhai.
    cost: u64,
}

#[derive(Debug)]
struct Func {
    params: usize,
    slots: usize,
    body: Vec<Node>,
}

#[derive(Debug, Clone)]
enum Lit {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Char(char),
    Str(ImmutableString),
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, Copy)]
enum Method {
    InSegment,
    Impressions,
    Feature,
    HasTag,
    Attr,
    Contains,
    Len,
    IsEmpty,
    Get,
}

#[derive(Debug)]
enum Node {
    Lit(Lit),
    Local(usize),
    Let(usize, Box<Node>),
    Assign(usize, Box<Node>),
    Block(Vec<Node>),
    If(Box<Node>, Box<Node>, Box<Node>),
    Return(Box<Node>),
    Not(Box<Node>),
    Neg(Box<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
    Coalesce(Vec<Node>),
    Binary(Op, Box<Node>, Box<Node>),
    Call(usize, Vec<Node>),
    Prop(Box<Node>, ImmutableString),
    Index(Box<Node>, Box<Node>),
    Method(Box<Node>, Method, Vec<Node>),
    Array(Vec<Node>),
    TypeOf(Box<Node>),
    Pin,
}

/// Where a function's unqualified calls resolve: the rule's own functions, or those of
/// plugin `n` (an index into [`Translator::plugins`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lib {
    Rule,
    Plugin(usize),
}

impl Lib {
    fn key(self) -> usize {
        match self {
            Lib::Rule => 0,
            Lib::Plugin(n) => n + 1,
        }
    }
}

struct Translator<'a> {
    ast: &'a AST,
    /// Each imported plugin's functions, as an AST (function bodies are reached by
    /// walking one).
    plugins: &'a [AST],
    /// Import alias → index into `plugins`.
    imports: HashMap<&'a str, usize>,
    /// Names of natives an application registered: calls of them are not translated.
    foreign: Vec<String>,
    fns: Vec<Option<Func>>,
    costs: Vec<u64>,
    depths: Vec<usize>,
    done: HashMap<(usize, String, usize), usize>,
    slots: usize,
}

/// One function's translation state: its variables in scope, innermost last.
struct Frame {
    scope: Vec<(ImmutableString, usize, bool)>,
    slots: usize,
    cost: u64,
    depth: usize,
}

type Tr<T> = Option<T>;

impl Program {
    /// Translates the decision hooks of `ast` (a rule compiled self-contained); `None`
    /// when the rule is outside the subset. `foreign` are the names of natives an
    /// application added.
    pub fn translate(ast: &AST, foreign: &[String]) -> Option<Program> {
        let resolver = ast.resolver();
        let mut plugins: Vec<AST> = Vec::new();
        let mut aliases: Vec<(&str, usize)> = Vec::new();
        for stmt in ast.statements() {
            match stmt {
                Stmt::Noop(..) => {}
                Stmt::Var(x, flags, _) if !flags.contains(ASTFlags::EXPORTED) => {
                    if !x.1.is_constant() {
                        return None;
                    }
                }
                Stmt::Import(x, _) => {
                    let Expr::StringConstant(path, _) = &x.0 else {
                        return None;
                    };
                    let module = resolver?
                        .iter()
                        .find(|(name, _)| *name == path.as_str())
                        .map(|(_, m)| m.clone())?;
                    if !x.1.name.is_empty() {
                        aliases.push((x.1.name.as_str(), plugins.len()));
                        plugins.push(AST::new(Vec::<Stmt>::new(), module));
                    }
                }
                _ => return None,
            }
        }
        if !bodies_are_located(ast) || !plugins.iter().all(bodies_are_located) {
            return None;
        }
        let mut tr = Translator {
            ast,
            plugins: &plugins,
            imports: aliases.into_iter().collect(),
            foreign: foreign.to_vec(),
            fns: Vec::new(),
            costs: Vec::new(),
            depths: Vec::new(),
            done: HashMap::new(),
            slots: 0,
        };
        let eligible = match tr.rule_fn("eligible", 3) {
            Some(def) => Some(tr.function(Lib::Rule, def)?),
            None => None,
        };
        let score = match tr.rule_fn("score", 4) {
            Some(def) => Some(tr.function(Lib::Rule, def)?),
            None => None,
        };
        if eligible.is_none() && score.is_none() {
            return None;
        }
        let cost = 32 + eligible.map_or(0, |f| tr.costs[f]) + score.map_or(0, |f| tr.costs[f]);
        let fns = tr.fns.into_iter().collect::<Option<Vec<_>>>()?;
        Some(Program {
            fns,
            eligible,
            score,
            cost,
        })
    }

    /// An upper bound of the operations Rhai would count for `items` candidates.
    pub fn cost(&self, items: usize) -> u64 {
        self.cost.saturating_mul(items as u64)
    }
}

impl<'a> Translator<'a> {
    fn lib_ast(&self, lib: Lib) -> &'a AST {
        match lib {
            Lib::Rule => self.ast,
            Lib::Plugin(n) => &self.plugins[n],
        }
    }

    fn rule_fn(&self, name: &str, arity: usize) -> Option<&'a ScriptFuncDef> {
        self.lib_fn(Lib::Rule, name, arity)
    }

    fn lib_fn(&self, lib: Lib, name: &str, arity: usize) -> Option<&'a ScriptFuncDef> {
        self.lib_ast(lib)
            .iter_fn_def()
            .find(|f| f.name == name && f.params.len() == arity)
            .map(|f| f.as_ref())
    }

    /// Translates one script function (once), refusing recursion.
    fn function(&mut self, lib: Lib, def: &'a ScriptFuncDef) -> Tr<usize> {
        if def.this_type.is_some() {
            return None;
        }
        let key = (lib.key(), def.name.to_string(), def.params.len());
        if let Some(&id) = self.done.get(&key) {
            // Still being translated: a recursive call.
            return self.fns[id].as_ref().map(|_| id);
        }
        let id = self.fns.len();
        self.fns.push(None);
        self.costs.push(0);
        self.depths.push(0);
        self.done.insert(key, id);
        let mut frame = Frame {
            scope: Vec::new(),
            slots: 0,
            cost: 1,
            depth: 0,
        };
        for param in &def.params {
            let slot = frame.slots;
            frame.slots += 1;
            frame.scope.push((param.clone(), slot, false));
        }
        let body = self.body(lib, &mut frame, def)?;
        self.slots += frame.slots;
        if self.slots > MAX_SLOTS || frame.depth + 1 > MAX_DEPTH {
            return None;
        }
        self.fns[id] = Some(Func {
            params: def.params.len(),
            slots: frame.slots,
            body,
        });
        self.costs[id] = frame.cost;
        self.depths[id] = frame.depth + 1;
        Some(id)
    }

    /// Translates the statements of `def`'s body, in order. The body is not reachable
    /// from the definition itself: its statements are those the walk of its AST meets at
    /// the top of a function, within the body's span (see [`bodies_are_located`]).
    fn body(&mut self, lib: Lib, frame: &mut Frame, def: &ScriptFuncDef) -> Tr<Vec<Node>> {
        let span = (def.body.start_position(), def.body.end_position());
        let ast = self.lib_ast(lib);
        let top = ast.statements().len();
        let mut seen = 0;
        let mut nodes = Some(Vec::new());
        ast.walk(&mut |path: &[ASTNode]| {
            let [ASTNode::Stmt(stmt)] = path else {
                return true;
            };
            seen += 1;
            if seen <= top || !within(stmt.position(), span) {
                return true;
            }
            match self.stmt(lib, frame, stmt) {
                Some(node) => {
                    if let Some(nodes) = nodes.as_mut() {
                        nodes.push(node);
                    }
                    true
                }
                None => {
                    nodes = None;
                    false
                }
            }
        });
        nodes
    }

    fn block(&mut self, lib: Lib, frame: &mut Frame, stmts: &[Stmt]) -> Tr<Vec<Node>> {
        let mark = frame.scope.len();
        let nodes = stmts
            .iter()
            .map(|s| self.stmt(lib, frame, s))
            .collect::<Option<Vec<_>>>();
        frame.scope.truncate(mark);
        nodes
    }

    fn stmt(&mut self, lib: Lib, frame: &mut Frame, stmt: &Stmt) -> Tr<Node> {
        frame.cost += 1;
        Some(match stmt {
            Stmt::Noop(..) => Node::Lit(Lit::Unit),
            Stmt::Expr(e) => self.expr(lib, frame, e)?,
            Stmt::FnCall(call, _) => self.call(lib, frame, call)?,
            Stmt::Block(b) => Node::Block(self.block(lib, frame, b.statements())?),
            Stmt::If(x, _) => {
                let cond = self.expr(lib, frame, &x.expr)?;
                let then = Node::Block(self.block(lib, frame, x.body.statements())?);
                let other = Node::Block(self.block(lib, frame, x.branch.statements())?);
                Node::If(Box::new(cond), Box::new(then), Box::new(other))
            }
            Stmt::Var(x, flags, _) => {
                if flags.contains(ASTFlags::EXPORTED) {
                    return None;
                }
                let value = self.expr(lib, frame, &x.1)?;
                let slot = frame.slots;
                frame.slots += 1;
                frame
                    .scope
                    .push((x.0.name.clone(), slot, flags.contains(ASTFlags::CONSTANT)));
                Node::Let(slot, Box::new(value))
            }
            Stmt::Assignment(x) => {
                let Expr::Variable(v, _, _) = &x.1.lhs else {
                    return None;
                };
                if !v.2.is_empty() {
                    return None;
                }
                let &(_, slot, constant) = frame.scope.iter().rev().find(|(n, ..)| *n == v.1)?;
                if constant {
                    return None;
                }
                let value = self.expr(lib, frame, &x.1.rhs)?;
                // `x op= y` (the optimizer also writes `x = x op y` so) is `x = x op y` on
                // the types the evaluator implements.
                let value = match x.0.get_op_assignment_info() {
                    None => value,
                    Some((.., op, _)) => {
                        Node::Binary(operator(op)?, Box::new(Node::Local(slot)), Box::new(value))
                    }
                };
                Node::Assign(slot, Box::new(value))
            }
            Stmt::Return(value, flags, _) => {
                // `throw` is a return that breaks out.
                if flags.contains(ASTFlags::BREAK) {
                    return None;
                }
                Node::Return(Box::new(match value {
                    Some(e) => self.expr(lib, frame, e)?,
                    None => Node::Lit(Lit::Unit),
                }))
            }
            _ => return None,
        })
    }

    fn exprs(&mut self, lib: Lib, frame: &mut Frame, exprs: &[Expr]) -> Tr<Vec<Node>> {
        exprs.iter().map(|e| self.expr(lib, frame, e)).collect()
    }

    fn expr(&mut self, lib: Lib, frame: &mut Frame, expr: &Expr) -> Tr<Node> {
        frame.cost += 1;
        Some(match expr {
            Expr::Unit(_) => Node::Lit(Lit::Unit),
            Expr::BoolConstant(b, _) => Node::Lit(Lit::Bool(*b)),
            Expr::IntegerConstant(i, _) => Node::Lit(Lit::Int(*i)),
            Expr::FloatConstant(f, _) => Node::Lit(Lit::Float(**f)),
            Expr::CharConstant(c, _) => Node::Lit(Lit::Char(*c)),
            Expr::StringConstant(s, _) => Node::Lit(Lit::Str(s.clone())),
            Expr::DynamicConstant(d, _) => literal(d)?,
            Expr::Array(items, _) => {
                if items.len() > MAX_ARRAY_SIZE {
                    return None;
                }
                Node::Array(self.exprs(lib, frame, items)?)
            }
            Expr::Variable(v, _, _) => {
                if !v.2.is_empty() {
                    return None;
                }
                let &(_, slot, _) = frame.scope.iter().rev().find(|(n, ..)| *n == v.1)?;
                Node::Local(slot)
            }
            Expr::Stmt(b) => Node::Block(self.block(lib, frame, b.statements())?),
            Expr::And(x, _) => Node::And(self.exprs(lib, frame, x)?),
            Expr::Or(x, _) => Node::Or(self.exprs(lib, frame, x)?),
            Expr::Coalesce(x, _) => Node::Coalesce(self.exprs(lib, frame, x)?),
            Expr::FnCall(call, _) => self.call(lib, frame, call)?,
            Expr::Dot(x, _, _) => {
                let base = self.expr(lib, frame, &x.lhs)?;
                self.chain(lib, frame, base, &x.rhs)?
            }
            Expr::Index(x, _, _) => {
                if matches!(x.rhs, Expr::Dot(..) | Expr::Index(..)) {
                    return None;
                }
                let base = self.expr(lib, frame, &x.lhs)?;
                let index = self.expr(lib, frame, &x.rhs)?;
                Node::Index(Box::new(base), Box::new(index))
            }
            _ => return None,
        })
    }

    /// The right side of a `.`: properties, method calls and indexing, applied to `base`.
    fn chain(&mut self, lib: Lib, frame: &mut Frame, base: Node, rhs: &Expr) -> Tr<Node> {
        frame.cost += 1;
        Some(match rhs {
            Expr::Property(p, _) => {
                let name = &p.2;
                if self.is_foreign(name) {
                    return None;
                }
                Node::Prop(Box::new(base), name.clone())
            }
            Expr::MethodCall(call, _) => {
                if !call.namespace.is_empty() || self.is_foreign(&call.name) {
                    return None;
                }
                // A script function of that name could be called as a method (with the
                // object as `this` or as its first parameter).
                let arity = call.args.len();
                if [arity, arity + 1].iter().any(|&n| {
                    self.lib_fn(lib, &call.name, n).is_some()
                        || self.lib_fn(Lib::Rule, &call.name, n).is_some()
                }) {
                    return None;
                }
                let method = match (call.name.as_str(), call.args.len()) {
                    ("in_segment", 1) => Method::InSegment,
                    ("impressions", 1 | 2) => Method::Impressions,
                    ("feature", 1) => Method::Feature,
                    ("has_tag", 1) => Method::HasTag,
                    ("attr", 1) => Method::Attr,
                    ("contains", 1) => Method::Contains,
                    ("len", 0) => Method::Len,
                    ("is_empty", 0) => Method::IsEmpty,
                    ("get", 1) => Method::Get,
                    _ => return None,
                };
                let args = self.exprs(lib, frame, &call.args)?;
                Node::Method(Box::new(base), method, args)
            }
            Expr::Dot(x, _, _) => {
                let inner = self.chain(lib, frame, base, &x.lhs)?;
                self.chain(lib, frame, inner, &x.rhs)?
            }
            Expr::Index(x, _, _) => {
                if matches!(x.rhs, Expr::Dot(..) | Expr::Index(..)) {
                    return None;
                }
                let inner = self.chain(lib, frame, base, &x.lhs)?;
                let index = self.expr(lib, frame, &x.rhs)?;
                Node::Index(Box::new(inner), Box::new(index))
            }
            _ => return None,
        })
    }

    fn is_foreign(&self, name: &str) -> bool {
        self.foreign.iter().any(|f| f == name)
    }

    fn call(&mut self, lib: Lib, frame: &mut Frame, call: &FnCallExpr) -> Tr<Node> {
        frame.cost += 1;
        let name = call.name.as_str();
        let arity = call.args.len();
        if call.op_token.is_some() {
            let mut args = self.exprs(lib, frame, &call.args)?.into_iter();
            return Some(match (name, arity) {
                ("!", 1) => Node::Not(Box::new(args.next()?)),
                ("-", 1) => Node::Neg(Box::new(args.next()?)),
                (_, 2) => {
                    let op = binary_op(name)?;
                    let (lhs, rhs) = (args.next()?, args.next()?);
                    Node::Binary(op, Box::new(lhs), Box::new(rhs))
                }
                _ => return None,
            });
        }
        if !call.namespace.is_empty() {
            // `alias::function(...)`: a public function of an imported plugin.
            if call.namespace.path.len() != 1 || !matches!(lib, Lib::Rule) {
                return None;
            }
            let plugin = Lib::Plugin(*self.imports.get(call.namespace.root())?);
            let def = self
                .lib_fn(plugin, name, arity)
                .filter(|f| f.access == FnAccess::Public)?;
            return self.script_call(plugin, frame, lib, def, &call.args);
        }
        let own = self.lib_fn(lib, name, arity);
        if let Lib::Plugin(_) = lib {
            // Rhai would also see the rule's functions from inside a plugin's: leave
            // such calls to it.
            if self.rule_fn(name, arity).is_some() {
                return None;
            }
        }
        if let Some(def) = own {
            return self.script_call(lib, frame, lib, def, &call.args);
        }
        if self.is_foreign(name) {
            return None;
        }
        let mut args = self.exprs(lib, frame, &call.args)?.into_iter();
        Some(match (name, arity) {
            ("pin", 0) => Node::Pin,
            ("type_of", 1) => Node::TypeOf(Box::new(args.next()?)),
            // `x in list`.
            ("contains", 2) => {
                let list = args.next()?;
                Node::Method(Box::new(list), Method::Contains, vec![args.next()?])
            }
            _ => return None,
        })
    }

    fn script_call(
        &mut self,
        callee_lib: Lib,
        frame: &mut Frame,
        lib: Lib,
        def: &'a ScriptFuncDef,
        args: &[Expr],
    ) -> Tr<Node> {
        let args = self.exprs(lib, frame, args)?;
        let id = self.function(callee_lib, def)?;
        frame.cost += self.costs[id] + 2;
        frame.depth = frame.depth.max(self.depths[id]);
        Some(Node::Call(id, args))
    }
}

fn binary_op(name: &str) -> Option<Op> {
    Some(match name {
        "+" => Op::Add,
        "-" => Op::Sub,
        "*" => Op::Mul,
        "/" => Op::Div,
        "%" => Op::Rem,
        "==" => Op::Eq,
        "!=" => Op::Ne,
        "<" => Op::Lt,
        "<=" => Op::Le,
        ">" => Op::Gt,
        ">=" => Op::Ge,
        _ => return None,
    })
}

/// The arithmetic operator of an op-assignment.
fn operator(token: &rhai::Token) -> Option<Op> {
    match binary_op(token.literal_syntax())? {
        op @ (Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Rem) => Some(op),
        _ => None,
    }
}

/// Whether `pos` lies in `span` (both ends included).
fn within(pos: Position, span: (Position, Position)) -> bool {
    let at = |p: Position| Some((p.line()?, p.position().unwrap_or(0)));
    match (at(pos), at(span.0), at(span.1)) {
        (Some(p), Some(start), Some(end)) => start <= p && p <= end,
        _ => false,
    }
}

/// Whether every statement the walk of `ast` meets at the top of a function lies in
/// the span of one function body: otherwise a body could lose a statement, and the
/// rule is left to Rhai.
fn bodies_are_located(ast: &AST) -> bool {
    let spans: Vec<(Position, Position)> = ast
        .iter_fn_def()
        .map(|f| (f.body.start_position(), f.body.end_position()))
        .collect();
    let top = ast.statements().len();
    let mut seen = 0;
    ast.walk(&mut |path: &[ASTNode]| {
        let [ASTNode::Stmt(stmt)] = path else {
            return true;
        };
        seen += 1;
        seen <= top || spans.iter().any(|&span| within(stmt.position(), span))
    })
}

fn literal(value: &Dynamic) -> Tr<Node> {
    Some(Node::Lit(if value.is_unit() {
        Lit::Unit
    } else if let Ok(b) = value.as_bool() {
        Lit::Bool(b)
    } else if let Ok(i) = value.as_int() {
        Lit::Int(i)
    } else if let Ok(f) = value.as_float() {
        Lit::Float(f)
    } else if let Ok(c) = value.as_char() {
        Lit::Char(c)
    } else if value.is_string() {
        Lit::Str(value.clone().into_immutable_string().ok()?)
    } else if value.is_array() {
        let items = value.read_lock::<rhai::Array>()?;
        if items.len() > MAX_ARRAY_SIZE {
            return None;
        }
        return Some(Node::Array(
            items.iter().map(literal).collect::<Option<Vec<_>>>()?,
        ));
    } else {
        return None;
    }))
}

/// A value during evaluation; what the decision holds is borrowed, not copied.
#[derive(Clone)]
enum Val<'a> {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Char(char),
    Str(ImmutableString),
    /// An array or a map the decision holds (a trait).
    Ref(&'a Dynamic),
    /// Strings the decision holds (tags, segments), as a script array.
    Strs(&'a [String]),
    /// An array the script built.
    List(Rc<Vec<Val<'a>>>),
    Customer(&'a CustomerData),
    Traits(&'a CustomerData),
    Item(&'a ItemView),
    Ctx(&'a CtxData),
    Time(Time),
}

/// Rhai's type of a value, for its rules on mixed types.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unit,
    Bool,
    Int,
    Float,
    Char,
    Str,
    Array,
    Map,
    Host,
}

impl Val<'_> {
    fn kind(&self) -> Kind {
        match self {
            Val::Unit => Kind::Unit,
            Val::Bool(_) => Kind::Bool,
            Val::Int(_) => Kind::Int,
            Val::Float(_) => Kind::Float,
            Val::Char(_) => Kind::Char,
            Val::Str(_) => Kind::Str,
            Val::Ref(d) if d.is_map() => Kind::Map,
            Val::Ref(_) | Val::Strs(_) | Val::List(_) => Kind::Array,
            _ => Kind::Host,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Val::Unit => "()",
            Val::Bool(_) => "bool",
            Val::Int(_) => "i64",
            Val::Float(_) => "f64",
            Val::Char(_) => "char",
            Val::Str(_) => "string",
            Val::Ref(d) if d.is_map() => "map",
            Val::Ref(_) | Val::Strs(_) | Val::List(_) => "array",
            Val::Customer(_) => "Customer",
            Val::Traits(_) => "Traits",
            Val::Item(_) => "Item",
            Val::Ctx(_) => "Context",
            Val::Time(_) => "Time",
        }
    }

    fn string(&self) -> Result<&str, Bail> {
        match self {
            Val::Str(s) => Ok(s.as_str()),
            _ => Err(Bail),
        }
    }
}

/// A value the decision holds, as the evaluator sees it; arrays and maps over the
/// sandbox's limits give up (Rhai refuses them).
fn held(value: &Dynamic) -> Result<Val<'_>, Bail> {
    if value.is_unit() {
        Ok(Val::Unit)
    } else if let Ok(b) = value.as_bool() {
        Ok(Val::Bool(b))
    } else if let Ok(i) = value.as_int() {
        Ok(Val::Int(i))
    } else if let Ok(f) = value.as_float() {
        Ok(Val::Float(f))
    } else if value.is_string() {
        let s = value.clone().into_immutable_string().map_err(|_| Bail)?;
        if s.len() > MAX_STRING_SIZE {
            return Err(Bail);
        }
        Ok(Val::Str(s))
    } else if value.is_array() || value.is_map() {
        let mut sizes = (0, 0, 0);
        if !within_limits(value, &mut sizes) {
            return Err(Bail);
        }
        Ok(Val::Ref(value))
    } else {
        Err(Bail)
    }
}

/// Whether `value` stays within the sandbox's sizes, counted as Rhai does (nested arrays
/// and maps included), strings by bytes (never fewer than Rhai's count).
fn within_limits(value: &Dynamic, sizes: &mut (usize, usize, usize)) -> bool {
    if let Some(items) = value.read_lock::<rhai::Array>() {
        sizes.0 += items.len();
        for item in items.iter() {
            if !within_limits(item, sizes) {
                return false;
            }
        }
    } else if let Some(map) = value.read_lock::<rhai::Map>() {
        sizes.1 += map.len();
        for item in map.values() {
            if !within_limits(item, sizes) {
                return false;
            }
        }
    } else if value.is_string() {
        sizes.2 += value.read_lock::<ImmutableString>().map_or(0, |s| s.len());
    }
    sizes.0 <= MAX_ARRAY_SIZE && sizes.1 <= MAX_MAP_SIZE && sizes.2 <= MAX_STRING_SIZE
}

fn strings_within_limits(list: &[String]) -> bool {
    list.len() <= MAX_ARRAY_SIZE && list.iter().map(String::len).sum::<usize>() <= MAX_STRING_SIZE
}

/// How evaluation leaves a node other than with its value.
enum Stop<'a> {
    Return(Val<'a>),
    Bail,
}

impl From<Bail> for Stop<'_> {
    fn from(_: Bail) -> Self {
        Stop::Bail
    }
}

type Eval<'a> = Result<Val<'a>, Stop<'a>>;

/// One decision's evaluation state, with what does not depend on the item cached.
struct Machine<'a, 'p> {
    program: &'p Program,
    stack: Vec<Val<'a>>,
    local_time: Option<Time>,
    window: Option<(ImmutableString, Window)>,
    /// Impressions per item within a window, counted once per decision.
    shown: Option<(Window, HashMap<&'a str, i64>)>,
}

/// What one candidate's hooks answered.
pub enum Answer {
    Filter,
    Keep,
    Weight(f64),
}

impl Program {
    /// Runs the hooks over the candidates (`pinned` says which are pinned, `weights`
    /// their weights so far), as the interpreter's driver does; `Err(Bail)` when the
    /// interpreter must decide instead.
    pub fn run(
        &self,
        customer: &CustomerData,
        ctx: &CtxData,
        items: &[&ItemView],
        weights: &[f64],
        pinned: &[bool],
    ) -> Result<Vec<Answer>, Bail> {
        let mut machine = Machine {
            program: self,
            stack: Vec::with_capacity(32),
            local_time: None,
            window: None,
            shown: None,
        };
        let mut answers = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            if let Some(eligible) = self.eligible {
                let args = [Val::Customer(customer), Val::Item(item), Val::Ctx(ctx)];
                match machine.call(eligible, args)? {
                    Val::Bool(true) => {}
                    Val::Bool(false) => {
                        answers.push(Answer::Filter);
                        continue;
                    }
                    _ => return Err(Bail),
                }
            }
            match self.score {
                Some(score) if !pinned[i] => {
                    let args = [
                        Val::Customer(customer),
                        Val::Item(item),
                        Val::Ctx(ctx),
                        Val::Float(weights[i]),
                    ];
                    let weight = match machine.call(score, args)? {
                        Val::Float(f) => f,
                        Val::Int(n) => n as f64,
                        _ => return Err(Bail),
                    };
                    if weight.is_nan() || weight < 0.0 {
                        return Err(Bail);
                    }
                    answers.push(Answer::Weight(weight));
                }
                _ => answers.push(Answer::Keep),
            }
        }
        Ok(answers)
    }

    /// Calls one hook with `args` (for tests comparing it with the interpreter).
    #[cfg(test)]
    fn call_hook(
        &self,
        hook: &str,
        customer: &CustomerData,
        item: &ItemView,
        ctx: &CtxData,
        score: f64,
    ) -> Result<Dynamic, Bail> {
        let mut machine = Machine {
            program: self,
            stack: Vec::new(),
            local_time: None,
            window: None,
            shown: None,
        };
        let value = match hook {
            "eligible" => machine.call(
                self.eligible.ok_or(Bail)?,
                [Val::Customer(customer), Val::Item(item), Val::Ctx(ctx)],
            )?,
            _ => machine.call(
                self.score.ok_or(Bail)?,
                [
                    Val::Customer(customer),
                    Val::Item(item),
                    Val::Ctx(ctx),
                    Val::Float(score),
                ],
            )?,
        };
        Ok(match value {
            Val::Unit => Dynamic::UNIT,
            Val::Bool(b) => b.into(),
            Val::Int(i) => i.into(),
            Val::Float(f) => f.into(),
            Val::Char(c) => c.into(),
            Val::Str(s) => s.into(),
            _ => return Err(Bail),
        })
    }
}

impl<'a> Machine<'a, '_> {
    fn call<const N: usize>(&mut self, id: usize, args: [Val<'a>; N]) -> Result<Val<'a>, Bail> {
        let base = self.stack.len();
        self.stack.extend(args);
        self.enter(id, base)
    }

    /// Runs function `id` whose arguments are on the stack from `base`.
    fn enter(&mut self, id: usize, base: usize) -> Result<Val<'a>, Bail> {
        let program = self.program;
        let func = &program.fns[id];
        debug_assert_eq!(self.stack.len() - base, func.params);
        self.stack.resize(base + func.slots, Val::Unit);
        let result = self.block(&func.body, base);
        self.stack.truncate(base);
        match result {
            Ok(v) | Err(Stop::Return(v)) => Ok(v),
            Err(Stop::Bail) => Err(Bail),
        }
    }

    fn block(&mut self, nodes: &[Node], base: usize) -> Eval<'a> {
        let mut last = Val::Unit;
        for node in nodes {
            last = self.eval(node, base)?;
        }
        Ok(last)
    }

    fn boolean(&mut self, node: &Node, base: usize) -> Result<bool, Stop<'a>> {
        match self.eval(node, base)? {
            Val::Bool(b) => Ok(b),
            _ => Err(Stop::Bail),
        }
    }

    fn eval(&mut self, node: &Node, base: usize) -> Eval<'a> {
        Ok(match node {
            Node::Lit(lit) => match lit {
                Lit::Unit => Val::Unit,
                Lit::Bool(b) => Val::Bool(*b),
                Lit::Int(i) => Val::Int(*i),
                Lit::Float(f) => Val::Float(*f),
                Lit::Char(c) => Val::Char(*c),
                Lit::Str(s) => Val::Str(s.clone()),
            },
            Node::Local(slot) => self.stack[base + slot].clone(),
            Node::Let(slot, value) | Node::Assign(slot, value) => {
                let value = self.eval(value, base)?;
                self.stack[base + slot] = value;
                Val::Unit
            }
            Node::Block(nodes) => self.block(nodes, base)?,
            Node::If(cond, then, other) => {
                if self.boolean(cond, base)? {
                    self.eval(then, base)?
                } else {
                    self.eval(other, base)?
                }
            }
            Node::Return(value) => return Err(Stop::Return(self.eval(value, base)?)),
            Node::Not(x) => Val::Bool(!self.boolean(x, base)?),
            Node::Neg(x) => match self.eval(x, base)? {
                Val::Int(i) => Val::Int(i.checked_neg().ok_or(Bail)?),
                Val::Float(f) => Val::Float(-f),
                _ => return Err(Stop::Bail),
            },
            Node::And(xs) => {
                let mut value = true;
                for x in xs {
                    if !self.boolean(x, base)? {
                        value = false;
                        break;
                    }
                }
                Val::Bool(value)
            }
            Node::Or(xs) => {
                let mut value = false;
                for x in xs {
                    if self.boolean(x, base)? {
                        value = true;
                        break;
                    }
                }
                Val::Bool(value)
            }
            Node::Coalesce(xs) => {
                let mut value = Val::Unit;
                for x in xs {
                    value = self.eval(x, base)?;
                    if !matches!(value, Val::Unit) {
                        break;
                    }
                }
                value
            }
            Node::Binary(op, lhs, rhs) => {
                let lhs = self.eval(lhs, base)?;
                let rhs = self.eval(rhs, base)?;
                binary(*op, &lhs, &rhs)?
            }
            Node::Call(id, args) => {
                // Each argument's evaluation leaves the stack as it found it, so the
                // arguments land in the callee's first slots.
                let callee = self.stack.len();
                for arg in args {
                    let value = self.eval(arg, base)?;
                    self.stack.push(value);
                }
                self.enter(*id, callee)?
            }
            Node::Prop(target, name) => {
                let target = self.eval(target, base)?;
                self.property(target, name)?
            }
            Node::Index(target, index) => {
                let target = self.eval(target, base)?;
                let index = self.eval(index, base)?;
                match (target, index) {
                    (Val::Traits(c), Val::Str(name)) => {
                        c.trait_value(&name).map_or(Ok(Val::Unit), held)?
                    }
                    _ => return Err(Stop::Bail),
                }
            }
            Node::Method(target, method, args) => {
                let target = self.eval(target, base)?;
                let mut values: [Val<'a>; 2] = [Val::Unit, Val::Unit];
                for (slot, arg) in values.iter_mut().zip(args) {
                    *slot = self.eval(arg, base)?;
                }
                self.method(target, *method, &values[..args.len()])?
            }
            Node::Array(items) => {
                let mut values = Vec::with_capacity(items.len());
                for item in items {
                    values.push(self.eval(item, base)?);
                }
                Val::List(Rc::new(values))
            }
            Node::TypeOf(x) => Val::Str(type_name(self.eval(x, base)?.type_name())),
            Node::Pin => Val::Float(f64::INFINITY),
        })
    }

    fn property(&mut self, target: Val<'a>, name: &str) -> Result<Val<'a>, Bail> {
        Ok(match target {
            Val::Customer(c) => match name {
                "id" => Val::Str(c.id.as_str().into()),
                "known" => Val::Bool(c.known),
                "traits" => Val::Traits(c),
                "segments" if strings_within_limits(&c.segments) => Val::Strs(&c.segments),
                _ => return Err(Bail),
            },
            // Traits have no properties of their own: `traits.plan` is `traits["plan"]`.
            Val::Traits(c) => c.trait_value(name).map_or(Ok(Val::Unit), held)?,
            Val::Item(i) => {
                let item = i.item();
                match name {
                    "id" => Val::Str(i.id().clone()),
                    "type" => Val::Str(item.content_type.as_str().into()),
                    "title" => match item.title.as_deref() {
                        Some(t) => Val::Str(t.into()),
                        None => Val::Unit,
                    },
                    "tags" if strings_within_limits(&item.tags) => Val::Strs(&item.tags),
                    "placements" if strings_within_limits(&item.placements) => {
                        Val::Strs(&item.placements)
                    }
                    "segments" if strings_within_limits(&item.segments) => {
                        Val::Strs(&item.segments)
                    }
                    "priority" => Val::Int(i64::from(item.priority)),
                    "frequency_cap" => match item.frequency_cap {
                        Some(c) => Val::Int(i64::from(c)),
                        None => Val::Unit,
                    },
                    _ => return Err(Bail),
                }
            }
            Val::Ctx(x) => match name {
                "placement" => Val::Str(x.placement.as_str().into()),
                "content_type" => Val::Str(x.content_type.as_str().into()),
                "count" => Val::Int(x.count),
                "channel" => Val::Str(x.text("channel")),
                "device" => Val::Str(x.text("device")),
                "now" => Val::Time(x.now_time()),
                "local_time" => Val::Time(*self.local_time.get_or_insert_with(|| x.local_time())),
                _ => return Err(Bail),
            },
            Val::Time(t) => match name {
                "year" => Val::Int(t.year()),
                "month" => Val::Int(t.month()),
                "day" => Val::Int(t.day()),
                "hour" => Val::Int(t.hour()),
                "minute" => Val::Int(t.minute()),
                "weekday" => Val::Int(t.weekday()),
                "timestamp" => Val::Int(t.timestamp()),
                _ => return Err(Bail),
            },
            _ => return Err(Bail),
        })
    }

    fn window(&mut self, raw: &ImmutableString) -> Result<Window, Bail> {
        if let Some((cached, window)) = &self.window {
            if cached == raw {
                return Ok(*window);
            }
        }
        let window = host::window(raw).map_err(|_| Bail)?;
        self.window = Some((raw.clone(), window));
        Ok(window)
    }

    fn method(
        &mut self,
        target: Val<'a>,
        method: Method,
        args: &[Val<'a>],
    ) -> Result<Val<'a>, Bail> {
        Ok(match (target, method, args) {
            (Val::Customer(c), Method::InSegment, [name]) => {
                Val::Bool(c.in_segment(name.string()?))
            }
            (Val::Customer(c), Method::Feature, [name]) => Val::Float(c.feature(name.string()?)),
            (Val::Customer(c), Method::Impressions, [Val::Str(item), Val::Str(within)]) => {
                let window = self.window(within)?;
                let counts = match &mut self.shown {
                    Some((cached, counts)) if *cached == window => counts,
                    shown => &mut shown.insert((window, c.impressions_by_item(window))).1,
                };
                Val::Int(counts.get(item.as_str()).copied().unwrap_or(0))
            }
            (Val::Customer(c), Method::Impressions, [Val::Str(within)]) => {
                let window = self.window(within)?;
                Val::Int(c.impressions(None, window))
            }
            (Val::Item(i), Method::HasTag, [tag]) => Val::Bool(i.has_tag(tag.string()?)),
            (Val::Item(i), Method::Attr, [name]) => {
                let value = i.attr(name.string()?);
                scalar(&value)?
            }
            (Val::Traits(c), Method::Contains, [name]) => {
                Val::Bool(c.trait_value(name.string()?).is_some())
            }
            (Val::Traits(c), Method::Get, [Val::Str(name)]) => {
                c.trait_value(name).map_or(Ok(Val::Unit), held)?
            }
            (Val::Traits(c), Method::Len, []) => Val::Int(c.traits.len() as i64),
            (Val::Traits(c), Method::IsEmpty, []) => Val::Bool(c.traits.is_empty()),
            (list, Method::Contains, [value]) if list.kind() == Kind::Array => {
                Val::Bool(contains(&list, value)?)
            }
            (list, Method::Len, []) if list.kind() == Kind::Array => {
                Val::Int(array_len(&list) as i64)
            }
            (list, Method::IsEmpty, []) if list.kind() == Kind::Array => {
                Val::Bool(array_len(&list) == 0)
            }
            _ => return Err(Bail),
        })
    }
}

/// `type_of`'s answer as a script string, made once per process (rules compare it on
/// every candidate).
fn type_name(name: &'static str) -> ImmutableString {
    const NAMES: [&str; 13] = [
        "()", "bool", "i64", "f64", "char", "string", "map", "array", "Customer", "Traits", "Item",
        "Context", "Time",
    ];
    static STRINGS: OnceLock<Vec<ImmutableString>> = OnceLock::new();
    let strings = STRINGS.get_or_init(|| NAMES.iter().map(|&n| n.into()).collect());
    NAMES
        .iter()
        .position(|&n| n == name)
        .map_or_else(|| name.into(), |i| strings[i].clone())
}

/// A scalar Rhai value; arrays and maps give up.
fn scalar(value: &Dynamic) -> Result<Val<'static>, Bail> {
    match held(value)? {
        Val::Ref(_) => Err(Bail),
        Val::Unit => Ok(Val::Unit),
        Val::Bool(b) => Ok(Val::Bool(b)),
        Val::Int(i) => Ok(Val::Int(i)),
        Val::Float(f) => Ok(Val::Float(f)),
        Val::Str(s) => Ok(Val::Str(s)),
        _ => Err(Bail),
    }
}

fn array_len(list: &Val<'_>) -> usize {
    match list {
        Val::Ref(d) => d.read_lock::<rhai::Array>().map_or(0, |a| a.len()),
        Val::Strs(s) => s.len(),
        Val::List(l) => l.len(),
        _ => 0,
    }
}

/// `list.contains(value)`: Rhai compares with `==`, and values of different types are
/// not equal.
fn contains(list: &Val<'_>, value: &Val<'_>) -> Result<bool, Bail> {
    match list {
        Val::Strs(items) => match value {
            Val::Str(s) => Ok(items.iter().any(|i| i == s.as_str())),
            Val::Char(_) => Err(Bail),
            v if matches!(v.kind(), Kind::Host | Kind::Array | Kind::Map) => Err(Bail),
            _ => Ok(false),
        },
        Val::List(items) => {
            for item in items.iter() {
                if equals(item, value)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Val::Ref(d) => {
            let items = d.read_lock::<rhai::Array>().ok_or(Bail)?;
            for item in items.iter() {
                if equals(&held(item)?, value)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        _ => Err(Bail),
    }
}

fn equals(a: &Val<'_>, b: &Val<'_>) -> Result<bool, Bail> {
    match binary(Op::Eq, a, b)? {
        Val::Bool(b) => Ok(b),
        _ => Err(Bail),
    }
}

/// Rhai's built-in operators on its standard types (the engine's fast operators).
fn binary<'a>(op: Op, a: &Val<'a>, b: &Val<'a>) -> Result<Val<'a>, Bail> {
    use Op::*;
    let cmp = |o: std::cmp::Ordering| -> Result<Val<'a>, Bail> {
        Ok(Val::Bool(match op {
            Eq => o.is_eq(),
            Ne => o.is_ne(),
            Lt => o.is_lt(),
            Le => o.is_le(),
            Gt => o.is_gt(),
            Ge => o.is_ge(),
            _ => return Err(Bail),
        }))
    };
    Ok(match (a, b) {
        (Val::Int(x), Val::Int(y)) => {
            let (x, y) = (*x, *y);
            match op {
                Add => Val::Int(x.checked_add(y).ok_or(Bail)?),
                Sub => Val::Int(x.checked_sub(y).ok_or(Bail)?),
                Mul => Val::Int(x.checked_mul(y).ok_or(Bail)?),
                Div => Val::Int(x.checked_div(y).ok_or(Bail)?),
                Rem => Val::Int(x.checked_rem(y).ok_or(Bail)?),
                _ => return cmp(x.cmp(&y)),
            }
        }
        (Val::Float(_) | Val::Int(_), Val::Float(_) | Val::Int(_)) => {
            let float = |v: &Val<'_>| match v {
                Val::Float(f) => *f,
                Val::Int(i) => *i as f64,
                _ => 0.0,
            };
            float_op(op, float(a), float(b))
        }
        (Val::Bool(x), Val::Bool(y)) => match op {
            Add | Sub | Mul | Div | Rem => return Err(Bail),
            _ => return cmp(x.cmp(y)),
        },
        (Val::Str(x), Val::Str(y)) => match op {
            Add => {
                if x.len() + y.len() > MAX_STRING_SIZE {
                    return Err(Bail);
                }
                Val::Str(x + y)
            }
            Sub | Mul | Div | Rem => return Err(Bail),
            _ => return cmp(x.as_str().cmp(y.as_str())),
        },
        (Val::Char(x), Val::Char(y)) => match op {
            Add | Sub | Mul | Div | Rem => return Err(Bail),
            _ => return cmp(x.cmp(y)),
        },
        (Val::Unit, Val::Unit) => match op {
            Eq => Val::Bool(true),
            Ne | Lt | Le | Gt | Ge => Val::Bool(false),
            _ => return Err(Bail),
        },
        (Val::Unit, Val::Str(s)) | (Val::Str(s), Val::Unit) => match op {
            Add => Val::Str(s.clone()),
            Ne => Val::Bool(true),
            Eq | Lt | Le | Gt | Ge => Val::Bool(false),
            _ => return Err(Bail),
        },
        _ => {
            let (ka, kb) = (a.kind(), b.kind());
            // Host types may have operators of their own; arrays and maps have
            // registered `==`; a char and a string compare by their characters.
            if ka == kb
                || matches!(ka, Kind::Host | Kind::Char)
                || matches!(kb, Kind::Host | Kind::Char)
            {
                return Err(Bail);
            }
            // Rhai: values of different, non-numeric types are never equal or ordered.
            match op {
                Ne => Val::Bool(true),
                Eq | Lt | Le | Gt | Ge => Val::Bool(false),
                _ => return Err(Bail),
            }
        }
    })
}

/// Rhai's float operators, comparisons with its relative epsilon.
fn float_op<'a>(op: Op, x: f64, y: f64) -> Val<'a> {
    let max = if x * y == 0.0 {
        1.0
    } else {
        x.abs().max(y.abs())
    };
    let eps = f64::EPSILON;
    match op {
        Op::Add => Val::Float(x + y),
        Op::Sub => Val::Float(x - y),
        Op::Mul => Val::Float(x * y),
        Op::Div => Val::Float(x / y),
        Op::Rem => Val::Float(x % y),
        Op::Eq => Val::Bool(max == 0.0 || (x - y).abs() / max <= eps),
        Op::Ne => Val::Bool(max != 0.0 && (x - y).abs() / max > eps),
        Op::Gt => Val::Bool(max != 0.0 && (x - y) / max > eps),
        Op::Ge => Val::Bool(max == 0.0 || (x - y) / max > -eps),
        Op::Lt => Val::Bool(max != 0.0 && (y - x) / max > eps),
        Op::Le => Val::Bool(max == 0.0 || (y - x) / max > -eps),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use chrono::{DateTime, Utc};
    use rhai::{Dynamic, Scope};
    use serde_json::json;

    use super::*;
    use crate::content::ContentItem;
    use crate::decision::Impression;
    use crate::rules::host::{to_dynamic, CtxView, CustomerView};
    use crate::rules::runtime::{ActiveRule, RuleEffects, RuleSet};
    use crate::rules::{check_dir, compile, engine_with, Engine, Natives, Plugins, Rule};

    fn engine() -> Arc<Engine> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let natives = Natives::builtin();
        let (plugins, errors) =
            Plugins::load_dir(&engine_with(&natives, None), &root.join("plugins"));
        assert!(errors.is_empty(), "{errors:?}");
        Arc::new(engine_with(&natives, Some(&plugins)))
    }

    fn at(raw: &str) -> DateTime<Utc> {
        raw.parse().unwrap()
    }

    fn customers(now: DateTime<Utc>) -> Vec<CustomerView> {
        let customer = |id: &str, traits, segments: &[&str], known, shown: &[(&str, i64)]| {
            CustomerView(Arc::new(CustomerData {
                id: id.into(),
                known,
                traits: to_dynamic(&traits).cast(),
                features: [("engagement".to_string(), 0.7)].into_iter().collect(),
                segments: segments.iter().map(|s| s.to_string()).collect(),
                personalization: true,
                marketing: true,
                analytics: true,
                impressions: shown
                    .iter()
                    .map(|&(item, minutes)| Impression {
                        item_id: item.into(),
                        at: now - chrono::Duration::minutes(minutes),
                    })
                    .collect(),
                now,
            }))
        };
        vec![
            customer(
                "vip",
                json!({"plan": "premium", "visits": 3, "ratio": 0.5,
                       "purchased": ["item-1", "item-3"], "empty": [], "nested": {"a": 1}}),
                &["frequent_buyers", "premium_at_risk"],
                true,
                &[
                    ("item-0", 5),
                    ("item-0", 50),
                    ("item-0", 500),
                    ("item-2", 3000),
                ],
            ),
            customer("anonymous", json!({}), &[], false, &[]),
            customer(
                "odd",
                json!({"plan": "free", "visits": 2.5, "purchased": "item-2", "empty": null}),
                &["engaged"],
                true,
                &[("item-1", 10)],
            ),
        ]
    }

    fn items() -> Vec<ItemView> {
        let tags: [&[&str]; 5] = [
            &["premium"],
            &["needs_agent"],
            &["win_back"],
            &[],
            &["premium", "win_back"],
        ];
        tags.iter()
            .enumerate()
            .map(|(i, tags)| {
                ItemView::new(Arc::new(ContentItem {
                    id: format!("item-{i}"),
                    content_type: "banner".into(),
                    title: (i % 2 == 0).then(|| format!("Item {i}")),
                    placements: vec!["homepage_hero".into()],
                    tags: tags.iter().map(|t| t.to_string()).collect(),
                    segments: vec![],
                    priority: i as i32,
                    attributes: json!({"discount": i * 5, "ratio": 0.25, "name": "x"})
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    active_from: None,
                    active_until: None,
                    frequency_cap: (i == 1).then_some(2),
                }))
            })
            .collect()
    }

    fn contexts() -> Vec<CtxView> {
        let ctx = |now: &str, request| {
            CtxView(Arc::new(CtxData {
                placement: "homepage_hero".into(),
                content_type: String::new(),
                count: 3,
                request,
                now: at(now),
            }))
        };
        vec![
            // A Wednesday, 10:30 in Berlin.
            ctx(
                "2026-11-25T09:30:00Z",
                json!({"timezone": "Europe/Berlin", "channel": "web", "device": "mobile"}),
            ),
            // A Saturday.
            ctx("2026-11-28T12:00:00Z", json!({"timezone": "+02:00"})),
            // Wednesday evening, UTC.
            ctx("2026-11-25T20:00:00Z", json!({})),
        ]
    }

    fn same(a: &Dynamic, b: &Dynamic) -> bool {
        a.type_name() == b.type_name() && format!("{a:?}") == format!("{b:?}")
    }

    /// Hook bodies with what the compiled path must do: agree with Rhai wherever it does
    /// not give up (`true`: and answer at least once), or always give up (`false`: Rhai
    /// fails there).
    const CASES: &[(&str, &str, bool)] = &[
        ("eligible", "true", true),
        ("eligible", r#"customer.traits.plan == "premium""#, true),
        ("eligible", r#"customer.traits["plan"] != "free""#, true),
        ("eligible", "customer.traits.missing == ()", true),
        ("eligible", r#"customer.traits.missing ?? "none""#, true),
        (
            "eligible",
            "customer.traits.plan ?? customer.traits.visits",
            true,
        ),
        ("eligible", "customer.traits.visits > 2", true),
        ("eligible", "customer.traits.visits >= 2.5", true),
        ("eligible", "customer.traits.visits == 3", true),
        ("eligible", "customer.traits.visits + 1", true),
        ("eligible", "customer.traits.visits * 2.0", true),
        ("eligible", "customer.traits.visits / 2", true),
        ("eligible", "customer.traits.visits % 2", true),
        ("eligible", "-customer.traits.visits", true),
        (
            "eligible",
            "customer.traits.ratio < 0.5000000000000001",
            true,
        ),
        (
            "eligible",
            "customer.traits.purchased.contains(item.id)",
            true,
        ),
        ("eligible", "item.id in customer.traits.purchased", true),
        ("eligible", "customer.traits.purchased.len()", true),
        ("eligible", "customer.traits.empty.len() == 0", true),
        ("eligible", r#""plan" in customer.traits"#, true),
        ("eligible", r#"customer.traits.contains("visits")"#, true),
        ("eligible", r#"customer.traits.get("plan")"#, true),
        ("eligible", "customer.traits.len()", true),
        (
            "eligible",
            r#"customer.in_segment("frequent_buyers")"#,
            true,
        ),
        ("eligible", r#"customer.impressions(item.id, "1d")"#, true),
        (
            "eligible",
            r#"customer.impressions(item.id, "1d") < 3"#,
            true,
        ),
        ("eligible", r#"customer.impressions("7d")"#, true),
        (
            "eligible",
            r#"customer.impressions(item.id, "soon")"#,
            false,
        ),
        ("eligible", r#"customer.feature("engagement") > 0.5"#, true),
        ("eligible", r#"customer.feature("missing")"#, true),
        ("eligible", r#"customer.id + "-" + item.id"#, true),
        ("eligible", "customer.known", true),
        ("eligible", r#"item.has_tag("premium")"#, true),
        ("eligible", r#"item.tags.contains("premium")"#, true),
        ("eligible", r#""win_back" in item.tags"#, true),
        ("eligible", "item.tags.contains(1)", true),
        ("eligible", "item.tags.len()", true),
        ("eligible", "item.priority >= 2", true),
        ("eligible", r#"item.attr("discount") > 5"#, true),
        ("eligible", r#"item.attr("ratio") * 4"#, true),
        ("eligible", r#"item.attr("missing") ?? 0"#, true),
        ("eligible", r#"item.title ?? "untitled""#, true),
        ("eligible", "item.frequency_cap", true),
        ("eligible", "item.type", true),
        ("eligible", r#"ctx.placement == "homepage_hero""#, true),
        ("eligible", "ctx.channel + ctx.device", true),
        ("eligible", "ctx.local_time.hour", true),
        ("eligible", "ctx.local_time.weekday <= 5", true),
        (
            "eligible",
            "ctx.now.hour + ctx.now.minute + ctx.now.day",
            true,
        ),
        ("eligible", "ctx.count", true),
        ("eligible", "type_of(customer.traits.plan)", true),
        ("eligible", "type_of(customer.traits.purchased)", true),
        ("eligible", "type_of(customer.traits.nested)", true),
        (
            "eligible",
            "type_of(item) + type_of(customer) + type_of(ctx)",
            true,
        ),
        (
            "eligible",
            "type_of(customer.traits) + type_of(ctx.local_time)",
            true,
        ),
        (
            "eligible",
            "type_of(1.5) + type_of('c') + type_of(())",
            true,
        ),
        ("eligible", r#"[1, 2.0, "a"].contains(2)"#, true),
        ("eligible", "[].len()", true),
        ("eligible", "let x = 1; x = x + 1; x", true),
        ("eligible", "let x = 1; { let x = 5; } x", true),
        ("eligible", "let x = item.priority; x += 2; x *= 3; x", true),
        ("eligible", r#"let s = item.id; s += "!"; s"#, true),
        ("eligible", "const K = 2; item.priority * K", true),
        (
            "eligible",
            r#"if item.priority > 2 { "high" } else if item.priority > 0 { "mid" }"#,
            true,
        ),
        ("eligible", "if customer.known { return 1; } 2", true),
        ("eligible", "!customer.known || item.priority == 0", true),
        (
            "eligible",
            r#"customer.known && customer.traits.plan == "premium""#,
            true,
        ),
        ("eligible", r#"1 == "1""#, true),
        ("eligible", r#"1 != "1""#, true),
        ("eligible", "() < 1", true),
        ("eligible", "true > false", true),
        ("eligible", "'a' < 'b'", true),
        ("eligible", r#""a" < "b""#, true),
        ("eligible", r#"() + "a""#, true),
        ("eligible", "0.1 + 0.2 == 0.3", true),
        ("eligible", "1.0 / 0.0", true),
        ("eligible", "0.0 == -0.0", true),
        ("eligible", "9223372036854775807 + item.priority", true),
        ("eligible", "1 / (item.priority - item.priority)", false),
        ("eligible", "customer.traits.plan + 1", false),
        ("eligible", "!customer.traits.visits", false),
        ("eligible", "customer.traits.visits && true", false),
        ("eligible", "if customer.traits.plan { 1 }", false),
        ("eligible", "pin()", true),
        ("eligible", "helper(item) + 1", true),
        ("eligible", "scoring::boost(2.0, 1.5)", true),
        ("eligible", "scoring::boost(2, -1.0)", true),
        ("eligible", "scoring::in_hours(ctx.local_time, 9, 17)", true),
        ("eligible", "scoring::is_weekday(ctx.local_time)", true),
        (
            "eligible",
            r#"scoring::list_trait(customer, "purchased").len()"#,
            true,
        ),
        (
            "eligible",
            r#"scoring::list_trait(customer, "purchased").contains(item.id)"#,
            true,
        ),
        ("score", "score * 2", true),
        ("score", "score + 1", true),
        ("score", "score", true),
        (
            "score",
            r#"if item.has_tag("premium") { pin() } else { score }"#,
            true,
        ),
        ("score", "scoring::boost(score, 1.5)", true),
    ];

    fn source(hook: &str, body: &str) -> String {
        let params = if hook == "score" {
            "customer, item, ctx, score"
        } else {
            "customer, item, ctx"
        };
        format!(
            "import \"scoring\" as scoring;\nconst NAME = \"case\";\nfn helper(i) {{ i.priority * 2 }}\nfn {hook}({params}) {{ {body} }}"
        )
    }

    #[test]
    fn hooks_agree_with_the_interpreter() {
        let engine = engine();
        let (items, contexts) = (items(), contexts());
        let mut wrong = Vec::new();
        let mut answered = 0;
        for &(hook, body, answers) in CASES {
            let rule = compile(&engine, "case", &source(hook, body)).unwrap();
            let Some(program) = rule.compiled.as_ref() else {
                wrong.push(format!("{body}: not compiled"));
                continue;
            };
            let mut agreed = 0;
            for ctx in &contexts {
                for customer in customers(ctx.0.now) {
                    for item in &items {
                        let mut scope = Scope::new();
                        let (c, i, x) = (customer.clone(), item.clone(), ctx.clone());
                        let interpreted = if hook == "score" {
                            engine.call_fn::<Dynamic>(&mut scope, &rule.ast, hook, (c, i, x, 1.5))
                        } else {
                            engine.call_fn::<Dynamic>(&mut scope, &rule.ast, hook, (c, i, x))
                        };
                        let native = program.call_hook(hook, &customer.0, item, &ctx.0, 1.5);
                        match (&native, &interpreted) {
                            (Ok(a), Ok(b)) if same(a, b) => agreed += 1,
                            (Ok(a), Ok(b)) => {
                                wrong.push(format!("{body}: compiled {a:?}, Rhai {b:?}"))
                            }
                            (Ok(a), Err(e)) => {
                                wrong.push(format!("{body}: compiled {a:?}, Rhai failed: {e}"))
                            }
                            (Err(Bail), _) => {}
                        }
                    }
                }
            }
            answered += agreed;
            if answers && agreed == 0 {
                wrong.push(format!("{body}: the compiled path never answered"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        // 3 contexts × 3 customers × 5 items per case: most cases answer for most inputs.
        assert!(answered > CASES.len() * 20, "{answered}");
    }

    fn rule_set(engine: &Arc<Engine>, rules: Vec<Rule>) -> RuleSet {
        let rules = rules
            .into_iter()
            .map(|rule| {
                Arc::new(ActiveRule {
                    rule,
                    version: 1,
                    source: "impressions".into(),
                })
            })
            .collect();
        RuleSet::new(engine.clone(), rules, Duration::from_secs(1))
    }

    /// The rule set's effects on `items` with the compiled path and with Rhai alone.
    fn both_ways(engine: &Arc<Engine>, rules: &[Rule]) -> Vec<(RuleEffects, RuleEffects)> {
        let interpreted: Vec<Rule> = rules
            .iter()
            .cloned()
            .map(|mut r| {
                r.compiled = None;
                r
            })
            .collect();
        let (fast, slow) = (
            rule_set(engine, rules.to_vec()),
            rule_set(engine, interpreted),
        );
        let items: Vec<Arc<ContentItem>> =
            items().iter().map(|v| Arc::new(v.item().clone())).collect();
        let mut out = Vec::new();
        for ctx in contexts() {
            for customer in customers(ctx.0.now) {
                let run = |set: &RuleSet| {
                    let mut effects = RuleEffects::neutral(items.len());
                    set.decide(&customer, &ctx, &items, "homepage_hero", &mut effects);
                    effects
                };
                out.push((run(&fast), run(&slow)));
            }
        }
        out
    }

    fn example_rules(engine: &Engine) -> Vec<Rule> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
        check_dir(engine, &dir)
            .unwrap()
            .into_iter()
            .map(|c| c.result.unwrap())
            .collect()
    }

    #[test]
    fn the_example_rules_are_compiled_and_decide_as_the_interpreter_does() {
        let engine = engine();
        let rules = example_rules(&engine);
        assert_eq!(rules.len(), 5);
        for rule in &rules {
            let program = rule.compiled.as_ref().unwrap_or_else(|| {
                panic!("{} is not compiled", rule.meta.name);
            });
            // The compiled path answers on its own for every example input.
            for ctx in contexts() {
                for customer in customers(ctx.0.now) {
                    let items = items();
                    let refs: Vec<&ItemView> = items.iter().collect();
                    let weights = vec![1.0; items.len()];
                    let pinned = vec![false; items.len()];
                    assert!(
                        program
                            .run(&customer.0, &ctx.0, &refs, &weights, &pinned)
                            .is_ok(),
                        "{} gave up",
                        rule.meta.name
                    );
                }
            }
            for (fast, slow) in both_ways(&engine, std::slice::from_ref(rule)) {
                assert_eq!(fast, slow, "{}", rule.meta.name);
            }
        }
        for (fast, slow) in both_ways(&engine, &rules) {
            assert_eq!(fast, slow);
            assert!(fast.failures.is_empty(), "{:?}", fast.failures);
        }
    }

    #[test]
    fn a_runtime_fallback_fails_with_rhais_error() {
        let engine = engine();
        let rules = vec![
            compile(
                &engine,
                "divides",
                "fn eligible(c, i, x) { 10 / (i.priority - 2) > 1 }",
            )
            .unwrap(),
            compile(
                &engine,
                "negative",
                "fn score(c, i, x, s) { if i.priority == 3 { -1.0 } else { s * 2 } }",
            )
            .unwrap(),
            compile(&engine, "nan", "fn eligible(c, i, x) { i.priority }").unwrap(),
        ];
        assert!(rules.iter().all(|r| r.compiled.is_some()));
        for (fast, slow) in both_ways(&engine, &rules) {
            assert_eq!(fast, slow);
            let failed: Vec<&str> = fast.failures.iter().map(|f| f.rule.as_str()).collect();
            // In the order the rules ran: by priority, then by name.
            assert_eq!(
                failed,
                ["divides", "nan", "negative"],
                "{:?}",
                fast.failures
            );
        }
    }

    #[test]
    fn rules_outside_the_subset_run_in_rhai() {
        let engine = engine();
        let outside = [
            "fn eligible(c, i, x) { for t in i.tags { if t == \"win_back\" { return false; } } true }",
            "fn eligible(c, i, x) { f(3) > 0 }\nfn f(n) { if n == 0 { 0 } else { f(n - 1) } }",
            "fn eligible(c, i, x) { throw \"no\"; }",
            "fn eligible(c, i, x) { i.tags.map(|t| t.len()).len() > 0 }",
            "let t = time(\"2026-11-27T10:00:00Z\");\nfn eligible(c, i, x) { true }",
            "fn eligible(c, i, x) { let t = i.tags; t.push(\"x\"); t.len() > 1 }",
        ];
        for source in outside {
            let rule = compile(&engine, "outside", source).unwrap();
            assert!(rule.compiled.is_none(), "{source}: compiled");
            for (fast, slow) in both_ways(&engine, std::slice::from_ref(&rule)) {
                assert_eq!(fast, slow, "{source}");
            }
        }
        // Translated, but what it reads (`consent`) is left to Rhai at run time.
        let rule = compile(&engine, "r", "fn eligible(c, i, x) { c.consent.marketing }").unwrap();
        assert!(rule.compiled.is_some());
        for (fast, slow) in both_ways(&engine, std::slice::from_ref(&rule)) {
            assert_eq!(fast, slow);
            assert!(fast.failures.is_empty());
        }
        // Calls that fan out past the operation bound run in Rhai, which counts them.
        let mut fan = String::from("fn f0(n) { n + 1 }\n");
        for level in 1..7 {
            let below = level - 1;
            fan += &format!("fn f{level}(n) {{ f{below}(n) + f{below}(n) + f{below}(n) }}\n");
        }
        fan += "fn eligible(c, i, x) { f6(i.priority) > 0 }";
        let rule = compile(&engine, "fan", &fan).unwrap();
        let program = rule.compiled.as_ref().unwrap();
        assert!(program.cost(items().len()) > crate::rules::MAX_OPERATIONS / 4);
        for (fast, slow) in both_ways(&engine, std::slice::from_ref(&rule)) {
            assert_eq!(fast, slow);
        }
        // A native an application adds under a host function's name stays with Rhai.
        let mut natives = Natives::builtin();
        natives.add("has_tag", |engine| {
            engine.register_fn("has_tag", |_: &mut ItemView, _: &str| true);
        });
        let engine = engine_with(&natives, None);
        let rule = compile(&engine, "r", "fn eligible(c, i, x) { i.has_tag(\"x\") }").unwrap();
        assert!(rule.compiled.is_none());
        let rule = compile(&engine, "r", "fn eligible(c, i, x) { i.priority > 1 }").unwrap();
        assert!(rule.compiled.is_some());
    }
}
