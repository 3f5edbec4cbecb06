//! Durations in the Gateway API string form (`"10s"`, `"1m30s"`, `"250ms"`): shared with the
//! controller, which validates HTTPRoute timeouts with the same parser.

pub use weft_api::duration::{DurationError, GatewayDuration};
