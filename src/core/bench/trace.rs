//! Mooncake-format request traces: one JSON object per line, `{timestamp, input_length, output_length,
//! hash_ids}`, where `hash_ids` names the prompt's blocks (512 tokens each in the public traces) so that
//! requests sharing a prefix share leading ids.
use crate::core::tokens::chain_hash;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TraceRequest {
    /// Milliseconds from the start of the trace.
    pub timestamp: u64,
    pub input_length: u64,
    pub output_length: u64,
    pub hash_ids: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "{path}:{line}: not a Mooncake trace record ({{timestamp, input_length, output_length, hash_ids}}): {source}"
    )]
    Record { path: PathBuf, line: usize, source: serde_json::Error },
    #[error("{0} has no requests")]
    Empty(PathBuf),
}

pub fn load(path: &Path) -> Result<Vec<TraceRequest>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io { path: path.into(), source })?;
    let requests = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|source| TraceError::Record { path: path.into(), line: i + 1, source })
        })
        .collect::<Result<Vec<TraceRequest>, _>>()?;
    if requests.is_empty() {
        return Err(TraceError::Empty(path.into()));
    }
    Ok(requests)
}

/// The request's blocks as chained sequence hashes. A different `salt` gives a disjoint copy of the trace,
/// for replaying it several times without the copies sharing blocks.
pub fn sequence_hashes(hash_ids: &[u64], salt: u64) -> Vec<u64> {
    let mut parent = None;
    hash_ids
        .iter()
        .map(|&id| {
            let local = xxh3_64_with_seed(&id.to_le_bytes(), salt);
            let sequence = chain_hash(parent, local);
            parent = Some(sequence);
            sequence
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_public_trace_format_and_reports_bad_lines() {
        let dir = std::env::temp_dir().join(format!("dynamo-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(
            &good,
            "{\"timestamp\": 0, \"input_length\": 1024, \"output_length\": 5, \"hash_ids\": [0, 1]}\n\n",
        )
        .unwrap();
        assert_eq!(load(&good).unwrap()[0].hash_ids, vec![0, 1]);
        let bad = dir.join("bad.jsonl");
        std::fs::write(
            &bad,
            "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [0]}\n{\"x\": 1}\n",
        )
        .unwrap();
        let err = load(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:2"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn shared_leading_ids_share_hashes_and_salts_separate_copies() {
        let (a, b) = (sequence_hashes(&[1, 2, 3], 0), sequence_hashes(&[1, 2, 4], 0));
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        assert_ne!(sequence_hashes(&[1], 0), sequence_hashes(&[1], 1));
    }
}
