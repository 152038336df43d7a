//! BLAKE3 computed while bytes stream through, in constant memory: the API hashes a backup
//! as it uploads it, and a restore verifies before a byte reaches the agent.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Wraps a reader; every byte read also goes into the hash.
pub struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    size: u64,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: blake3::Hasher::new(),
            size: 0,
        }
    }

    /// Bytes read so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The hash of everything read so far (lowercase hex) and its size.
    pub fn finish(&self) -> (String, u64) {
        (self.hasher.finalize().to_hex().to_string(), self.size)
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for HashingReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            let new = &buf.filled()[before..];
            this.hasher.update(new);
            this.size += new.len() as u64;
        }
        polled
    }
}

/// Hashes a whole stream in constant memory; returns (hex, size).
pub async fn hash_stream<R: AsyncRead + Unpin>(reader: R) -> std::io::Result<(String, u64)> {
    let mut hashing = HashingReader::new(reader);
    tokio::io::copy(&mut hashing, &mut tokio::io::sink()).await?;
    Ok(hashing.finish())
}

/// Whether `data` hashes to `expected` (hex, case-insensitive), compared in constant time.
pub fn verify(data: &[u8], expected: &str) -> bool {
    blake3::Hash::from_hex(expected.to_ascii_lowercase()).is_ok_and(|h| h == blake3::hash(data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn streaming_equals_one_shot_for_any_chunking() {
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 31 % 251) as u8).collect();
        let reader = tokio::io::BufReader::with_capacity(4093, &data[..]);
        let (hex, size) = hash_stream(reader).await.unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(hex, blake3::hash(&data).to_hex().to_string());
        assert!(verify(&data, &hex));
        assert!(verify(&data, &hex.to_uppercase()));
        let mut flipped = data.clone();
        flipped[500_000] ^= 1;
        assert!(!verify(&flipped, &hex), "one flipped bit is detected");
        assert!(!verify(&data, "not hex"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_input_any_buffer(data in proptest::collection::vec(any::<u8>(), 0..20_000), cap in 1usize..5000) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (hex, size) = rt.block_on(hash_stream(tokio::io::BufReader::with_capacity(cap, &data[..]))).unwrap();
            prop_assert_eq!(size, data.len() as u64);
            prop_assert_eq!(hex, blake3::hash(&data).to_hex().to_string());
        }
    }
}
