//! The `pkcs11` provider: the KEK lives in an HSM token reached through the
//! token's PKCS#11 module (the `cryptoki` crate).
//!
//! # Configuration (`[pkcs11]` in the volume config)
//!
//! ```toml
//! [pkcs11]
//! module = "/usr/lib/x86_64-linux-gnu/vendor-pkcs11.so"  # absolute, required
//! token_label = "kmfs"              # or: slot = 3   (exactly one of them)
//! pin_file = "/etc/kmfs/hsm.pin"    # or: pin_credential = "hsm-pin" (systemd credential)
//! key_label = "vol1-kek"            # KEK label (version 1)
//! # key_version = 2                 # default: the newest version on the token
//! # mode = "wrap"                   # default; "extract" only for HSMs without AES-GCM
//! ```
//!
//! # Key versions
//!
//! Version 1 of KEK `NAME` is the secret key labelled exactly `NAME` (as an
//! administrator creates it with `pkcs11-tool --keygen --label NAME ...`);
//! version `N >= 2` is the key labelled `NAME.vN`. `create_kek(None)` generates
//! the next free version inside the token. A KEK's `uid` is its CKA_ID in hex
//! (empty if the key has none; keys made by kmfs get 16 random bytes): the
//! volume header records it, and a key found under the right label but with
//! another CKA_ID is refused, so a replaced key is reported as such rather than
//! as a "wrong key". Labels ending in `.v<digits>` are refused as KEK names.
//!
//! # Modes
//!
//! - `wrap` (default): `CKM_AES_GCM` encryption/decryption inside the token with
//!   a sensitive, private, non-extractable AES-256 key. Every wrap uses a fresh
//!   12-byte IV from the OS CSPRNG (never the token's, and SoftHSM would accept
//!   any length) and a 16-byte tag; the caller's `aad` is the GCM AAD. A
//!   failed tag check is [`KmsError::WrongKey`]; SoftHSM reports it as
//!   CKR_GENERAL_ERROR (other tokens as CKR_ENCRYPTED_DATA_INVALID), so those
//!   codes from C_Decrypt count as a wrong key or tampered blob. GCM rather
//!   than CKM_AES_KEY_WRAP_PAD because it binds `aad` (the volume id), which
//!   key wrap cannot.
//! - `extract`: reads an extractable, non-sensitive KEK's CKA_VALUE into a
//!   [`Secret`] and runs AES-256-GCM locally, then drops (zeroizes) the key.
//!   The value is read with a direct `C_GetAttributeValue` into locked memory,
//!   so no unzeroized copy is left on the heap. The key's CKA_ENCRYPT /
//!   CKA_DECRYPT flags are honoured here too. In this mode `create_kek`
//!   generates extractable, non-sensitive keys (the mode cannot use others).
//!
//! Both modes write the same blob, `0x01 ‖ IV (12) ‖ ciphertext ‖ tag (16)`, so
//! a volume can move between them when the key allows it.
//!
//! # Revocation
//!
//! Keys are never destroyed. `revoke` clears CKA_ENCRYPT, CKA_DECRYPT,
//! CKA_WRAP and CKA_UNWRAP on the key object: it can no longer wrap or unwrap
//! (like a Deactivated KMIP key), but it stays on the token, and an HSM
//! administrator can set the flags again (C_SetAttributeValue) to recover old
//! header backups.
//!
//! # Threads and processes
//!
//! A module is loaded and `C_Initialize`d once per process (a registry keyed by
//! its canonical path; it is never finalised, because other providers in the
//! process may share it). Each provider keeps one logged-in read/write session
//! behind a mutex (cryptoki sessions are `Send` but not `Sync`); operations take
//! microseconds, so serialising them costs nothing measurable. Creating or
//! revoking a key excludes every other PKCS#11 operation of the process for
//! its duration (SoftHSM 2.6 otherwise races object creation against
//! concurrent searches). A session lost to the token (closed, logged out,
//! token removed) is reopened once automatically. PKCS#11 state does not survive `fork`: create the provider in
//! the process that uses it (after daemonising).
//!
//! Login state in PKCS#11 is per process and token: if another session of this
//! process is already logged in to the token, `C_Login` answers
//! CKR_USER_ALREADY_LOGGED_IN and the PIN is not checked again.
//!
//! Every HSM operation (login, locate, create, wrap, unwrap, get, random,
//! revoke) is recorded with [`crate::audit::record`], successful or not; the
//! `server` field is the token label and `key` the KEK label.

use std::ffi::{CString, c_char, c_int, c_ulong, c_void};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11 as Module};
use cryptoki::error::{Error as CkError, Rv, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::RawAuthPin;
use serde::{Deserialize, Serialize};

use super::{KekRef, KeyProvider, KmsError};
use crate::audit::{self, AuditRecord, Outcome};
use crate::credfile;
use crate::crypto::keys::Secret;

const KIND: &str = "pkcs11";
use super::blob::{self, IV_LEN, TAG_LEN, VERSION as BLOB_VERSION};
/// AES-256.
const KEK_LEN: usize = 32;
/// Length of the CKA_ID kmfs gives the keys it generates.
const NEW_ID_LEN: usize = 16;
/// Upper bound for one `random` request (a DEK needs 32 bytes).
const MAX_RANDOM: usize = 1 << 20;
/// Upper bound for a PIN file (PINs are short; refuse to read a huge file).
const MAX_PIN_LEN: u64 = 4096;

/// How the KEK is used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pkcs11Mode {
    /// AES-GCM inside the token; the KEK never leaves it (default).
    #[default]
    Wrap,
    /// Fetch an extractable KEK and use it locally (only when configured).
    Extract,
}

impl Pkcs11Mode {
    fn as_str(self) -> &'static str {
        match self {
            Pkcs11Mode::Wrap => "wrap",
            Pkcs11Mode::Extract => "extract",
        }
    }
}

/// The `[pkcs11]` section of a volume config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Absolute path of the PKCS#11 module (shared library). Required.
    pub module: PathBuf,
    /// Token label (exactly one of `token_label` and `slot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_label: Option<String>,
    /// Slot id (exactly one of `token_label` and `slot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u64>,
    /// File holding the user PIN (owned by root, mode 0600 or stricter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_file: Option<PathBuf>,
    /// Name of a systemd credential holding the PIN (`$CREDENTIALS_DIRECTORY/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_credential: Option<String>,
    /// Label of the KEK (its version 1).
    pub key_label: String,
    /// KEK version for new wraps; default: the newest on the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// `wrap` (default) or `extract`.
    #[serde(default)]
    pub mode: Pkcs11Mode,
}

