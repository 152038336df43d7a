//! BLAKE3 computed while bytes stream through, in constant memory: the API hashes a backup
//! as it uploads it, and a restore verifies before a byte reaches the agent.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

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

/// What [`hash_stream`] reads before it hashes: large enough for blake3's multi-threaded
/// `update_rayon` to pay off (below ~128 KiB it is slower than `update`), and as much as one
/// read of a `tokio::fs::File` returns. Two of these are the whole memory of a `hash_stream`.
const CHUNK: usize = 2 * 1024 * 1024;

/// Inputs at least this large are hashed on all cores (blake3's rule of thumb for x86_64).
const RAYON_MIN: usize = 128 * 1024;

/// Reads until `buf` is full or the stream ends; how much was read.
async fn fill<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Hashes a whole stream in constant memory (two [`CHUNK`] buffers); returns (hex, size).
/// Each chunk is hashed on the blocking pool, on all cores when it is large, while the next
/// one is read, so neither the reading nor the hashing waits for the other, and no async
/// worker is held up by the hashing.
pub async fn hash_stream<R: AsyncRead + Unpin>(mut reader: R) -> std::io::Result<(String, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let mut current = vec![0u8; CHUNK];
    let mut spare = vec![0u8; CHUNK];
    let mut filled = fill(&mut reader, &mut current).await?;
    while filled > 0 {
        let hashing = tokio::task::spawn_blocking(move || {
            if filled >= RAYON_MIN {
                hasher.update_rayon(&current[..filled]);
            } else {
                hasher.update(&current[..filled]);
            }
            (hasher, current)
        });
        let next = fill(&mut reader, &mut spare).await;
        let (h, used) = hashing.await.map_err(std::io::Error::other)?;
        hasher = h;
        size += filled as u64;
        current = std::mem::replace(&mut spare, used);
        filled = next?;
    }
    Ok((hasher.finalize().to_hex().to_string(), size))
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

    /// Large reads take the multi-threaded path (chunks over `RAYON_MIN`, several chunks, a
    /// short last one); the hash is the same.
    #[tokio::test]
    async fn large_reads_hash_the_same() {
        let data: Vec<u8> = (0..2 * CHUNK as u32 + 300_007)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let expected = blake3::hash(&data).to_hex().to_string();
        for len in [0, 1, RAYON_MIN - 1, RAYON_MIN, CHUNK, CHUNK + 1, data.len()] {
            let (hex, size) = hash_stream(&data[..len]).await.unwrap();
            assert_eq!(size, len as u64);
            assert_eq!(
                hex,
                blake3::hash(&data[..len]).to_hex().to_string(),
                "{len}"
            );
        }
        let (hex, _) = hash_stream(tokio::io::BufReader::with_capacity(300_000, &data[..]))
            .await
            .unwrap();
        assert_eq!(hex, expected);
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
