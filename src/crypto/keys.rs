//! Secret key material in memory.
//!
//! Every secret (DEK, KEK fetched from a key manager, derived subkeys) lives in a
//! [`Secret`]: a page-aligned allocation of its own that is locked in RAM
//! (`mlock`), excluded from core dumps (`MADV_DONTDUMP`) and overwritten with
//! zeros before it is freed. Its `Debug` output never shows the bytes.
//!
//! Subkeys are derived from the volume DEK with HKDF-SHA256 ([`derive`]); each
//! use has its own `info` label so no two purposes ever share a key.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fmt;
use std::ptr::NonNull;

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroize;

/// Length of the volume data encryption key (DEK) in bytes.
pub const DEK_LEN: usize = 32;

/// HKDF `info` labels, one per purpose. Changing any of them changes the format.
pub mod labels {
    /// 64 bytes: the two AES-256 keys of XTS for file contents.
    pub const CONTENT_XTS: &[u8] = b"kmfs v1 content aes-256-xts";
    /// 64 bytes: the AES-SIV (CMAC-AES-256 + CTR-AES-256) key for names.
    pub const NAMES_SIV: &[u8] = b"kmfs v1 names aes-256-siv";
    /// 32 bytes: HMAC-SHA256 key authenticating the volume header.
    pub const HEADER_MAC: &[u8] = b"kmfs v1 volume header hmac-sha256";
    /// 32 bytes: AES-256-GCM key for extended-attribute values and symlink targets.
    pub const METADATA_GCM: &[u8] = b"kmfs v1 metadata aes-256-gcm";
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n <= 0 { 4096 } else { n as usize }
}

/// A fixed-length secret held in locked, non-dumpable memory and zeroized on drop.
pub struct Secret {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    locked: bool,
}

// SAFETY: `Secret` owns its allocation exclusively (like a Box<[u8]>); no interior
// mutability is exposed through `&Secret`.
unsafe impl Send for Secret {}
// SAFETY: as above: shared references only allow reads.
unsafe impl Sync for Secret {}

impl Secret {
    /// A zero-filled secret of `len` bytes.
    pub fn zeroed(len: usize) -> Secret {
        let page = page_size();
        let size = len.max(1).div_ceil(page) * page;
        let layout = Layout::from_size_align(size, page).expect("page-aligned layout is valid");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: ptr..ptr+size is our own allocation; mlock and madvise only change
        // how the kernel treats those pages.
        let locked = unsafe {
            let ok = libc::mlock(ptr.as_ptr().cast(), size) == 0;
            libc::madvise(ptr.as_ptr().cast(), size, libc::MADV_DONTDUMP);
            ok
        };
        if !locked {
            warn_mlock_failed(size);
        }
        Secret {
            ptr,
            len,
            layout,
            locked,
        }
    }

    /// Copies `bytes` into a new secret. The caller should zeroize its own copy.
    pub fn from_slice(bytes: &[u8]) -> Secret {
        let mut s = Secret::zeroed(bytes.len());
        s.as_mut_bytes().copy_from_slice(bytes);
        s
    }

    /// Takes ownership of `bytes`, zeroizing the vector after the copy.
    pub fn from_vec(mut bytes: Vec<u8>) -> Secret {
        let s = Secret::from_slice(&bytes);
        bytes.zeroize();
        s
    }

    /// `len` bytes from the operating system's CSPRNG.
    pub fn random(len: usize) -> Result<Secret, getrandom::Error> {
        let mut s = Secret::zeroed(len);
        getrandom::fill(s.as_mut_bytes())?;
        Ok(s)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `mlock` succeeded (it can fail under a low RLIMIT_MEMLOCK).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: ptr is valid for len (<= layout.size()) initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// XORs `other` into this secret (used to mix two independent random sources).
    pub fn xor_with(&mut self, other: &[u8]) {
        for (a, b) in self.as_mut_bytes().iter_mut().zip(other) {
            *a ^= b;
        }
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &Secret) -> bool {
        use subtle::ConstantTimeEq;
        self.len == other.len && bool::from(self.as_bytes().ct_eq(other.as_bytes()))
    }
}

impl Clone for Secret {
    fn clone(&self) -> Secret {
        Secret::from_slice(self.as_bytes())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // SAFETY: the whole allocation is ours and initialised; we wipe it, undo the
        // lock and free it with the layout it was allocated with.
        unsafe {
            let all = std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size());
            all.zeroize();
            if self.locked {
                libc::munlock(self.ptr.as_ptr().cast(), self.layout.size());
            }
            dealloc(self.ptr.as_ptr(), self.layout);
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes, redacted)", self.len)
    }
}

