//! One module per subcommand.

pub mod attack;
pub mod dream;
pub mod eval;
pub mod export_pretrained;
pub mod features;
pub mod keygen;
pub mod model_args;
pub mod predict;
pub mod quantize;
pub mod sign;
pub mod train;