/// A KEK in a PKCS#11 token.
pub struct Pkcs11Provider {
    module_path: PathBuf,
    module: Module,
    slot: Slot,
    token: String,
    key_label: String,
    key_version: Option<u32>,
    mode: Pkcs11Mode,
    pin: Secret,
    session: Mutex<Option<Session>>,
}

/// An error inside an operation, and whether the session it used is gone.
struct OpError {
    err: KmsError,
    session_lost: bool,
}

impl From<KmsError> for OpError {
    fn from(err: KmsError) -> OpError {
        OpError {
            err,
            session_lost: false,
        }
    }
}

type OpResult<T> = Result<T, OpError>;

/// `CKR_PIN_INCORRECT` for `RvError::PinIncorrect`, and so on.
pub fn rv_name(rv: &RvError) -> String {
    match rv {
        RvError::VendorDefined(v) => format!("CKR_VENDOR_DEFINED(0x{v:x})"),
        RvError::UnknownErrorCode(v) => format!("CK_RV 0x{v:x}"),
        other => {
            let camel = format!("{other:?}");
            let mut s = String::from("CKR");
            for c in camel.chars() {
                if c.is_ascii_uppercase() {
                    s.push('_');
                }
                s.push(c.to_ascii_uppercase());
            }
            s
        }
    }
}

/// `C_Decrypt: CKR_ENCRYPTED_DATA_INVALID`, or the library's own message.
fn ck_text(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("C_{f:?}: {}", rv_name(rv)),
        other => other.to_string(),
    }
}

fn rv_of(e: &CkError) -> Option<&RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(rv),
        _ => None,
    }
}

fn is_session_lost(e: &CkError) -> bool {
    matches!(
        rv_of(e),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::UserNotLoggedIn
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::CryptokiNotInitialized
                | RvError::DeviceError
        )
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// The token object label of version `version` of KEK `name`.
pub fn version_label(name: &str, version: u32) -> String {
    if version == 1 {
        name.to_string()
    } else {
        format!("{name}.v{version}")
    }
}

/// The version `label` holds for KEK `name`, if it is one of its labels.
pub fn label_version(name: &str, label: &str) -> Option<u32> {
    if label == name {
        return Some(1);
    }
    let digits = label.strip_prefix(name)?.strip_prefix(".v")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.starts_with('0') {
        return None;
    }
    digits.parse::<u32>().ok().filter(|v| *v >= 2)
}

fn check_key_name(name: &str) -> Result<(), KmsError> {
    if name.is_empty() {
        return Err(KmsError::Config(
            "pkcs11: key_label must not be empty".into(),
        ));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(KmsError::Config(format!(
            "pkcs11: key label {name:?} contains control characters"
        )));
    }
    if let Some((base, _)) = name.rsplit_once(".v")
        && label_version(base, name).is_some()
    {
        return Err(KmsError::Config(format!(
            "pkcs11: key label \"{name}\" ends in .v<number>, which kmfs uses for key versions; use \"{base}\" with key_version instead"
        )));
    }
    Ok(())
}

/// Loads and initialises `path` once per process; later calls share it.
fn load_module(path: &Path) -> Result<Module, KmsError> {
    static MODULES: Mutex<Vec<(PathBuf, Module)>> = Mutex::new(Vec::new());
    let shown = path.display();
    if !path.is_absolute() {
        return Err(KmsError::Config(format!(
            "PKCS#11 module path {shown} must be absolute"
        )));
    }
    let md = std::fs::metadata(path)
        .map_err(|e| KmsError::Config(format!("cannot load PKCS#11 module {shown}: {e}")))?;
    if !md.is_file() {
        return Err(KmsError::Config(format!(
            "cannot load PKCS#11 module {shown}: not a regular file"
        )));
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(KmsError::Config(format!(
            "PKCS#11 module {shown} is writable by group or others (mode {mode:04o}); run: chmod go-w {shown}"
        )));
    }
    let canon = std::fs::canonicalize(path)
        .map_err(|e| KmsError::Config(format!("cannot load PKCS#11 module {shown}: {e}")))?;
    let mut loaded = MODULES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, m)) = loaded.iter().find(|(p, _)| *p == canon) {
        return Ok(m.clone());
    }
    let module = Module::new(&canon)
        .map_err(|e| KmsError::Config(format!("cannot load PKCS#11 module {shown}: {e}")))?;
    match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(KmsError::Config(format!(
                "cannot initialise PKCS#11 module {shown}: {}",
                ck_text(&e)
            )));
        }
    }
    loaded.push((canon, module.clone()));
    Ok(module)
}

/// Reads the PIN from `pin_file` or the systemd credential.
fn read_pin(cfg: &Pkcs11Config) -> Result<Secret, KmsError> {
    let (path, what) = match (&cfg.pin_file, &cfg.pin_credential) {
        (Some(p), None) => (p.clone(), "HSM PIN file"),
        (None, Some(name)) => {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(KmsError::Config(format!(
                    "pkcs11: pin_credential {name:?} is not a valid credential name"
                )));
            }
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                KmsError::Config(format!(
                    "pkcs11: pin_credential \"{name}\" is configured but $CREDENTIALS_DIRECTORY is not set (run kmfs from a systemd unit with LoadCredential={name}:... or use pin_file)"
                ))
            })?;
            (PathBuf::from(dir).join(name), "HSM PIN credential")
        }
        (Some(_), Some(_)) => {
            return Err(KmsError::Config(
                "pkcs11: set either pin_file or pin_credential, not both".into(),
            ));
        }
        (None, None) => {
            return Err(KmsError::Config(
                "pkcs11: no PIN configured: set pin_file or pin_credential".into(),
            ));
        }
    };
    credfile::check_private(&path, what).map_err(|e| KmsError::Config(e.to_string()))?;
    let shown = path.display();
    let len = std::fs::metadata(&path)
        .map_err(|e| KmsError::Config(format!("cannot read {what} {shown}: {e}")))?
        .len();
    if len > MAX_PIN_LEN {
        return Err(KmsError::Config(format!(
            "{what} {shown} is {len} bytes long; it must hold only the PIN"
        )));
    }
    let raw = Secret::from_vec(
        std::fs::read(&path)
            .map_err(|e| KmsError::Config(format!("cannot read {what} {shown}: {e}")))?,
    );
    let bytes = raw.as_bytes();
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    if end == 0 {
        return Err(KmsError::Config(format!("{what} {shown} is empty")));
    }
    Ok(Secret::from_slice(&bytes[..end]))
}

