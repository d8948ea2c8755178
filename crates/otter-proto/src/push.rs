//! Push mode's data plane: the binary chunks the server publishes on a
//! device's `chunk` topic.
//!
//! A chunk is `[version = 1][id length: u8][deployment id][offset: u64 BE][data]`.
//! The offset is where `data` starts in the artifact; a device appends a
//! chunk only when its offset equals the bytes it already holds, so
//! duplicates and stale chunks (after a resume) are dropped, never written
//! twice. Control messages (offer, acknowledgements) are JSON in
//! [`crate::messages`].

/// Format version of a chunk.
pub const CHUNK_VERSION: u8 = 1;

/// Largest `data` in one chunk. Well under the broker's 1 MiB packet limit
/// once the header and MQTT framing are added.
pub const MAX_CHUNK_BYTES: usize = 512 * 1024;

/// One piece of a pushed artifact, borrowing its bytes from the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushChunk<'a> {
    pub deployment_id: &'a str,
    pub offset: u64,
    pub data: &'a [u8],
}

/// Why bytes are not a chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk is truncated")]
    Truncated,
    #[error("chunk format version {0} is not supported")]
    Version(u8),
    #[error("chunk deployment id is not valid UTF-8")]
    DeploymentId,
    #[error("chunk of {0} bytes exceeds the limit of {MAX_CHUNK_BYTES} bytes")]
    TooLarge(usize),
}

impl<'a> PushChunk<'a> {
    /// Encodes a chunk. `deployment_id` longer than 255 bytes is cut (ids
    /// made by the server are far shorter).
    pub fn encode(&self) -> Vec<u8> {
        let id = self.deployment_id.as_bytes();
        let id = &id[..id.len().min(u8::MAX as usize)];
        let mut out = Vec::with_capacity(2 + id.len() + 8 + self.data.len());
        out.push(CHUNK_VERSION);
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(self.data);
        out
    }

    /// Decodes a chunk from a packet payload, never panicking.
    pub fn decode(bytes: &'a [u8]) -> Result<PushChunk<'a>, ChunkError> {
        let (&version, rest) = bytes.split_first().ok_or(ChunkError::Truncated)?;
        if version != CHUNK_VERSION {
            return Err(ChunkError::Version(version));
        }
        let (&id_len, rest) = rest.split_first().ok_or(ChunkError::Truncated)?;
        let (id, rest) = rest
            .split_at_checked(usize::from(id_len))
            .ok_or(ChunkError::Truncated)?;
        let deployment_id = std::str::from_utf8(id).map_err(|_| ChunkError::DeploymentId)?;
        let (offset, data) = rest.split_first_chunk::<8>().ok_or(ChunkError::Truncated)?;
        if data.len() > MAX_CHUNK_BYTES {
            return Err(ChunkError::TooLarge(data.len()));
        }
        Ok(PushChunk {
            deployment_id,
            offset: u64::from_be_bytes(*offset),
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for data in [&b""[..], b"x", &[7u8; 1000]] {
            let chunk = PushChunk {
                deployment_id: "dep-1",
                offset: 1 << 40,
                data,
            };
            assert_eq!(PushChunk::decode(&chunk.encode()), Ok(chunk));
        }
    }

    #[test]
    fn bad_bytes_are_errors() {
        let good = PushChunk {
            deployment_id: "dep-1",
            offset: 5,
            data: b"abc",
        }
        .encode();
        for cut in 0..(2 + 5 + 8) {
            assert_eq!(
                PushChunk::decode(&good[..cut]),
                Err(ChunkError::Truncated),
                "cut at {cut}"
            );
        }
        let mut wrong_version = good.clone();
        wrong_version[0] = 9;
        assert_eq!(
            PushChunk::decode(&wrong_version),
            Err(ChunkError::Version(9))
        );
        let mut bad_id = good.clone();
        bad_id[2] = 0xff;
        assert_eq!(PushChunk::decode(&bad_id), Err(ChunkError::DeploymentId));
        let mut big = PushChunk {
            deployment_id: "d",
            offset: 0,
            data: &[],
        }
        .encode();
        big.extend(std::iter::repeat_n(0u8, MAX_CHUNK_BYTES + 1));
        assert_eq!(
            PushChunk::decode(&big),
            Err(ChunkError::TooLarge(MAX_CHUNK_BYTES + 1))
        );
    }
}
