//! Features: versioned definitions, per-customer state, and evaluation at read time.

pub mod state;
pub mod window;

pub use state::{Bucket, FeatureKey, FeatureState};
pub use window::Window;
pub mod definition;

pub use definition::{FeatureKind, FeatureSpec};
pub mod service;

pub use service::{BatchStates, FeatureRead, FeatureService, FeatureValue, StateUpdates};