/// Finds the slot of the configured token; returns it and the token's label.
fn find_slot(module: &Module, cfg: &Pkcs11Config) -> Result<(Slot, String), KmsError> {
    let shown = cfg.module.display();
    match (&cfg.token_label, cfg.slot) {
        (Some(label), None) => {
            let slots = module.get_slots_with_token().map_err(|e| {
                KmsError::Unreachable(format!(
                    "PKCS#11 module {shown}: cannot list slots: {}",
                    ck_text(&e)
                ))
            })?;
            let mut found = Vec::new();
            let mut others = Vec::new();
            for s in slots {
                let Ok(info) = module.get_token_info(s) else {
                    continue;
                };
                let l = info.label().trim_end();
                if l == label {
                    found.push(s);
                } else {
                    others.push(format!("\"{l}\""));
                }
            }
            match found.as_slice() {
                [s] => Ok((*s, label.clone())),
                [] => Err(KmsError::KeyNotFound(format!(
                    "no token labelled \"{label}\" in PKCS#11 module {shown} (tokens present: {})",
                    if others.is_empty() {
                        "none".to_string()
                    } else {
                        others.join(", ")
                    }
                ))),
                many => Err(KmsError::Config(format!(
                    "{} tokens are labelled \"{label}\" in PKCS#11 module {shown}; configure slot instead",
                    many.len()
                ))),
            }
        }
        (None, Some(id)) => {
            let slot = Slot::try_from(id).map_err(|e| {
                KmsError::Config(format!("pkcs11: slot {id} is not a valid slot id: {e}"))
            })?;
            let info = module.get_token_info(slot).map_err(|e| {
                KmsError::KeyNotFound(format!(
                    "no token in slot {id} of PKCS#11 module {shown} ({})",
                    ck_text(&e)
                ))
            })?;
            if !info.token_initialized() {
                return Err(KmsError::KeyNotFound(format!(
                    "the token in slot {id} of PKCS#11 module {shown} is not initialised"
                )));
            }
            Ok((slot, info.label().trim_end().to_string()))
        }
        (Some(_), Some(_)) => Err(KmsError::Config(
            "pkcs11: set either token_label or slot, not both".into(),
        )),
        (None, None) => Err(KmsError::Config(
            "pkcs11: no token configured: set token_label or slot".into(),
        )),
    }
}

/// Taken shared by every provider operation and exclusively by those that
/// create or modify token objects (see `with_session_exclusive`).
static OBJECTS_CHANGE: RwLock<()> = RwLock::new(());

/// A key object found on the token.
struct FoundKey {
    handle: ObjectHandle,
    id: Vec<u8>,
}

impl Pkcs11Provider {
    /// Loads the module, finds the token, reads the PIN and logs in.
    pub fn from_config(cfg: &Pkcs11Config) -> Result<Pkcs11Provider, KmsError> {
        check_key_name(&cfg.key_label)?;
        if cfg.key_version == Some(0) {
            return Err(KmsError::Config("pkcs11: key_version starts at 1".into()));
        }
        // Check the configuration before touching the module or the PIN.
        if cfg.token_label.is_some() == cfg.slot.is_some() {
            return Err(KmsError::Config(
                "pkcs11: set exactly one of token_label and slot".into(),
            ));
        }
        if cfg.pin_file.is_some() == cfg.pin_credential.is_some() {
            return Err(KmsError::Config(
                "pkcs11: set exactly one of pin_file and pin_credential".into(),
            ));
        }
        let pin = read_pin(cfg)?;
        let module = load_module(&cfg.module)?;
        let (slot, token) = find_slot(&module, cfg)?;
        let p = Pkcs11Provider {
            module_path: cfg.module.clone(),
            module,
            slot,
            token,
            key_label: cfg.key_label.clone(),
            key_version: cfg.key_version,
            mode: cfg.mode,
            pin,
            session: Mutex::new(None),
        };
        // Log in now so a wrong PIN or a missing token shows up at start.
        let s = p.open_session()?;
        *p.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        Ok(p)
    }

    /// The token label.
    pub fn token_label(&self) -> &str {
        &self.token
    }

    /// The configured mode.
    pub fn mode(&self) -> Pkcs11Mode {
        self.mode
    }

    fn where_(&self) -> String {
        format!(
            "token \"{}\" (PKCS#11 module {})",
            self.token,
            self.module_path.display()
        )
    }

    fn key_where(&self, name: &str, version: u32) -> String {
        format!(
            "key \"{}\" (KEK {name} version {version}) on {}",
            version_label(name, version),
            self.where_()
        )
    }

    fn audit(&self, op: &str, key: &str, version: Option<u32>, res: Result<(), &str>) {
        audit::record(&AuditRecord::new(
            op,
            &self.token,
            key,
            version,
            Outcome::of(&res),
            res.err().unwrap_or_default(),
        ));
    }

    /// Audits the outcome of `r` and passes it on.
    fn audited<T>(&self, op: &str, key: &str, version: Option<u32>, r: OpResult<T>) -> OpResult<T> {
        match &r {
            Ok(_) => self.audit(op, key, version, Ok(())),
            Err(e) => self.audit(op, key, version, Err(&e.err.to_string())),
        }
        r
    }

