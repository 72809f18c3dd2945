//! One module per subcommand.

pub mod bench;
pub mod cameras;
pub mod classify;
pub mod eval;
pub mod info;
pub mod run;
