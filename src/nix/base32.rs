//! Nix's base32: its own alphabet (no e, o, u, t) and its own bit order
//! (the last character holds the lowest bits of the first byte), so no
//! general-purpose base32 crate can stand in for it.

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Base32Error {
    #[error("invalid character {0:?} in nix base32 string")]
    InvalidChar(char),
    #[error("nix base32 string has length {got}, expected {expected}")]
    BadLength { got: usize, expected: usize },
    #[error("nix base32 string has non-zero padding bits")]
    NonZeroPadding,
}

/// The number of characters that encode `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 { 0 } else { (len * 8 - 1) / 5 + 1 }
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = (bytes[i] as u16) >> j;
        let hi = if i + 1 < bytes.len() { (bytes[i + 1] as u16) << (8 - j) } else { 0 };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decodes exactly `out_len` bytes; the string must have the matching length.
pub fn decode(s: &str, out_len: usize) -> Result<Vec<u8>, Base32Error> {
    let expected = encoded_len(out_len);
    if s.len() != expected {
        return Err(Base32Error::BadLength { got: s.len(), expected });
    }
    let mut out = vec![0u8; out_len];
    let bytes = s.as_bytes();
    for n in 0..bytes.len() {
        let c = bytes[bytes.len() - n - 1];
        let d = digit(c).ok_or(Base32Error::InvalidChar(c as char))? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (d << j) as u8;
        let carry = (d << j) >> 8;
        if i + 1 < out_len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(Base32Error::NonZeroPadding);
        }
    }
    Ok(out)
}

/// True when every character is in Nix's base32 alphabet.
pub fn is_valid(s: &str) -> bool {
    s.bytes().all(|c| digit(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        // sha256("") as Nix prints it: `nix hash to-base32 sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=`
        let empty = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae,
            0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
        ];
        assert_eq!(encode(&empty), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode(&encode(&empty), 32).unwrap(), empty);
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0xff]), "7z");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode("e", 1), Err(Base32Error::BadLength { got: 1, expected: 2 }));
        assert_eq!(decode("0e", 1), Err(Base32Error::InvalidChar('e')));
        // "zz" sets bits above the 8th of a one-byte value.
        assert_eq!(decode("zz", 1), Err(Base32Error::NonZeroPadding));
    }

    proptest! {
        #[test]
        fn roundtrip(bytes in proptest::collection::vec(any::<u8>(), 0..70)) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(&s, bytes.len()).unwrap(), bytes);
        }
    }
}