    /// Opens a read/write session and logs the user in.
    fn open_session(&self) -> Result<Session, KmsError> {
        let r = (|| {
            let s = self.module.open_rw_session(self.slot).map_err(|e| {
                if is_session_lost(&e) || matches!(rv_of(&e), Some(RvError::SlotIdInvalid)) {
                    KmsError::Unreachable(format!(
                        "cannot open a session on {}: {}",
                        self.where_(),
                        ck_text(&e)
                    ))
                } else {
                    KmsError::Protocol(format!(
                        "cannot open a session on {}: {}",
                        self.where_(),
                        ck_text(&e)
                    ))
                }
            })?;
            let pin = RawAuthPin::new(Box::new(self.pin.as_bytes().to_vec()));
            match s.login_with_raw(UserType::User, &pin) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(s),
                Err(e) => Err(match rv_of(&e) {
                    Some(RvError::PinIncorrect) => KmsError::AccessDenied(format!(
                        "wrong PIN for {} ({})",
                        self.where_(),
                        ck_text(&e)
                    )),
                    Some(RvError::PinLocked) => KmsError::AccessDenied(format!(
                        "the user PIN of {} is locked ({}); unblock it with the SO PIN",
                        self.where_(),
                        ck_text(&e)
                    )),
                    Some(RvError::PinLenRange | RvError::PinInvalid | RvError::PinExpired) => {
                        KmsError::AccessDenied(format!(
                            "the PIN for {} was rejected ({})",
                            self.where_(),
                            ck_text(&e)
                        ))
                    }
                    Some(RvError::UserPinNotInitialized) => KmsError::AccessDenied(format!(
                        "{} has no user PIN set ({})",
                        self.where_(),
                        ck_text(&e)
                    )),
                    _ => KmsError::AccessDenied(format!(
                        "cannot log in to {}: {}",
                        self.where_(),
                        ck_text(&e)
                    )),
                }),
            }
        })();
        match &r {
            Ok(_) => self.audit("login", "", None, Ok(())),
            Err(e) => self.audit("login", "", None, Err(&e.to_string())),
        }
        r
    }

    /// Runs `f` with the provider's session, reopening it once if the token
    /// dropped it.
    ///
    /// A key that is not found is looked for twice more, 150 ms apart and on
    /// a fresh session: SoftHSM 2.6 keeps its objects in files, and while
    /// another *process* writes the token (creates a key: another kmfs
    /// rotating, pkcs11-tool), a reader can briefly see the token without
    /// objects that are there. A key that is really missing costs 0.3 s more
    /// to report.
    fn with_session<T>(&self, mut f: impl FnMut(&Session) -> OpResult<T>) -> Result<T, KmsError> {
        let mut attempt = 0;
        loop {
            let r = {
                let _shared = OBJECTS_CHANGE.read().unwrap_or_else(|e| e.into_inner());
                self.with_session_inner(&mut f)
            };
            match r {
                Err(KmsError::KeyNotFound(_)) if attempt < 2 => {
                    attempt += 1;
                    *self.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    std::thread::sleep(std::time::Duration::from_millis(150));
                }
                r => return r,
            }
        }
    }

    /// [`with_session`](Self::with_session) for operations that create or
    /// modify token objects: no other PKCS#11 operation of this process runs
    /// meanwhile. SoftHSM 2.6 races otherwise: an object being created is seen
    /// half-written by a concurrent C_FindObjects, which then fails with
    /// CKR_OBJECT_HANDLE_INVALID and the C_GenerateKey with CKR_GENERAL_ERROR.
    /// Key creation and revocation are rare, so this costs nothing in practice.
    fn with_session_exclusive<T>(
        &self,
        f: impl FnMut(&Session) -> OpResult<T>,
    ) -> Result<T, KmsError> {
        let _exclusive = OBJECTS_CHANGE.write().unwrap_or_else(|e| e.into_inner());
        self.with_session_inner(f)
    }

    fn with_session_inner<T>(
        &self,
        mut f: impl FnMut(&Session) -> OpResult<T>,
    ) -> Result<T, KmsError> {
        let mut guard = self.session.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..2 {
            // A session that was closed or logged out behind our back (another
            // part of the process called C_Logout, the token was re-inserted)
            // would otherwise see no private objects and report the key as
            // missing: check it is still a logged-in user session.
            let usable = guard.as_ref().is_some_and(|s| {
                s.get_session_info()
                    .is_ok_and(|i| i.session_state() == SessionState::RwUser)
            });
            if !usable {
                *guard = None;
                *guard = Some(self.open_session()?);
            }
            let Some(session) = guard.as_ref() else {
                continue;
            };
            match f(session) {
                Ok(v) => return Ok(v),
                Err(e) if e.session_lost => {
                    *guard = None;
                    if attempt == 1 {
                        return Err(e.err);
                    }
                }
                Err(e) => return Err(e.err),
            }
        }
        Err(KmsError::Unreachable(format!(
            "lost the session to {}",
            self.where_()
        )))
    }

    /// Wraps a failure of the PKCS#11 call `what` into an [`OpError`]: a lost
    /// session becomes [`KmsError::Unreachable`], anything else what `make`
    /// builds from the message (which names the function and the CKR_ code).
    fn ck_fail(&self, e: &CkError, make: impl FnOnce(String) -> KmsError, what: &str) -> OpError {
        let text = match e {
            CkError::Pkcs11(..) => ck_text(e),
            other => format!("{what}: {other}"),
        };
        let session_lost = is_session_lost(e);
        let err = if session_lost {
            KmsError::Unreachable(format!("{} failed: {text}", self.where_()))
        } else {
            make(text)
        };
        OpError { err, session_lost }
    }

    /// Finds version `version` of KEK `name` (with CKA_ID `uid` if not empty).
    fn find_key(&self, s: &Session, name: &str, version: u32, uid: &str) -> OpResult<FoundKey> {
        let r = self.find_key_inner(s, name, version, uid);
        self.audited("locate", name, Some(version), r)
    }

    fn find_key_inner(
        &self,
        s: &Session,
        name: &str,
        version: u32,
        uid: &str,
    ) -> OpResult<FoundKey> {
        let label = version_label(name, version);
        let kw = self.key_where(name, version);
        let handles = s
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.clone().into_bytes()),
            ])
            .map_err(|e| {
                self.ck_fail(
                    &e,
                    |m| KmsError::Protocol(format!("{kw}: {m}")),
                    "C_FindObjects",
                )
            })?;
        if handles.is_empty() {
            return Err(KmsError::KeyNotFound(format!(
                "no secret key labelled \"{label}\" (KEK {name} version {version}) on {}",
                self.where_()
            ))
            .into());
        }
        let want = if uid.is_empty() {
            None
        } else {
            Some(unhex(uid).ok_or_else(|| {
                KmsError::Config(format!(
                    "the volume header records CKA_ID {uid:?} for {kw}, which is not hex"
                ))
            })?)
        };
        let mut matching = Vec::new();
        let mut other_ids = Vec::new();
        for h in handles {
            let attrs = match s.get_attributes(h, &[AttributeType::Id, AttributeType::KeyType]) {
                Ok(a) => a,
                // Deleted (or still being created) since C_FindObjects.
                Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => continue,
                Err(e) => {
                    return Err(self.ck_fail(
                        &e,
                        |m| KmsError::Protocol(format!("{kw}: {m}")),
                        "C_GetAttributeValue",
                    ));
                }
            };
            let mut id = Vec::new();
            let mut key_type = None;
            for a in attrs {
                match a {
                    Attribute::Id(v) => id = v,
                    Attribute::KeyType(t) => key_type = Some(t),
                    _ => {}
                }
            }
            if key_type != Some(KeyType::AES) {
                return Err(KmsError::KeyNotFound(format!("{kw} is not an AES key")).into());
            }
            match &want {
                Some(w) if *w != id => other_ids.push(hex(&id)),
                _ => matching.push(FoundKey { handle: h, id }),
            }
        }
        match matching.len() {
            1 => Ok(matching.remove(0)),
            0 => Err(KmsError::KeyNotFound(format!(
                "{kw} has CKA_ID {}, not {uid} as recorded in the volume header: the key was replaced",
                if other_ids.is_empty() {
                    "-".to_string()
                } else {
                    other_ids.join(", ")
                }
            ))
            .into()),
            n => Err(KmsError::KeyNotFound(format!(
                "{n} secret keys are labelled \"{label}\" on {}; give each KEK version a distinct label or CKA_ID",
                self.where_()
            ))
            .into()),
        }
    }

    /// All versions of KEK `name` present on the token, ascending.
    fn versions(&self, s: &Session, name: &str) -> OpResult<Vec<u32>> {
        let r = (|| {
            let handles = s
                .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])
                .map_err(|e| {
                    self.ck_fail(
                        &e,
                        |m| KmsError::Protocol(format!("listing keys on {}: {m}", self.where_())),
                        "C_FindObjects",
                    )
                })?;
            let mut out = Vec::new();
            for h in handles {
                let attrs = match s.get_attributes(h, &[AttributeType::Label]) {
                    Ok(a) => a,
                    // Another session (or process) deleted or is still
                    // creating this object: it is not one of ours to count.
                    Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => continue,
                    Err(e) => {
                        return Err(self.ck_fail(
                            &e,
                            |m| {
                                KmsError::Protocol(format!(
                                    "listing keys on {}: {m}",
                                    self.where_()
                                ))
                            },
                            "C_GetAttributeValue",
                        ));
                    }
                };
                for a in attrs {
                    if let Attribute::Label(l) = a
                        && let Ok(l) = std::str::from_utf8(&l)
                        && let Some(v) = label_version(name, l)
                    {
                        out.push(v);
                    }
                }
            }
            out.sort_unstable();
            out.dedup();
            Ok(out)
        })();
        self.audited("locate", name, None, r)
    }

    /// Reads the boolean attribute `t` of `h`.
    fn get_bool(
        &self,
        s: &Session,
        h: ObjectHandle,
        t: AttributeType,
        kw: &str,
    ) -> OpResult<Option<bool>> {
        let attrs = s.get_attributes(h, &[t]).map_err(|e| {
            self.ck_fail(
                &e,
                |m| KmsError::Protocol(format!("{kw}: {m}")),
                "C_GetAttributeValue",
            )
        })?;
        Ok(attrs.into_iter().find_map(|a| match a {
            Attribute::Encrypt(b)
            | Attribute::Decrypt(b)
            | Attribute::Sensitive(b)
            | Attribute::Extractable(b) => Some(b),
            _ => None,
        }))
    }

    /// Extract mode: the KEK's value in locked memory.
    /// `usage` is CKA_ENCRYPT (wrap) or CKA_DECRYPT (unwrap): the key's usage
    /// flags apply to local use too, so a revoked key stays unusable.
    fn extract(
        &self,
        s: &Session,
        name: &str,
        version: u32,
        key: &FoundKey,
        usage: AttributeType,
    ) -> OpResult<Secret> {
        let r = self.extract_inner(s, name, version, key, usage);
        self.audited("get", name, Some(version), r)
    }

    fn extract_inner(
        &self,
        s: &Session,
        name: &str,
        version: u32,
        key: &FoundKey,
        usage: AttributeType,
    ) -> OpResult<Secret> {
        let kw = self.key_where(name, version);
        if self.get_bool(s, key.handle, usage, &kw)? != Some(true) {
            let (op, flag) = if usage == AttributeType::Encrypt {
                ("encrypt", "CKA_ENCRYPT")
            } else {
                ("decrypt", "CKA_DECRYPT")
            };
            return Err(KmsError::KeyNotFound(format!(
                "{kw} may not {op} ({flag} is false: revoked?)"
            ))
            .into());
        }
        let sensitive = self.get_bool(s, key.handle, AttributeType::Sensitive, &kw)?;
        let extractable = self.get_bool(s, key.handle, AttributeType::Extractable, &kw)?;
        if sensitive != Some(false) || extractable != Some(true) {
            return Err(KmsError::Config(format!(
                "mode = \"extract\" needs an extractable, non-sensitive KEK, but {kw} has CKA_SENSITIVE={} CKA_EXTRACTABLE={}; use mode = \"wrap\" (recommended) or a key created for extraction",
                sensitive.map_or("?".into(), |b| b.to_string()),
                extractable.map_or("?".into(), |b| b.to_string()),
            ))
            .into());
        }
        let mut value = Secret::zeroed(KEK_LEN);
        let rv = raw_get_value(&self.module_path, s, key.handle, value.as_mut_bytes());
        match rv {
            Ok(n) if n == KEK_LEN => Ok(value),
            Ok(n) => Err(KmsError::KeyNotFound(format!(
                "{kw} is {n} bytes long; an AES-256 KEK must be {KEK_LEN}"
            ))
            .into()),
            Err(RawGet::Rv(rv)) => {
                let e = CkError::Pkcs11(rv, cryptoki::context::Function::GetAttributeValue);
                Err(self.ck_fail(
                    &e,
                    |m| {
                        KmsError::Config(format!(
                            "cannot read the value of {kw} in extract mode: {m}; the key is not extractable, use mode = \"wrap\""
                        ))
                    },
                    "C_GetAttributeValue",
                ))
            }
            Err(RawGet::NoSymbol(why)) => Err(KmsError::Unsupported {
                provider: KIND,
                op: why,
            }
            .into()),
        }
    }

    fn check_ref(&self, kek: &KekRef) -> Result<(), KmsError> {
        if kek.provider != KIND {
            return Err(KmsError::Config(format!(
                "the volume's key is held by the {} provider ({kek}), but a PKCS#11 token was configured",
                kek.provider
            )));
        }
        if kek.version == 0 {
            return Err(KmsError::Config(format!(
                "invalid KEK reference ({kek}): versions start at 1"
            )));
        }
        Ok(())
    }

    fn gcm_wrap_in_token(
        &self,
        s: &Session,
        kek: &KekRef,
        key: &FoundKey,
        dek: &Secret,
        aad: &[u8],
    ) -> OpResult<Vec<u8>> {
        let kw = self.key_where(&kek.name, kek.version);
        let iv = blob::fresh_iv()?;
        let mut iv_param = iv;
        let params = GcmParams::new(&mut iv_param, aad, ((TAG_LEN * 8) as u64).into())
            .map_err(|e| KmsError::Protocol(format!("AES-GCM parameters: {e}")))?;
        let ct = s
            .encrypt(&Mechanism::AesGcm(params), key.handle, dek.as_bytes())
            .map_err(|e| {
                self.ck_fail(
                    &e,
                    |m| match rv_of(&e) {
                        Some(RvError::KeyFunctionNotPermitted) => KmsError::KeyNotFound(format!(
                            "{kw} may not encrypt (CKA_ENCRYPT is false: revoked?): {m}"
                        )),
                        Some(RvError::MechanismInvalid | RvError::MechanismParamInvalid) => {
                            KmsError::Unsupported {
                                provider: KIND,
                                op: "CKM_AES_GCM (the token lacks it: use mode = \"extract\" with an extractable key)",
                            }
                        }
                        _ => KmsError::Protocol(format!("wrapping with {kw}: {m}")),
                    },
                    "C_Encrypt",
                )
            })?;
        if ct.len() != dek.len() + TAG_LEN {
            return Err(KmsError::Protocol(format!(
                "wrapping with {kw}: the token returned {} bytes for a {}-byte key, expected {}",
                ct.len(),
                dek.len(),
                dek.len() + TAG_LEN
            ))
            .into());
        }
        Ok(blob::encode(&iv, &ct))
    }

    fn gcm_unwrap_in_token(
        &self,
        s: &Session,
        kek: &KekRef,
        key: &FoundKey,
        wrapped: &[u8],
        aad: &[u8],
    ) -> OpResult<Secret> {
        let kw = self.key_where(&kek.name, kek.version);
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&wrapped[1..1 + IV_LEN]);
        let params = GcmParams::new(&mut iv, aad, ((TAG_LEN * 8) as u64).into())
            .map_err(|e| KmsError::Protocol(format!("AES-GCM parameters: {e}")))?;
        let pt = s
            .decrypt(&Mechanism::AesGcm(params), key.handle, &wrapped[1 + IV_LEN..])
            .map_err(|e| {
                self.ck_fail(
                    &e,
                    |m| match rv_of(&e) {
                        Some(RvError::KeyFunctionNotPermitted) => KmsError::KeyNotFound(format!(
                            "{kw} may not decrypt (CKA_DECRYPT is false: revoked?): {m}"
                        )),
                        Some(RvError::MechanismInvalid | RvError::MechanismParamInvalid) => {
                            KmsError::Unsupported {
                                provider: KIND,
                                op: "CKM_AES_GCM (the token lacks it: use mode = \"extract\" with an extractable key)",
                            }
                        }
                        // A failed GCM tag check: SoftHSM answers
                        // CKR_ENCRYPTED_DATA_INVALID, other tokens the generic codes.
                        Some(
                            RvError::EncryptedDataInvalid
                            | RvError::EncryptedDataLenRange
                            | RvError::DataInvalid
                            | RvError::DataLenRange
                            | RvError::GeneralError
                            | RvError::FunctionFailed,
                        ) => KmsError::WrongKey(format!("{kw} ({m})")),
                        _ => KmsError::Protocol(format!("unwrapping with {kw}: {m}")),
                    },
                    "C_Decrypt",
                )
            })?;
        Ok(Secret::from_vec(pt))
    }

    /// Generates a KEK labelled `label` inside the token.
    fn generate(&self, s: &Session, name: &str, version: u32) -> OpResult<KekRef> {
        let r = self.generate_inner(s, name, version);
        self.audited("create", name, Some(version), r)
    }

    fn generate_inner(&self, s: &Session, name: &str, version: u32) -> OpResult<KekRef> {
        let label = version_label(name, version);
        let kw = self.key_where(name, version);
        let mut id = [0u8; NEW_ID_LEN];
        getrandom::fill(&mut id).map_err(|e| {
            KmsError::Config(format!("operating system random generator failed: {e}"))
        })?;
        // Extract mode can only use a key it may read; wrap mode never reads it.
        let extractable = self.mode == Pkcs11Mode::Extract;
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen((KEK_LEN as u64).into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(!extractable),
            Attribute::Extractable(extractable),
            Attribute::Modifiable(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Label(label.into_bytes()),
            Attribute::Id(id.to_vec()),
        ];
        s.generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(|e| {
                self.ck_fail(
                    &e,
                    |m| match rv_of(&e) {
                        Some(RvError::UserNotLoggedIn | RvError::SessionReadOnly) => {
                            KmsError::AccessDenied(format!("cannot create {kw}: {m}"))
                        }
                        _ => KmsError::Protocol(format!("cannot create {kw}: {m}")),
                    },
                    "C_GenerateKey",
                )
            })?;
        Ok(KekRef {
            provider: KIND.into(),
            name: name.into(),
            uid: hex(&id),
            version,
        })
    }
}

