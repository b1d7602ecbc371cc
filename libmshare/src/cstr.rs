//! NUL-terminated strings built on the stack, for the code that runs inside the
//! `LD_PRELOAD` shim's system calls and may not allocate.

use std::ffi::CStr;

/// A NUL-terminated string of at most `N - 1` bytes, built on the stack.
#[derive(Clone)]
pub struct StackStr<const N: usize> {
    buf: [u8; N],
    len: usize,
}

/// A piece did not fit (or contained a NUL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

impl<const N: usize> Default for StackStr<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> StackStr<N> {
    /// The empty string.
    pub fn new() -> Self {
        StackStr {
            buf: [0; N],
            len: 0,
        }
    }

    /// Appends `bytes`; `Err` when they (with the NUL) do not fit or contain a NUL.
    ///
    /// # Errors
    /// [`TooLong`], with the string unchanged.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), TooLong> {
        if bytes.contains(&0) || self.len + bytes.len() >= N {
            return Err(TooLong);
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self.buf[self.len] = 0;
        Ok(())
    }

    /// Appends `n` in decimal.
    ///
    /// # Errors
    /// [`TooLong`].
    pub fn push_u64(&mut self, mut n: u64) -> Result<(), TooLong> {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    /// The bytes, without the NUL.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The string.
    pub fn as_cstr(&self) -> &CStr {
        // `push` keeps a NUL at `len` and none before it.
        CStr::from_bytes_with_nul(&self.buf[..=self.len]).unwrap_or(c"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_strings_refuse_what_does_not_fit() {
        let mut s = StackStr::<16>::new();
        s.push(b"anon-").unwrap();
        s.push_u64(4_294_967_295).unwrap();
        assert_eq!(s.as_cstr(), c"anon-4294967295");
        assert_eq!(s.push(b"x"), Err(TooLong));
        let mut z = StackStr::<16>::new();
        z.push_u64(0).unwrap();
        assert_eq!(z.as_cstr(), c"0");
        assert_eq!(z.push(b"a\0b"), Err(TooLong));
        assert_eq!(z.as_cstr(), c"0");
    }
}
