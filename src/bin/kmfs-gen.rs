//! `kmfs-gen DIR`: writes the man pages and shell completions that packages
//! ship (see `kmfs::cli::docs`). Not installed itself.

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "target/assets".into());
    match kmfs::cli::docs::generate(&dir) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
        }
        Err(e) => {
            eprintln!("kmfs-gen: {}: {e}", dir.display());
            std::process::exit(1);
        }
    }
}