/// Extract mode: AES-256-GCM with the fetched KEK, same blob as the token's.
fn local_wrap(kek: &Secret, dek: &Secret, aad: &[u8]) -> Result<Vec<u8>, KmsError> {
    blob::seal(kek, &blob::fresh_iv()?, dek, aad)
}

/// Reverses [`local_wrap`]; `wrapped` has been length-checked.
fn local_unwrap(kek: &Secret, wrapped: &[u8], aad: &[u8], kw: &str) -> Result<Secret, KmsError> {
    blob::open(kek, wrapped, aad)?.map_err(|e| match e {
        blob::OpenError::Auth => KmsError::WrongKey(format!("{kw} (AES-GCM tag mismatch)")),
        blob::OpenError::Malformed => KmsError::WrongKey(kw.to_string()),
    })
}

/// Why the raw attribute read failed.
enum RawGet {
    Rv(RvError),
    NoSymbol(&'static str),
}

/// Reads CKA_VALUE of `key` straight into `out` with the module's exported
/// `C_GetAttributeValue`, so the key never passes through an unzeroized heap
/// buffer (cryptoki's `get_attributes` would leave one). Returns the length.
fn raw_get_value(
    module: &Path,
    s: &Session,
    key: ObjectHandle,
    out: &mut [u8],
) -> Result<usize, RawGet> {
    #[repr(C)]
    struct CkAttribute {
        type_: c_ulong,
        p_value: *mut c_void,
        value_len: c_ulong,
    }
    type GetAttributeValue =
        unsafe extern "C" fn(c_ulong, c_ulong, *mut CkAttribute, c_ulong) -> c_ulong;
    const CKA_VALUE: c_ulong = 0x11;
    const CK_UNAVAILABLE_INFORMATION: c_ulong = !0;

    let Ok(path) = CString::new(module.as_os_str().as_bytes()) else {
        return Err(RawGet::NoSymbol(
            "reading a key value (module path has a NUL byte)",
        ));
    };
    let flags: c_int = libc::RTLD_NOW | libc::RTLD_NOLOAD;
    // SAFETY: `path` is a valid C string; RTLD_NOLOAD only returns a handle to
    // the module cryptoki has already loaded (no constructors run again).
    let handle = unsafe { libc::dlopen(path.as_ptr(), flags) };
    if handle.is_null() {
        return Err(RawGet::NoSymbol("reading a key value (module not loaded)"));
    }
    let sym = c"C_GetAttributeValue";
    // SAFETY: `handle` is a live dlopen handle and `sym` a valid C string.
    let f = unsafe { libc::dlsym(handle, sym.as_ptr() as *const c_char) };
    let rv = if f.is_null() {
        Err(RawGet::NoSymbol(
            "reading a key value (the module does not export C_GetAttributeValue)",
        ))
    } else {
        // SAFETY: PKCS#11 defines C_GetAttributeValue with this signature
        // (CK_SESSION_HANDLE, CK_OBJECT_HANDLE, CK_ATTRIBUTE_PTR, CK_ULONG), all
        // CK_ULONG = unsigned long on Unix.
        let f: GetAttributeValue =
            unsafe { std::mem::transmute::<*mut c_void, GetAttributeValue>(f) };
        let mut attr = CkAttribute {
            type_: CKA_VALUE,
            p_value: out.as_mut_ptr().cast(),
            value_len: out.len() as c_ulong,
        };
        // SAFETY: the session and object handles are live (the session is held
        // by our mutex for the whole call), `attr` points to `out`, which is
        // writable for `value_len` bytes, and the module writes at most that.
        let rv = unsafe { f(s.handle(), key.handle(), &mut attr, 1) };
        if rv == 0 && attr.value_len != CK_UNAVAILABLE_INFORMATION {
            Ok(attr.value_len as usize)
        } else if rv == 0 {
            Err(RawGet::Rv(RvError::AttributeSensitive))
        } else {
            Err(RawGet::Rv(match Rv::from(rv) {
                Rv::Error(e) => e,
                Rv::Ok => RvError::GeneralError,
            }))
        }
    };
    // SAFETY: balances the dlopen above; cryptoki keeps its own reference, so
    // the module stays loaded.
    unsafe { libc::dlclose(handle) };
    rv
}

impl KeyProvider for Pkcs11Provider {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn describe(&self) -> String {
        format!(
            "pkcs11 {} key \"{}\"{} mode {}",
            self.where_(),
            self.key_label,
            self.key_version
                .map(|v| format!(" version {v}"))
                .unwrap_or_default(),
            self.mode.as_str()
        )
    }

