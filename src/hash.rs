//! Content hashes: stable example ids and the hashes of data and models recorded with each run.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file's bytes, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A stable id for an example: the first 16 hex digits of the sha256 of its parts, joined by a
/// separator that cannot occur in text (0x1f, the ASCII unit separator).
pub fn example_id(parts: &[&str]) -> String {
    let joined = parts.join("\u{1f}");
    sha256_hex(joined.as_bytes())[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_value() {
        // sha256("abc") from FIPS 180-2, appendix B.1.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn example_id_depends_on_every_part_and_on_the_boundaries() {
        let a = example_id(&["sciq", "Q: x A: y"]);
        assert_eq!(a.len(), 16);
        assert_eq!(a, example_id(&["sciq", "Q: x A: y"]));
        assert_ne!(a, example_id(&["sciq", "Q: x A: z"]));
        assert_ne!(example_id(&["ab", "c"]), example_id(&["a", "bc"]));
    }
}
