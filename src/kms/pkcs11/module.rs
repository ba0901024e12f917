//! Loading and initialising a PKCS#11 module (once per process) and finding
//! the configured token's slot.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11 as Module};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::slot::Slot;

use super::Pkcs11Config;
use super::error::ck_text;
use crate::kms::KmsError;
use crate::sync::MutexExt;

/// Loads and initialises `path` once per process; later calls share it.
pub(super) fn load_module(path: &Path) -> Result<Module, KmsError> {
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
    let mut loaded = MODULES.locked();
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

/// Finds the slot of the configured token; returns it and the token's label.
pub(super) fn find_slot(module: &Module, cfg: &Pkcs11Config) -> Result<(Slot, String), KmsError> {
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
