//! What the process tells its operators and how it shares the CPU: metric primitives
//! ([`metrics`]) and the lower CPU priority of background work ([`priority`]).

pub mod metrics;
pub mod priority;
