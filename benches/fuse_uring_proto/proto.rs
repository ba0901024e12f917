//! The FUSE wire format this prototype speaks (include/uapi/linux/fuse.h,
//! protocol 7.42+), as plain byte offsets: little-endian fields read and
//! written with bounds checks, no `unsafe` and no struct transmutes.

pub const FUSE_KERNEL_VERSION: u32 = 7;
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 42;

pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const MKDIR: u32 = 9;
pub const UNLINK: u32 = 10;
pub const RMDIR: u32 = 11;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const GETXATTR: u32 = 22;
pub const LISTXATTR: u32 = 23;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const CREATE: u32 = 35;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;
pub const READDIRPLUS: u32 = 44;

// fuse_init_in/out flags (flags2 holds bits 32..63 when FUSE_INIT_EXT is set).
pub const FUSE_ASYNC_READ: u64 = 1 << 0;
pub const FUSE_BIG_WRITES: u64 = 1 << 5;
pub const FUSE_DO_READDIRPLUS: u64 = 1 << 13;
pub const FUSE_PARALLEL_DIROPS: u64 = 1 << 18;
pub const FUSE_MAX_PAGES: u64 = 1 << 22;
pub const FUSE_INIT_EXT: u64 = 1 << 30;
/// The io_uring transport (bit 41, so bit 9 of flags2).
pub const FUSE_OVER_IO_URING: u64 = 1 << 41;

// SETATTR `valid` bits.
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_ATIME: u32 = 1 << 4;
pub const FATTR_MTIME: u32 = 1 << 5;
pub const FATTR_FH: u32 = 1 << 6;
pub const FATTR_ATIME_NOW: u32 = 1 << 7;
pub const FATTR_MTIME_NOW: u32 = 1 << 8;

/// sizeof(struct fuse_in_header).
pub const IN_HEADER: usize = 40;
/// sizeof(struct fuse_out_header).
pub const OUT_HEADER: usize = 16;
/// sizeof(struct fuse_attr).
pub const ATTR: usize = 88;
/// sizeof(struct fuse_entry_out).
pub const ENTRY_OUT: usize = 40 + ATTR;

// io_uring transport (struct fuse_uring_req_header and friends).
/// `in_out` (fuse_in_header / fuse_out_header) + `op_in` + `ring_ent_in_out`.
pub const URING_HEADER: usize = 128 + 128 + 32;
pub const URING_OP_IN: usize = 128;
/// Offset of `ring_ent_in_out.payload_sz` in the header buffer.
pub const URING_PAYLOAD_SZ: usize = 256 + 16;
pub const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
pub const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

/// Size of the per-operation header (`in_args[0]` in the kernel) that
/// precedes names and data. The io_uring transport puts this header in
/// `op_in` and the rest in the payload buffer; the classic transport sends
/// them back to back, so the classic loop splits at this size and both
/// transports hand the handler the same two slices.
pub fn op_header_size(opcode: u32) -> usize {
    match opcode {
        FORGET | INTERRUPT | OPEN | OPENDIR | MKDIR | GETXATTR | LISTXATTR | BATCH_FORGET => 8,
        GETATTR | CREATE | FSYNC | FSYNCDIR => 16,
        RELEASE | RELEASEDIR | FLUSH => 24,
        FALLOCATE => 32,
        READ | READDIR | READDIRPLUS | WRITE => 40,
        INIT => 64,
        SETATTR => 88,
        _ => 0, // LOOKUP, UNLINK, RMDIR, STATFS, DESTROY: name (if any) only
    }
}

pub fn u16_at(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

pub fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

pub fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// struct fuse_in_header, decoded.
#[derive(Clone, Copy, Debug)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        (b.len() >= IN_HEADER).then(|| InHeader {
            opcode: u32_at(b, 4),
            unique: u64_at(b, 8),
            nodeid: u64_at(b, 16),
        })
    }
}

/// struct fuse_out_header.
pub fn out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER] {
    let mut h = [0u8; OUT_HEADER];
    h[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// A bounds-checked little-endian writer over a reply buffer.
pub struct W<'a> {
    buf: &'a mut [u8],
    pub pos: usize,
}

/// The reply did not fit the buffer the kernel gave (never expected: the
/// buffers are sized from max_write / max_read).
#[derive(Debug)]
pub struct Overflow;

impl<'a> W<'a> {
    pub fn new(buf: &'a mut [u8]) -> W<'a> {
        W { buf, pos: 0 }
    }
    pub fn bytes(&mut self, b: &[u8]) -> Result<(), Overflow> {
        let end = self.pos + b.len();
        self.buf
            .get_mut(self.pos..end)
            .ok_or(Overflow)?
            .copy_from_slice(b);
        self.pos = end;
        Ok(())
    }
    pub fn u32(&mut self, v: u32) -> Result<(), Overflow> {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) -> Result<(), Overflow> {
        self.bytes(&v.to_le_bytes())
    }
    pub fn zeros(&mut self, n: usize) -> Result<(), Overflow> {
        let end = self.pos + n;
        self.buf.get_mut(self.pos..end).ok_or(Overflow)?.fill(0);
        self.pos = end;
        Ok(())
    }
}

/// struct fuse_attr from a stat buffer.
pub fn put_attr(w: &mut W<'_>, st: &libc::stat) -> Result<(), Overflow> {
    w.u64(st.st_ino)?;
    w.u64(st.st_size as u64)?;
    w.u64(st.st_blocks as u64)?;
    w.u64(st.st_atime as u64)?;
    w.u64(st.st_mtime as u64)?;
    w.u64(st.st_ctime as u64)?;
    w.u32(st.st_atime_nsec as u32)?;
    w.u32(st.st_mtime_nsec as u32)?;
    w.u32(st.st_ctime_nsec as u32)?;
    w.u32(st.st_mode)?;
    w.u32(st.st_nlink as u32)?;
    w.u32(st.st_uid)?;
    w.u32(st.st_gid)?;
    w.u32(st.st_rdev as u32)?;
    w.u32(st.st_blksize as u32)?;
    w.u32(0) // flags
}

/// struct fuse_entry_out.
pub fn put_entry(
    w: &mut W<'_>,
    nodeid: u64,
    st: &libc::stat,
    timeout: u64,
) -> Result<(), Overflow> {
    w.u64(nodeid)?;
    w.u64(0)?; // generation
    w.u64(timeout)?; // entry_valid
    w.u64(timeout)?; // attr_valid
    w.u32(0)?;
    w.u32(0)?;
    put_attr(w, st)
}

/// A fuse_dirent's size, padded to 8 bytes.
pub fn dirent_size(namelen: usize) -> usize {
    (24 + namelen + 7) & !7
}

/// struct fuse_dirent (after a fuse_entry_out for READDIRPLUS).
pub fn put_dirent(
    w: &mut W<'_>,
    ino: u64,
    off: u64,
    dtype: u8,
    name: &[u8],
) -> Result<(), Overflow> {
    let start = w.pos;
    w.u64(ino)?;
    w.u64(off)?;
    w.u32(name.len() as u32)?;
    w.u32(u32::from(dtype))?;
    w.bytes(name)?;
    let pad = dirent_size(name.len()) - (w.pos - start);
    w.zeros(pad)
}
