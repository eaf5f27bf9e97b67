//! The planner: how much load is coming, and (next) how many workers of each role that needs.
//!
//! So far: the load forecast (`forecast`), one observation per interval in, a one-interval-ahead forecast
//! out, measured against simple baselines by `dynamo bench planner`. Replica maths and the connectors that
//! act on the plan are the next steps.
pub mod forecast;
