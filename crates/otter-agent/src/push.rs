//! Push mode on the device: the server sends the artifact in chunks on the
//! device's `chunk` topic, and the agent appends them to the deployment's
//! `artifact.part` in the landing zone, the same file a link download
//! resumes, so what happens once the file is complete (size and SHA-256
//! check, decrypt, decompress: [`crate::fetch::verify_and_unpack`]) is
//! shared with push-pull.
//!
//! The rule that makes resuming safe: a chunk is written only where the file
//! ends ([`decide_chunk`]): a chunk wholly before the end is a duplicate
//! (a resend, a broker redelivery) and is dropped; one that starts beyond
//! the end would leave a hole and is dropped too; one that overlaps the end
//! contributes only its new tail. Every write is synced before the agent
//! acknowledges the new length ([`append_chunk`] returns it), and the first
//! answer to an offer is [`durable_length`], which syncs first: the server
//! is never told about bytes a crash could lose, and never resends what it
//! was told.
//!
//! Layout: the pure decision, then the blocking file operations (run them
//! with `spawn_blocking`), then tests.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use crate::landing_zone::DeploymentFiles;
use crate::state::sync_dir;

/// What to do with a chunk, given what the file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkDecision {
    /// Write the chunk's data from byte `skip` on (0 unless it overlaps the
    /// end of the file).
    Append { skip: usize },
    /// Every byte of it is already held: drop it.
    Duplicate,
    /// It starts beyond the end of the file: drop it (the server resends
    /// from the acknowledged offset).
    Gap,
    /// It would make the file longer than the signed manifest says: drop it.
    Oversized,
}

/// Decides what to do with `length` bytes at `offset` when the file holds
/// `held` bytes of an artifact of `expected_size` bytes.
pub fn decide_chunk(held: u64, expected_size: u64, offset: u64, length: usize) -> ChunkDecision {
    let length = u64::try_from(length).unwrap_or(u64::MAX);
    let end = offset.saturating_add(length);
    if offset > held {
        return ChunkDecision::Gap;
    }
    if end <= held {
        return ChunkDecision::Duplicate;
    }
    if end > expected_size {
        return ChunkDecision::Oversized;
    }
    // held - offset < length, which is a usize.
    let skip = usize::try_from(held - offset).unwrap_or(usize::MAX);
    ChunkDecision::Append { skip }
}

/// The result of offering a chunk to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkWrite {
    pub decision: ChunkDecision,
    /// Bytes durably held after it: what to acknowledge.
    pub held: u64,
}

/// Bytes durably held in `artifact_part`: the file is synced first, so the
/// length returned survives a crash. A missing file holds 0 bytes.
pub fn durable_length(artifact_part: &Path) -> std::io::Result<u64> {
    match OpenOptions::new().write(true).open(artifact_part) {
        Ok(file) => {
            file.sync_all()?;
            Ok(file.metadata()?.len())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(error) => Err(error),
    }
}

/// Appends the part of a chunk the file lacks, syncs it, and returns the
/// new durable length. A failed write is cut back off, so the file never
/// holds a partial chunk the agent did not acknowledge.
pub fn append_chunk(
    files: &DeploymentFiles,
    expected_size: u64,
    offset: u64,
    data: &[u8],
) -> std::io::Result<ChunkWrite> {
    std::fs::create_dir_all(&files.dir)?;
    let created = !files.artifact_part.exists();
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.artifact_part)?;
    if created {
        // The new file's name must survive a crash along with its bytes.
        sync_dir(&files.dir)?;
    }
    let held = file.metadata()?.len();
    let decision = decide_chunk(held, expected_size, offset, data.len());
    let ChunkDecision::Append { skip } = decision else {
        return Ok(ChunkWrite { decision, held });
    };
    let new_bytes = data.get(skip..).unwrap_or_default();
    if let Err(error) = file.write_all(new_bytes).and_then(|()| file.sync_data()) {
        let _ = file.set_len(held);
        return Err(error);
    }
    Ok(ChunkWrite {
        decision,
        held: held + u64::try_from(new_bytes.len()).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::landing_zone::LandingZone;

    #[test]
    fn decisions() {
        use ChunkDecision::*;
        // (held, expected size, offset, length) → decision
        let cases = [
            ((0, 100, 0, 10), Append { skip: 0 }),
            ((10, 100, 10, 10), Append { skip: 0 }),
            ((10, 100, 0, 10), Duplicate),
            ((20, 100, 10, 10), Duplicate),
            ((10, 100, 20, 10), Gap),
            ((15, 100, 10, 10), Append { skip: 5 }),
            ((95, 100, 90, 10), Append { skip: 5 }),
            ((90, 100, 90, 11), Oversized),
            ((100, 100, 90, 10), Duplicate),
            ((0, 0, 0, 0), Duplicate),
            ((5, 100, u64::MAX, 10), Gap),
        ];
        for ((held, size, offset, length), expected) in cases {
            assert_eq!(
                decide_chunk(held, size, offset, length),
                expected,
                "held {held} size {size} offset {offset} length {length}"
            );
        }
    }

    #[test]
    fn writes_only_at_the_end_and_reports_the_durable_length() {
        let dir = tempfile::tempdir().unwrap();
        let files = LandingZone::new(dir.path().join("landing"))
            .files("dep-1")
            .unwrap();
        assert_eq!(durable_length(&files.artifact_part).unwrap(), 0);
        let artifact: Vec<u8> = (0..=255u8).cycle().take(50).collect();
        let chunk = |offset: usize, length: usize| &artifact[offset..offset + length];

        let first = append_chunk(&files, 50, 0, chunk(0, 20)).unwrap();
        assert_eq!(first.held, 20);
        // A duplicate and a chunk beyond the end change nothing.
        let duplicate = append_chunk(&files, 50, 0, chunk(0, 20)).unwrap();
        assert_eq!(
            (duplicate.decision, duplicate.held),
            (ChunkDecision::Duplicate, 20)
        );
        let gap = append_chunk(&files, 50, 30, chunk(30, 10)).unwrap();
        assert_eq!((gap.decision, gap.held), (ChunkDecision::Gap, 20));
        // An overlap adds only the missing tail.
        let overlap = append_chunk(&files, 50, 10, chunk(10, 20)).unwrap();
        assert_eq!(
            (overlap.decision, overlap.held),
            (ChunkDecision::Append { skip: 10 }, 30)
        );
        let too_long = append_chunk(&files, 50, 30, &[0u8; 21]).unwrap();
        assert_eq!(
            (too_long.decision, too_long.held),
            (ChunkDecision::Oversized, 30)
        );
        let last = append_chunk(&files, 50, 30, chunk(30, 20)).unwrap();
        assert_eq!(last.held, 50);
        assert_eq!(std::fs::read(&files.artifact_part).unwrap(), artifact);
        assert_eq!(durable_length(&files.artifact_part).unwrap(), 50);
    }
}
