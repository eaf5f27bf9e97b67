//! A planner's decision, as it goes out on the event plane (`plan` topic) for `dynamo top` and for an
//! orchestrator that carries plans out itself.
use serde::{Deserialize, Serialize};

use super::discovery::Role;

/// Workers wanted per role, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub decode: usize,
    pub prefill: usize,
    /// The next interval's traffic as forecast; `None` before the first interval.
    pub forecast: Option<Forecast>,
    pub reason: String,
}

/// Traffic per planner interval, forecast one interval ahead.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    pub requests: f64,
    pub input_tokens: f64,
    pub output_tokens: f64,
}

impl Plan {
    pub fn workers(&self, role: Role) -> usize {
        match role {
            Role::Prefill => self.prefill,
            _ => self.decode,
        }
    }

    pub fn set(&mut self, role: Role, workers: usize) {
        match role {
            Role::Prefill => self.prefill = workers,
            _ => self.decode = workers,
        }
    }
}