/// A value (e.g. an expanded AES key schedule, which is as secret as the key)
/// kept in its own locked, non-dumpable pages and wiped when dropped.
pub struct Locked<T> {
    ptr: NonNull<T>,
    layout: Layout,
    locked: bool,
}

// SAFETY: `Locked<T>` owns its T exclusively, like Box<T>.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: shared access only hands out &T.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    pub fn new(value: T) -> Locked<T> {
        let page = page_size();
        let size = std::mem::size_of::<T>().max(1).div_ceil(page) * page;
        let align = page.max(std::mem::align_of::<T>());
        let layout = Layout::from_size_align(size, align).expect("page-aligned layout is valid");
        // SAFETY: non-zero size; the pointer is checked for null below.
        let raw = unsafe { alloc_zeroed(layout) }.cast::<T>();
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: ptr is a fresh, suitably aligned allocation for T; mlock and
        // madvise only affect how the kernel handles these pages.
        let locked = unsafe {
            ptr.as_ptr().write(value);
            let ok = libc::mlock(ptr.as_ptr().cast(), size) == 0;
            libc::madvise(ptr.as_ptr().cast(), size, libc::MADV_DONTDUMP);
            ok
        };
        if !locked {
            warn_mlock_failed(size);
        }
        Locked {
            ptr,
            layout,
            locked,
        }
    }
}

impl<T> std::ops::Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: ptr holds an initialised T for the lifetime of self.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        // SAFETY: we drop the T we wrote in `new`, then wipe, unlock and free the
        // allocation with its original layout.
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr());
            let all =
                std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), self.layout.size());
            all.zeroize();
            if self.locked {
                libc::munlock(self.ptr.as_ptr().cast(), self.layout.size());
            }
            dealloc(self.ptr.as_ptr().cast(), self.layout);
        }
    }
}

/// Derives `len` bytes for `label` from `ikm` (normally the DEK) with HKDF-SHA256.
/// `salt` binds the derivation to one volume (its volume id).
pub fn derive(ikm: &Secret, salt: &[u8], label: &[u8], len: usize) -> Secret {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm.as_bytes());
    let mut out = Secret::zeroed(len);
    hk.expand(label, out.as_mut_bytes())
        .expect("HKDF output length is at most 255 * 32 bytes");
    out
}

/// Says once per process that key memory could not be locked (it may then
/// be swapped out), with the cause and the fix.
fn warn_mlock_failed(size: usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    if WARNED.swap(true, Ordering::Relaxed) {
        return;
    }
    let err = std::io::Error::last_os_error();
    let msg = format!(
        "cannot lock {size} bytes of key memory ({err}): keys may be written to swap; raise the memlock limit (LimitMEMLOCK= in the systemd unit, ulimit -l)"
    );
    log::warn!("op=mlock result=warn msg=\"{msg}\"");
    eprintln!("kmfs: warning: {msg}");
}

/// Turns off core dumps for this process and marks it non-dumpable, so that keys
/// in memory can never land in a core file. Called once at daemon start.
pub fn harden_process() -> std::io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit and prctl with these constant arguments only change
    // this process's own limits and flags.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_roundtrip_and_redacted_debug() {
        let s = Secret::from_slice(&[7u8; 32]);
        assert_eq!(s.as_bytes(), &[7u8; 32]);
        assert_eq!(format!("{s:?}"), "Secret(32 bytes, redacted)");
        assert!(!format!("{s:?}").contains('7'));
    }

    #[test]
    fn secret_is_page_aligned_and_locked_when_allowed() {
        let s = Secret::zeroed(64);
        assert_eq!(s.as_bytes().as_ptr() as usize % page_size(), 0);
        // Running as root (CI and the daemon), mlock must succeed.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(s.is_locked());
        }
    }

    #[test]
    fn hkdf_labels_give_distinct_keys() {
        let dek = Secret::from_slice(&[1u8; 32]);
        let a = derive(&dek, b"vol", labels::CONTENT_XTS, 64);
        let b = derive(&dek, b"vol", labels::NAMES_SIV, 64);
        let c = derive(&dek, b"other", labels::CONTENT_XTS, 64);
        assert!(!a.ct_eq(&b));
        assert!(!a.ct_eq(&c));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn hkdf_matches_rfc5869_case_1() {
        // RFC 5869 A.1 (SHA-256).
        let ikm = Secret::from_slice(&[0x0b; 22]);
        let salt: Vec<u8> = (0u8..=0x0c).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        let okm = derive(&ikm, &salt, &info, 42);
        let want =
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865";
        assert_eq!(hex(okm.as_bytes()), want);
    }

    use crate::hex::encode as hex;
}
