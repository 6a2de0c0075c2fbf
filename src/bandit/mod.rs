//! Bandit policies: Beta-Bernoulli Thompson sampling and epsilon-greedy over per-arm
//! sufficient statistics, each pick with its propensity.
//!
//! Pure logic: statistics come in as [`ArmStats`], randomness from the caller's RNG.

pub mod linear;
pub mod policy;

use serde::{Deserialize, Serialize};

/// Additive sufficient statistics of one arm: impressions and summed reward in [0, 1].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ArmStats {
    pub trials: f64,
    pub reward: f64,
}

impl ArmStats {
    pub fn trial() -> Self {
        ArmStats {
            trials: 1.0,
            reward: 0.0,
        }
    }

    pub fn reward(reward: f64) -> Self {
        ArmStats {
            trials: 0.0,
            reward,
        }
    }

    /// These statistics with a model's estimate `p` of the reward as prior knowledge worth
    /// `strength` pseudo-trials: with no data the posterior mean is about `p`, and the
    /// arm's own data overtakes the prior as it grows past `strength` trials.
    pub fn with_prior(self, p: f64, strength: f64) -> Self {
        if !p.is_finite() || !strength.is_finite() || strength <= 0.0 {
            return self;
        }
        let p = p.clamp(0.0, 1.0);
        ArmStats {
            trials: self.trials + strength,
            reward: self.reward.clamp(0.0, self.trials.max(self.reward)) + p * strength,
        }
    }

    pub fn merge(&mut self, other: ArmStats) {
        self.trials += other.trials;
        self.reward += other.reward;
    }

    /// Beta posterior parameters under a uniform Beta(1, 1) prior. Rewards beyond the
    /// recorded trials (an outcome whose impression is not yet merged) are capped.
    pub fn beta(&self) -> (f64, f64) {
        let successes = self.reward.clamp(0.0, self.trials.max(self.reward));
        let failures = (self.trials - successes).max(0.0);
        (1.0 + successes, 1.0 + failures)
    }

    /// Posterior mean reward.
    pub fn mean(&self) -> f64 {
        let (a, b) = self.beta();
        a / (a + b)
    }
}
