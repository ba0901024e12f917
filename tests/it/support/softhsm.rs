//! Test harness: real SoftHSM2 tokens in a private directory.
//!
//! Facts this relies on (shared/notes/KEY-SERVERS.md): SoftHSM reads
//! `SOFTHSM2_CONF` when the module is initialised, so the variable must be set
//! in this process before the first provider loads the module (it is process
//! global, like the module's state); a token lands in a random slot and is found
//! by its label; the KEK is created with `pkcs11-tool ... --sensitive --private`
//! (without `--private` it would be usable without logging in).
//!
//! All tests share one [`Hsm`] (built once, before any module load): tokens `kmfs-test` (keys [`KEK`] and [`KEK_EXTRACTABLE`]) and
//! [`PIN_TOKEN`], which only the wrong-PIN tests use, so no other session of
//! the process is logged in to it (PKCS#11 login state is per process and
//! token: a wrong PIN would otherwise meet CKR_USER_ALREADY_LOGGED_IN), and
//! [`OTHER_TOKEN`] with a different key under the same label. Tests that
//! create keys use their own labels.
//!
//! SoftHSM 2.6 rewrites a token's object file when a key is created; another
//! process listing tokens at that moment sees the token without its label.
//! So tests that run processes on the tokens (kmfs, through a config file)
//! take them one at a time ([`Hsm::for_processes`]), while tests that use
//! them only inside this process ([`Hsm::in_process`]) run together.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::cli::write_private;
use kmfs::kms::pkcs11::{Pkcs11Config, Pkcs11Mode};

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const SOFTHSM_UTIL: &str = "/usr/bin/softhsm2-util";
pub const PKCS11_TOOL: &str = "/usr/bin/pkcs11-tool";

pub const TOKEN: &str = "kmfs-test";
/// A token nobody logs in to except the wrong-PIN tests.
pub const PIN_TOKEN: &str = "kmfs-pin";
/// A third token with its own [`KEK`] (same label, different key).
pub const OTHER_TOKEN: &str = "kmfs-other";
/// A token whose sessions a test logs out behind the provider's back.
pub const RELOGIN_TOKEN: &str = "kmfs-relogin";
pub const PIN: &str = "4711-kmfs";
pub const SO_PIN: &str = "12345678";
/// Non-extractable, sensitive, private AES-256 KEK (as the notes create it).
pub const KEK: &str = "kmfs-kek";
/// Extractable, non-sensitive, private AES-256 KEK for `mode = "extract"`.
pub const KEK_EXTRACTABLE: &str = "kmfs-kek-x";
/// Name of the systemd credential (in `$CREDENTIALS_DIRECTORY`) holding [`PIN`].
pub const PIN_CREDENTIAL: &str = "hsm-pin";

/// Whether SoftHSM2 and pkcs11-tool are installed; if not, the test is
/// skipped ([`super::skip`]).
pub fn available() -> bool {
    if [MODULE, SOFTHSM_UTIL, PKCS11_TOOL]
        .iter()
        .all(|p| Path::new(p).exists())
    {
        return true;
    }
    super::skip(&format!(
        "{MODULE}, {SOFTHSM_UTIL} or {PKCS11_TOOL} is missing (apt-get install softhsm2 opensc)"
    ));
    false
}

pub struct Hsm {
    /// Private directory: config, tokens, PIN files, credentials.
    pub dir: PathBuf,
    pub conf: PathBuf,
    /// PIN file (mode 0600) holding [`PIN`].
    pub pin_file: PathBuf,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Who is using the tokens: tests inside this process (readers) or one test
/// running processes on them (the writer).
static TURNS: RwLock<()> = RwLock::new(());

impl Hsm {
    /// The process-wide SoftHSM setup (created on first use).
    fn shared() -> &'static Hsm {
        static HSM: OnceLock<Hsm> = OnceLock::new();
        HSM.get_or_init(Hsm::create)
    }

    /// The tokens, for a test that uses them only in this process; hold the
    /// guard for the whole test.
    pub fn in_process() -> (&'static Hsm, RwLockReadGuard<'static, ()>) {
        let turn = TURNS.read().unwrap_or_else(|p| p.into_inner());
        (Hsm::shared(), turn)
    }

