//! Raw calls into the PKCS#11 module that cryptoki does not offer safely
//! enough. Every `unsafe` block of the PKCS#11 provider is here.

use std::ffi::{CString, c_char, c_int, c_ulong, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use cryptoki::error::{Rv, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

/// Why the raw attribute read failed.
pub(super) enum RawGet {
    Rv(RvError),
    NoSymbol(&'static str),
}

/// Reads CKA_VALUE of `key` straight into `out` with the module's exported
/// `C_GetAttributeValue`, so the key never passes through an unzeroized heap
/// buffer (cryptoki's `get_attributes` would leave one). Returns the length.
pub(super) fn raw_get_value(
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