    fn current_kek(&self) -> Result<KekRef, KmsError> {
        let name = self.key_label.clone();
        self.with_session(|s| {
            let version = match self.key_version {
                Some(v) => v,
                None => *self.versions(s, &name)?.last().ok_or_else(|| {
                    KmsError::KeyNotFound(format!(
                        "no secret key labelled \"{name}\" on {}; create it (kmfs init can) or with pkcs11-tool --keygen --key-type AES:32 --label {name} --sensitive --private --usage-decrypt --usage-wrap",
                        self.where_()
                    ))
                })?,
            };
            let key = self.find_key(s, &name, version, "")?;
            let kw = self.key_where(&name, version);
            if self.get_bool(s, key.handle, AttributeType::Encrypt, &kw)? == Some(false) {
                return Err(KmsError::KeyNotFound(format!(
                    "{kw} may not encrypt (CKA_ENCRYPT is false: revoked?)"
                ))
                .into());
            }
            Ok(KekRef {
                provider: KIND.into(),
                name: name.clone(),
                uid: hex(&key.id),
                version,
            })
        })
    }

    fn wrap(&self, kek: &KekRef, dek: &Secret, aad: &[u8]) -> Result<Vec<u8>, KmsError> {
        self.check_ref(kek)?;
        self.with_session(|s| {
            let key = self.find_key(s, &kek.name, kek.version, &kek.uid)?;
            let r = match self.mode {
                Pkcs11Mode::Wrap => self.gcm_wrap_in_token(s, kek, &key, dek, aad),
                Pkcs11Mode::Extract => {
                    let k =
                        self.extract(s, &kek.name, kek.version, &key, AttributeType::Encrypt)?;
                    local_wrap(&k, dek, aad).map_err(OpError::from)
                }
            };
            self.audited("wrap", &kek.name, Some(kek.version), r)
        })
    }

