//! A bounds-checked big-endian reader over a byte slice, for the binary
//! formats kmfs decodes (volume header, rekey journal records).

/// Reads fixed-size big-endian fields from `b`, starting at `pos`; every
/// read returns `None` instead of running past the end.
pub struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor over `b` at offset `pos`.
    pub fn new(b: &'a [u8], pos: usize) -> Cursor<'a> {
        Cursor { b, pos }
    }

    /// The offset of the next read.
    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::Cursor;

    #[test]
    fn reads_big_endian_and_stops_at_the_end() {
        let b = [1u8, 0, 2, 0, 0, 0, 3, 9];
        let mut c = Cursor::new(&b, 0);
        assert_eq!(c.u8(), Some(1));
        assert_eq!(c.u16(), Some(2));
        assert_eq!(c.u32(), Some(3));
        assert_eq!(c.pos(), 7);
        assert_eq!(c.u16(), None);
        assert_eq!(c.pos(), 7);
        assert_eq!(c.u8(), Some(9));
        assert_eq!(c.take(1), None);
        assert_eq!(Cursor::new(&b, 100).u8(), None);
    }
}
