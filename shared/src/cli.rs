//! The manual page and shell completions each binary prints from its own
//! clap definition (`man`, `completions SHELL`): the Debian packages ship
//! what these print, so the pages never drift from the options.

pub use clap_complete::Shell;
use std::io::Write;
use std::process::ExitCode;

/// What `man` and `completions` print, for `name`'s command line.
#[derive(Debug, Clone, Copy)]
pub enum Doc {
    /// The manual page, in roff (`… man | man -l -`).
    Man,
    /// A completion script for this shell.
    Completions(Shell),
}

/// Renders `doc` for `command` into memory, then writes it to stdout: a
/// closed pipe (`| head`) is an error reported on stderr, not a panic.
pub fn print(doc: Doc, mut command: clap::Command) -> ExitCode {
    let name = command.get_name().to_owned();
    let mut text = Vec::new();
    let rendered = match doc {
        Doc::Man => clap_mangen::Man::new(command).render(&mut text),
        Doc::Completions(shell) => {
            clap_complete::generate(shell, &mut command, &name, &mut text);
            Ok(())
        }
    };
    match rendered.and_then(|()| std::io::stdout().write_all(&text)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> clap::Command {
        clap::Command::new("outpost-sample")
            .about("A sample")
            .subcommand(clap::Command::new("run").about("Run it").arg(clap::arg!(--config <FILE> "Config file")))
    }

    fn rendered(doc: Doc) -> String {
        let mut command = sample();
        let mut text = Vec::new();
        match doc {
            Doc::Man => clap_mangen::Man::new(command).render(&mut text).unwrap(),
            Doc::Completions(shell) => clap_complete::generate(shell, &mut command, "outpost-sample", &mut text),
        }
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn the_manual_page_names_the_program_and_its_subcommands() {
        let page = rendered(Doc::Man);
        assert!(page.starts_with(".ie"), "{page}");
        assert!(page.contains(".TH outpost-sample 1"), "{page}");
        assert!(page.contains("A sample"), "{page}");
        assert!(page.contains("Run it"), "{page}");
    }

    #[test]
    fn bash_completion_offers_the_subcommands_and_their_options() {
        let script = rendered(Doc::Completions(clap_complete::Shell::Bash));
        assert!(script.contains("complete -F _outpost__sample"), "{script}");
        assert!(script.contains("run"), "{script}");
        assert!(script.contains("--config"), "{script}");
    }
}
