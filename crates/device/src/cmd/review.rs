//! `tern-device review DIR list|confirm|move|delete`: the capture review
//! API (`tern_device::capture::review`) on the command line, one JSON
//! answer on stdout.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use tern_device::capture::review::{ListRequest, MoveRequest, Store};

/// Arguments of `review`.
#[derive(clap::Args)]
pub struct Args {
    /// The capture folder (`run --capture DIR`).
    dir: PathBuf,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// One page of captures, newest first, with their sidecars.
    List {
        /// Page number, from 0.
        #[arg(long, default_value_t = 0)]
        page: usize,
        /// Captures per page (at most 500).
        #[arg(long, default_value_t = 50)]
        per_page: usize,
        /// Only this label.
        #[arg(long)]
        label: Option<String>,
        /// Only captures not yet confirmed or moved.
        #[arg(long)]
        unreviewed: bool,
    },
    /// Confirm a capture's label (`reviewed: true`).
    Confirm {
        /// The capture: LABEL_FOLDER/FILE.jpg, as `list` gives it.
        id: String,
    },
    /// File a capture under another label (new or existing).
    Move {
        /// The capture.
        id: String,
        /// The label.
        label: String,
    },
    /// Delete a capture and its sidecar.
    Delete {
        /// The capture.
        id: String,
    },
}

/// Runs one review action and prints its JSON answer.
pub fn run(a: Args) -> Result<ExitCode> {
    let store = Store::open(&a.dir)?;
    let json = match a.action {
        Action::List { page, per_page, label, unreviewed } => {
            serde_json::to_string(&store.list(&ListRequest { page, per_page, label, unreviewed })?)
        }
        Action::Confirm { id } => serde_json::to_string(&store.confirm(&id)?),
        Action::Move { id, label } => serde_json::to_string(&store.relabel(&MoveRequest { id, label })?),
        Action::Delete { id } => serde_json::to_string(&store.delete(&id)?),
    }
    .context("cannot serialise the answer")?;
    outln!("{json}");
    Ok(ExitCode::SUCCESS)
}
