//! The registry of native (Rust) functions that rules and plugins may call.
//!
//! A native function runs outside the script's operation count, so each one must be
//! bounded by its arguments and must not block. The built-ins are listed in
//! `rules/README.md`; an embedding application adds its own with [`Natives::add`] before
//! the rule service starts.

use std::fmt;
use std::sync::Arc;

use rhai::{Array, Engine, EvalAltResult};

type Registrar = Arc<dyn Fn(&mut Engine) + Send + Sync>;

/// Native functions to register on every rule engine.
#[derive(Clone, Default)]
pub struct Natives {
    registrars: Vec<(String, Registrar)>,
    /// How many of `registrars` are the built-ins (they come first).
    builtin: usize,
}

impl fmt::Debug for Natives {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.registrars.iter().map(|(name, _)| name))
            .finish()
    }
}

impl Natives {
    /// The functions every engine has: `pin()`, `bucket(key, n)`, `clamp(x, lo, hi)`,
    /// `haversine_km(lat1, lon1, lat2, lon2)` and `contains_any(list, list)`.
    pub fn builtin() -> Self {
        let mut natives = Natives::default();
        natives.add("pin", |engine| {
            engine.register_fn("pin", || f64::INFINITY);
        });
        natives.add("bucket", |engine| {
            engine.register_fn(
                "bucket",
                |key: &str, buckets: i64| -> Result<i64, Box<EvalAltResult>> {
                    if buckets <= 0 {
                        return Err(format!("bucket count must be positive, got {buckets}").into());
                    }
                    Ok((fnv1a(key.as_bytes()) % buckets as u64) as i64)
                },
            );
        });
        natives.add("clamp", |engine| {
            engine
                .register_fn("clamp", |x: f64, lo: f64, hi: f64| x.max(lo).min(hi))
                .register_fn("clamp", |x: i64, lo: i64, hi: i64| x.max(lo).min(hi));
        });
        natives.add("haversine_km", |engine| {
            engine.register_fn("haversine_km", haversine_km);
        });
        natives.add("contains_any", |engine| {
            engine.register_fn("contains_any", |list: Array, wanted: Array| {
                wanted.iter().any(|w| {
                    list.iter()
                        .any(|v| v.type_id() == w.type_id() && v.to_string() == w.to_string())
                })
            });
        });
        natives.builtin = natives.registrars.len();
        natives
    }

    /// The names added beyond the built-ins, and `pin` when the built-in is missing: the
    /// compiled path of the rules leaves calls of these to Rhai.
    pub(super) fn foreign(&self) -> Vec<String> {
        let mut names: Vec<String> = self.registrars[self.builtin..]
            .iter()
            .map(|(name, _)| name.clone())
            .collect();
        if !self.registrars[..self.builtin]
            .iter()
            .any(|(n, _)| n == "pin")
        {
            names.push("pin".into());
        }
        names
    }

    /// Adds a function (or a family of overloads) under `name`; `register` calls
    /// `engine.register_fn` for each.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        register: impl Fn(&mut Engine) + Send + Sync + 'static,
    ) -> &mut Self {
        self.registrars.push((name.into(), Arc::new(register)));
        self
    }

    /// The registered names, in registration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.registrars.iter().map(|(name, _)| name.as_str())
    }

    pub(super) fn register(&self, engine: &mut Engine) {
        for (_, register) in &self.registrars {
            register(engine);
        }
    }
}

/// 64-bit FNV-1a: stable across processes and releases (unlike std's hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Great-circle distance in kilometres.
fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6371.0088;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * a.sqrt().asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_callable_from_scripts() {
        let engine = crate::rules::engine();
        assert_eq!(engine.eval::<f64>("pin()").unwrap(), f64::INFINITY);
        let b = engine.eval::<i64>(r#"bucket("customer-42", 100)"#).unwrap();
        assert_eq!(
            b,
            engine.eval::<i64>(r#"bucket("customer-42", 100)"#).unwrap()
        );
        assert!((0..100).contains(&b));
        assert!(engine.eval::<i64>(r#"bucket("x", 0)"#).is_err());
        assert_eq!(engine.eval::<f64>("clamp(1.5, 0.0, 1.0)").unwrap(), 1.0);
        let paris_london = engine
            .eval::<f64>("haversine_km(48.8566, 2.3522, 51.5074, -0.1278)")
            .unwrap();
        assert!((paris_london - 343.5).abs() < 1.0, "{paris_london}");
        assert!(engine
            .eval::<bool>(r#"contains_any(["a", "b"], ["c", "b"])"#)
            .unwrap());
        assert!(!engine.eval::<bool>(r#"contains_any(["a"], [1])"#).unwrap());
    }

    #[test]
    fn an_application_registers_its_own() {
        let mut natives = Natives::builtin();
        natives.add("margin", |engine| {
            engine.register_fn("margin", |price: f64, cost: f64| (price - cost) / price);
        });
        let engine = crate::rules::engine_with(&natives, None);
        assert_eq!(engine.eval::<f64>("margin(10.0, 7.5)").unwrap(), 0.25);
        assert!(natives.names().any(|n| n == "margin"));
    }
}