    fn unwrap(&self, kek: &KekRef, wrapped: &[u8], aad: &[u8]) -> Result<Secret, KmsError> {
        self.check_ref(kek)?;
        if wrapped.len() < 1 + IV_LEN + TAG_LEN || wrapped[0] != BLOB_VERSION {
            let e = KmsError::WrongKey(format!(
                "{} (the wrapped key is malformed: {} bytes, format {})",
                self.key_where(&kek.name, kek.version),
                wrapped.len(),
                wrapped.first().map_or("-".into(), |b| b.to_string())
            ));
            self.audit("unwrap", &kek.name, Some(kek.version), Err(&e.to_string()));
            return Err(e);
        }
        self.with_session(|s| {
            let key = self.find_key(s, &kek.name, kek.version, &kek.uid)?;
            let r = match self.mode {
                Pkcs11Mode::Wrap => self.gcm_unwrap_in_token(s, kek, &key, wrapped, aad),
                Pkcs11Mode::Extract => {
                    let k =
                        self.extract(s, &kek.name, kek.version, &key, AttributeType::Decrypt)?;
                    let kw = self.key_where(&kek.name, kek.version);
                    local_unwrap(&k, wrapped, aad, &kw).map_err(OpError::from)
                }
            };
            self.audited("unwrap", &kek.name, Some(kek.version), r)
        })
    }

    fn random(&self, len: usize) -> Result<Secret, KmsError> {
        if len > MAX_RANDOM {
            return Err(KmsError::Config(format!(
                "pkcs11: {len} random bytes requested; at most {MAX_RANDOM} per call"
            )));
        }
        let mut out = Secret::zeroed(len);
        if len == 0 {
            return Ok(out);
        }
        self.with_session(|s| {
            let r = s.generate_random_slice(out.as_mut_bytes()).map_err(|e| {
                self.ck_fail(
                    &e,
                    |m| KmsError::Protocol(format!("random generator of {}: {m}", self.where_())),
                    "C_GenerateRandom",
                )
            });
            self.audited("random", "", None, r)
        })?;
        Ok(out)
    }