    /// The tokens, for a test that runs processes (kmfs) on them: no other
    /// token user runs meanwhile. Hold the guard for the whole test.
    pub fn for_processes() -> (&'static Hsm, RwLockWriteGuard<'static, ()>) {
        let turn = TURNS.write().unwrap_or_else(|p| p.into_inner());
        (Hsm::shared(), turn)
    }

    fn create() -> Hsm {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        // Remove leftovers of earlier runs whose process is gone.
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("softhsm-")
                    && !Path::new("/proc").join(pid).exists()
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(format!("softhsm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tokens")).unwrap();
        std::fs::create_dir_all(dir.join("creds")).unwrap();
        for d in [dir.clone(), dir.join("tokens"), dir.join("creds")] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                dir.join("tokens").display()
            ),
        )
        .unwrap();
        let hsm = Hsm {
            pin_file: dir.join("hsm.pin"),
            dir,
            conf,
        };
        write_private(&hsm.pin_file, &format!("{PIN}\n"));
        write_private(&hsm.dir.join("creds").join(PIN_CREDENTIAL), PIN);

        for token in [TOKEN, PIN_TOKEN, OTHER_TOKEN, RELOGIN_TOKEN] {
            run(Command::new(SOFTHSM_UTIL)
                .env("SOFTHSM2_CONF", &hsm.conf)
                .args(["--init-token", "--free", "--label", token])
                .args(["--so-pin", SO_PIN, "--pin", PIN]));
        }
        hsm.keygen(TOKEN, KEK, &["--sensitive"]);
        hsm.keygen(TOKEN, KEK_EXTRACTABLE, &["--extractable"]);
        hsm.keygen(PIN_TOKEN, KEK, &["--sensitive"]);
        hsm.keygen(OTHER_TOKEN, KEK, &["--sensitive"]);
        hsm.keygen(RELOGIN_TOKEN, KEK, &["--sensitive"]);

        // SAFETY: runs once, before this process loads any PKCS#11 module (the
        // only C code that reads these variables) and while holding the
        // OnceLock, so no other test thread sets the environment concurrently;
        // Rust's own environment reads are locked by std.
        unsafe {
            std::env::set_var("SOFTHSM2_CONF", &hsm.conf);
            std::env::set_var("CREDENTIALS_DIRECTORY", hsm.dir.join("creds"));
        }
        hsm
    }

    /// Generates an AES-256 key with pkcs11-tool, private and usable for
    /// encrypt/decrypt/wrap, plus `extra` flags (`--sensitive`, `--extractable`).
    pub fn keygen(&self, token: &str, label: &str, extra: &[&str]) {
        run(self
            .tool(token)
            .args(["--keygen", "--key-type", "AES:32", "--label", label])
            .arg("--private")
            .args(extra)
            .args(["--usage-decrypt", "--usage-wrap"]));
    }

    /// A `pkcs11-tool` command logged in to `token`.
    pub fn tool(&self, token: &str) -> Command {
        let mut c = Command::new(PKCS11_TOOL);
        c.env("SOFTHSM2_CONF", &self.conf)
            .args(["--module", MODULE, "--token-label", token])
            .args(["--login", "--pin", PIN]);
        c
    }

    /// A provider config for `key` on [`TOKEN`] in wrap mode.
    pub fn config(&self, key: &str) -> Pkcs11Config {
        Pkcs11Config {
            module: MODULE.into(),
            token_label: Some(TOKEN.into()),
            slot: None,
            pin_file: Some(self.pin_file.clone()),
            pin_credential: None,
            key_label: key.into(),
            key_version: None,
            mode: Pkcs11Mode::Wrap,
        }
    }

    /// The same as a `[pkcs11]` TOML section, for config-file tests.
    pub fn toml_section(&self, key: &str) -> String {
        format!(
            "[pkcs11]\nmodule = \"{MODULE}\"\ntoken_label = \"{TOKEN}\"\npin_file = \"{}\"\nkey_label = \"{key}\"\n",
            self.pin_file.display()
        )
    }
}
