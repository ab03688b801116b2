//! The classic store server: `store,KEY,VALUE` / `lookup,KEY`, wire compatible with the
//! course's Python and Erlang store servers; with `--raft`, one server of a replicated
//! store. Its options and wiring live in [`switchboard::store::cli`].

use std::process::ExitCode;

fn main() -> ExitCode {
    switchboard::store::cli::run(argh::from_env())
}
