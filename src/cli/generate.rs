//! `kn completions` and `kn man`: shell completions and man pages, generated from the
//! clap definitions so that they never drift from the real options.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::{Cli, Outcome};

#[derive(Debug, Args)]
pub(super) struct CompletionsArgs {
    /// The shell: bash, zsh, fish (also elvish, powershell).
    #[arg(value_enum)]
    shell: Shell,
}

#[derive(Debug, Args)]
pub(super) struct ManArgs {
    /// The page of this subcommand (kn-attribute(1), …) [default: kn(1)].
    #[arg(value_name = "SUBCOMMAND", conflicts_with = "out_dir")]
    subcommand: Option<String>,
    /// Write every page (kn.1, kn-attribute.1, …) into this directory instead, e.g.
    /// ~/.local/share/man/man1.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

pub(super) fn completions(args: CompletionsArgs) -> anyhow::Result<Outcome> {
    // clap_complete panics on a write error (a closed pipe, `| head`): generate into
    // memory, then write, so a closed pipe is an error main() treats as success.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "kn", &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)
        .and_then(|()| out.flush())
        .context("writing the completions to stdout")?;
    Ok(Outcome::Clean)
}

pub(super) fn man(args: ManArgs) -> anyhow::Result<Outcome> {
    let command = Cli::command();
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
        clap_mangen::generate_to(command, dir)
            .with_context(|| format!("{}: cannot write the man pages", dir.display()))?;
        return Ok(Outcome::Clean);
    }
    let page = match &args.subcommand {
        None => command,
        Some(name) => {
            let Some(sub) = command.find_subcommand(name) else {
                let names: Vec<&str> = command.get_subcommands().map(|s| s.get_name()).collect();
                bail!("no subcommand {name:?}: one of {}", names.join(", "));
            };
            // Named as clap_mangen::generate_to names it, so the page says kn-attribute(1).
            let full = format!("kn-{}", sub.get_name());
            sub.clone()
                .name(full.clone())
                .display_name(full)
                .bin_name(format!("kn {}", sub.get_name()))
        }
    };
    let mut out = std::io::stdout().lock();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .and_then(|()| out.flush())
        .context("writing the man page to stdout")?;
    Ok(Outcome::Clean)
}
