//! One module per subcommand.

pub mod export_pretrained;
pub mod predict;
