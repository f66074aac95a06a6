//! A short text kept inline, for values made on the request path (the policy headers'
//! numbers, durations and times) that would otherwise be a heap string each.

use std::fmt;

/// Up to [`ShortText::CAPACITY`] bytes of text, inline; what does not fit is cut at a char
/// boundary (the values it holds are far shorter).
#[derive(Clone, Copy)]
pub struct ShortText {
    len: u8,
    buf: [u8; ShortText::CAPACITY],
}

impl ShortText {
    /// The most bytes it holds.
    pub const CAPACITY: usize = 46;

    /// `n` in decimal. Written digit by digit: `format_args!` costs a policy header about ten
    /// times as much.
    pub fn from_u64(n: u64) -> Self {
        let mut t = Self::default();
        t.push_u64(n, 0);
        t
    }

    /// Appends `s`, cut at a char if it does not fit.
    pub fn push_str(&mut self, s: &str) {
        let _ = fmt::Write::write_str(self, s);
    }

    /// Appends `n` in decimal, zero-padded to at least `width` digits (at most 20).
    pub fn push_u64(&mut self, mut n: u64, width: usize) {
        let mut digits = [b'0'; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let start = start.min(digits.len().saturating_sub(width));
        let len = usize::from(self.len);
        let take = (digits.len() - start).min(Self::CAPACITY - len);
        self.buf[len..len + take].copy_from_slice(&digits[start..start + take]);
        // take <= CAPACITY - len, so this stays within a u8; digits are whole chars.
        self.len += take as u8;
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only whole chars are ever written.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl Default for ShortText {
    fn default() -> Self {
        Self {
            len: 0,
            buf: [0; Self::CAPACITY],
        }
    }
}

impl fmt::Write for ShortText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let len = usize::from(self.len);
        let mut take = s.len().min(Self::CAPACITY - len);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[len..len + take].copy_from_slice(&s.as_bytes()[..take]);
        // take <= CAPACITY - len, so this stays within a u8.
        self.len += take as u8;
        if take < s.len() {
            Err(fmt::Error)
        } else {
            Ok(())
        }
    }
}

impl From<&str> for ShortText {
    fn from(s: &str) -> Self {
        let mut t = Self::default();
        let _ = fmt::Write::write_str(&mut t, s);
        t
    }
}

impl std::ops::Deref for ShortText {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for ShortText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ShortText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq for ShortText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for ShortText {}

impl PartialEq<&str> for ShortText {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::ShortText;

    #[test]
    fn it_holds_what_it_is_given_and_cuts_what_does_not_fit_at_a_char() {
        assert_eq!(ShortText::from("user"), "user");
        let long = "é".repeat(40);
        let cut = ShortText::from(long.as_str());
        assert_eq!(cut.len(), ShortText::CAPACITY);
        assert!(long.starts_with(cut.as_str()));
        assert_eq!(ShortText::default(), "");
    }

    #[test]
    fn numbers_are_written_as_display_writes_them() {
        for n in [0, 7, 10, 99, 1000, 123_456_789, u64::MAX] {
            assert_eq!(ShortText::from_u64(n), n.to_string().as_str());
            for width in [0, 1, 2, 6, 20, 30] {
                let mut t = ShortText::from("x");
                t.push_u64(n, width);
                let want = format!("x{n:0width$}", width = width.min(20));
                assert_eq!(t, want.as_str(), "{n} in {width}");
            }
        }
        // What does not fit is cut.
        let mut t = ShortText::from("a".repeat(40).as_str());
        t.push_u64(u64::MAX, 0);
        assert_eq!(t.len(), ShortText::CAPACITY);
        assert!(t.ends_with("184467"));
    }
}