    fn create_kek(&self, name: Option<&str>) -> Result<KekRef, KmsError> {
        match name {
            Some(label) => {
                check_key_name(label)?;
                self.with_session_exclusive(|s| {
                    match self.find_key(s, label, 1, "") {
                        Ok(key) => {
                            return Ok(KekRef {
                                provider: KIND.into(),
                                name: label.into(),
                                uid: hex(&key.id),
                                version: 1,
                            });
                        }
                        Err(OpError {
                            err: KmsError::KeyNotFound(m),
                            ..
                        }) if m.starts_with("no secret key") => {}
                        Err(e) => return Err(e),
                    }
                    self.generate(s, label, 1)
                })
            }
            None => {
                let name = self.key_label.clone();
                self.with_session_exclusive(|s| {
                    let next = self
                        .versions(s, &name)?
                        .last()
                        .map_or(Some(1), |v| v.checked_add(1))
                        .ok_or_else(|| {
                            KmsError::Config(format!("KEK {name} has run out of version numbers"))
                        })?;
                    self.generate(s, &name, next)
                })
            }
        }
    }

    fn revoke(&self, kek: &KekRef) -> Result<(), KmsError> {
        self.check_ref(kek)?;
        self.with_session_exclusive(|s| {
            let key = self.find_key(s, &kek.name, kek.version, &kek.uid)?;
            let kw = self.key_where(&kek.name, kek.version);
            let r = s
                .update_attributes(
                    key.handle,
                    &[
                        Attribute::Encrypt(false),
                        Attribute::Decrypt(false),
                        Attribute::Wrap(false),
                        Attribute::Unwrap(false),
                    ],
                )
                .map_err(|e| {
                    self.ck_fail(
                        &e,
                        |m| match rv_of(&e) {
                            Some(RvError::AttributeReadOnly | RvError::ActionProhibited) => {
                                KmsError::Config(format!(
                                    "cannot revoke {kw}: the token does not let its usage flags be changed ({m})"
                                ))
                            }
                            _ => KmsError::Protocol(format!("cannot revoke {kw}: {m}")),
                        },
                        "C_SetAttributeValue",
                    )
                });
            self.audited("revoke", &kek.name, Some(kek.version), r)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_labels_round_trip() {
        assert_eq!(version_label("kek", 1), "kek");
        assert_eq!(version_label("kek", 12), "kek.v12");
        for v in [1, 2, 9, 10, 4_000_000_000] {
            assert_eq!(label_version("kek", &version_label("kek", v)), Some(v));
        }
        for other in [
            "kek.v",
            "kek.v1",
            "kek.v01",
            "kek.vx",
            "kek2",
            "ke",
            "kek.v2a",
            "kek.v99999999999",
        ] {
            assert_eq!(label_version("kek", other), None, "{other}");
        }
        assert!(check_key_name("kek.v2").is_err());
        assert!(check_key_name("kek.v").is_ok());
        assert!(check_key_name("").is_err());
        assert!(check_key_name("vol1-kek").is_ok());
    }

    #[test]
    fn rv_names() {
        assert_eq!(rv_name(&RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(
            rv_name(&RvError::EncryptedDataInvalid),
            "CKR_ENCRYPTED_DATA_INVALID"
        );
        assert_eq!(rv_name(&RvError::UnknownErrorCode(0x1234)), "CK_RV 0x1234");
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])),
            Some(vec![0, 1, 0xab, 0xff])
        );
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("é1"), None);
    }

    #[test]
    fn config_parses_and_refuses_unknown_fields() {
        let c: Pkcs11Config = toml::from_str(
            r#"
            module = "/usr/lib/softhsm/libsofthsm2.so"
            token_label = "kmfs"
            pin_file = "/etc/kmfs/pin"
            key_label = "vol1-kek"
            "#,
        )
        .unwrap();
        assert_eq!(c.mode, Pkcs11Mode::Wrap);
        assert_eq!(c.key_version, None);
        let back: Pkcs11Config = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let c: Pkcs11Config = toml::from_str(
            "module = \"/m.so\"\nslot = 3\npin_credential = \"pin\"\nkey_label = \"k\"\nkey_version = 2\nmode = \"extract\"\n",
        )
        .unwrap();
        assert_eq!(
            (c.slot, c.key_version, c.mode),
            (Some(3), Some(2), Pkcs11Mode::Extract)
        );
        let e = toml::from_str::<Pkcs11Config>(
            "module = \"/m.so\"\ntoken_label = \"t\"\npin_file = \"/p\"\nkey_label = \"k\"\npin = \"1234\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("pin"), "{e}");
        assert!(
            toml::from_str::<Pkcs11Config>("token_label = \"t\"\nkey_label = \"k\"\n").is_err(),
            "module is required"
        );
        assert!(
            toml::from_str::<Pkcs11Config>(
                "module = \"/m.so\"\ntoken_label = \"t\"\npin_file = \"/p\"\nkey_label = \"k\"\nmode = \"copy\"\n"
            )
            .is_err()
        );
    }

    fn cfg() -> Pkcs11Config {
        Pkcs11Config {
            module: "/nonexistent/libpkcs11.so".into(),
            token_label: Some("t".into()),
            slot: None,
            pin_file: Some("/nonexistent/pin".into()),
            pin_credential: None,
            key_label: "k".into(),
            key_version: None,
            mode: Pkcs11Mode::Wrap,
        }
    }

    #[test]
    fn config_errors_are_clear() {
        let msg = |c: &Pkcs11Config| Pkcs11Provider::from_config(c).err().unwrap().to_string();
        let mut c = cfg();
        c.slot = Some(1);
        assert!(msg(&c).contains("exactly one of token_label and slot"));
        let mut c = cfg();
        c.pin_credential = Some("x".into());
        assert!(msg(&c).contains("exactly one of pin_file and pin_credential"));
        let mut c = cfg();
        c.key_version = Some(0);
        assert!(msg(&c).contains("key_version"));
        let m = msg(&cfg());
        assert!(
            m.contains("HSM PIN file") && m.contains("/nonexistent/pin"),
            "{m}"
        );

        let d = tempfile::tempdir().unwrap();
        let pin = d.path().join("pin");
        std::fs::write(&pin, "1234\n").unwrap();
        std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut c = cfg();
        c.pin_file = Some(pin.clone());
        let m = msg(&c);
        assert!(m.contains("/nonexistent/libpkcs11.so"), "{m}");
        c.module = "relative/lib.so".into();
        assert!(msg(&c).contains("absolute"));

        std::fs::write(&pin, "\n").unwrap();
        let mut c = cfg();
        c.pin_file = Some(pin);
        assert!(msg(&c).contains("empty"));
    }

    #[test]
    fn provider_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Pkcs11Provider>();
    }
}
