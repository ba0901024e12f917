//! Man pages and shell completions generated from the command-line
//! definition, for packages (`scripts/build-deb.sh` runs `kmfs-gen DIR`):
//! `kmfs.8` and one page per subcommand (`kmfs-mount.8`,
//! `kmfs-header-dump.8`, ...) with clap_mangen, and completions for bash,
//! zsh and fish with clap_complete. `kmfs.toml(5)` is written by hand
//! (`packaging/kmfs.toml.5`).

use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

fn man_pages(cmd: clap::Command, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
        man_pages(sub, dir, out)?;
    }
    let page = clap_mangen::Man::new(cmd)
        .section("8")
        .manual("kmfs manual")
        .source(format!("kmfs {}", env!("CARGO_PKG_VERSION")));
    out.push(page.generate_to(dir)?);
    Ok(())
}

/// Writes `DIR/man/*.8` and `DIR/completions/{kmfs.bash,_kmfs,kmfs.fish}`;
/// returns the files written.
pub fn generate(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let man = dir.join("man");
    let comp = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    let mut out = Vec::new();
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    man_pages(cmd, &man, &mut out)?;
    let mut cmd = Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        out.push(clap_complete::generate_to(shell, &mut cmd, "kmfs", &comp)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn man_pages_and_completions_for_every_subcommand() {
        let d = tempfile::tempdir().unwrap();
        let files = super::generate(d.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "kmfs.8",
            "kmfs-mount.8",
            "kmfs-rotate-kek.8",
            "kmfs-status.8",
            "kmfs-log-verify.8",
            "kmfs.bash",
            "_kmfs",
            "kmfs.fish",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        let page = std::fs::read_to_string(d.path().join("man/kmfs-status.8")).unwrap();
        assert!(
            page.contains(".TH") && page.contains("openmetrics"),
            "{page}"
        );
        let bash = std::fs::read_to_string(d.path().join("completions/kmfs.bash")).unwrap();
        assert!(bash.contains("rotate-kek"));
    }
}
