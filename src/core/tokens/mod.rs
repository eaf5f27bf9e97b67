//! Token blocks and their chained hashes: the one definition of "which prefix is this", shared by the
//! router, every engine, the mocker and the tests.
//!
//! A prompt is cut into blocks of `block_size` tokens (full blocks only). A block's *local* hash is xxh3-64 of
//! its token ids as u32 little-endian with a fixed seed; its *sequence* hash chains the parent block's sequence
//! hash with the local hash, so equal sequence hashes mean equal prefixes. A block that covers placeholder
//! tokens of an image or video folds that media's hash into its local hash, so two prompts with the same
//! placeholders but different pictures do not share blocks.
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed of every block hash. Changing it invalidates every index built by an older binary.
pub const BLOCK_HASH_SEED: u64 = 1337;

/// The hashes of one full block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash {
    /// Hash of this block's tokens alone.
    pub local: u64,
    /// Hash of this block and every block before it.
    pub sequence: u64,
}

/// Media (an image, a video) whose placeholder tokens occupy positions `start..end` of a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaSpan {
    pub start: usize,
    pub end: usize,
    /// Hash of the media's content.
    pub hash: u64,
}

/// xxh3-64 of the tokens as u32 little-endian.
pub fn local_block_hash(tokens: &[u32]) -> u64 {
    local_block_hash_with_media(tokens, &[])
}

/// xxh3-64 of the tokens as u32 little-endian followed by each media hash as u64 little-endian.
pub fn local_block_hash_with_media(tokens: &[u32], media: &[u64]) -> u64 {
    let mut bytes = Vec::with_capacity(tokens.len() * 4 + media.len() * 8);
    for token in tokens {
        bytes.extend_from_slice(&token.to_le_bytes());
    }
    for hash in media {
        bytes.extend_from_slice(&hash.to_le_bytes());
    }
    xxh3_64_with_seed(&bytes, BLOCK_HASH_SEED)
}

/// Chains a block onto its parent: the first block's sequence hash is its local hash.
pub fn chain_hash(parent_sequence: Option<u64>, local: u64) -> u64 {
    match parent_sequence {
        None => local,
        Some(parent) => {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&parent.to_le_bytes());
            bytes[8..].copy_from_slice(&local.to_le_bytes());
            xxh3_64_with_seed(&bytes, BLOCK_HASH_SEED)
        }
    }
}

/// The hashes of every full block of `tokens`, in order.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    block_hashes_with_media(tokens, block_size, &[])
}

/// The hashes of every full block of `tokens`, each folding in the media whose placeholders it overlaps.
pub fn block_hashes_with_media(tokens: &[u32], block_size: usize, media: &[MediaSpan]) -> Vec<BlockHash> {
    let block_size = block_size.max(1);
    let mut parent = None;
    (0..tokens.len() / block_size)
        .map(|index| {
            let local = local_block_hash_at(tokens, index, block_size, media);
            let sequence = chain_hash(parent, local);
            parent = Some(sequence);
            BlockHash { local, sequence }
        })
        .collect()
}

/// The local hash of full block `index` of `tokens`, folding in the media whose placeholders it overlaps.
pub fn local_block_hash_at(tokens: &[u32], index: usize, block_size: usize, media: &[MediaSpan]) -> u64 {
    let (start, end) = (index * block_size, (index + 1) * block_size);
    let overlapping: smallvec::SmallVec<[u64; 2]> =
        media.iter().filter(|m| m.start < end && start < m.end).map(|m| m.hash).collect();
    local_block_hash_with_media(&tokens[start..end], &overlapping)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_blocks_are_hashed() {
        let tokens: Vec<u32> = (0..40).collect();
        assert_eq!(block_hashes(&tokens, 16).len(), 2);
        assert!(block_hashes(&tokens[..15], 16).is_empty());
    }

    #[test]
    fn shared_prefix_shares_hashes_and_diverges_after() {
        let a: Vec<u32> = (0..48).collect();
        let mut b = a.clone();
        b[40] = 999;
        let (ha, hb) = (block_hashes(&a, 16), block_hashes(&b, 16));
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2].sequence, hb[2].sequence);
    }

    #[test]
    fn sequence_hash_depends_on_position_not_only_content() {
        let block: Vec<u32> = vec![7; 16];
        let twice: Vec<u32> = [block.clone(), block.clone()].concat();
        let hashes = block_hashes(&twice, 16);
        assert_eq!(hashes[0].local, hashes[1].local);
        assert_ne!(hashes[0].sequence, hashes[1].sequence);
    }

    #[test]
    fn media_changes_only_the_blocks_its_placeholders_touch() {
        let tokens = vec![9u32; 64];
        let picture = |hash| [MediaSpan { start: 20, end: 40, hash }];
        let (a, b) =
            (block_hashes_with_media(&tokens, 16, &picture(1)), block_hashes_with_media(&tokens, 16, &picture(2)));
        assert_eq!(a[0], block_hashes(&tokens, 16)[0], "block 0 holds no placeholder");
        assert_ne!(a[1].local, b[1].local);
        assert_ne!(a[2].local, b[2].local);
        assert_eq!(a[3].local, b[3].local, "block 3 holds none, but its chain differs");
        assert_ne!(a[3].sequence, b[3].sequence);
    }

    #[test]
    fn local_hash_reads_tokens_as_u32_le() {
        let expected = xxh3_64_with_seed(&[1, 0, 0, 0, 2, 0, 0, 0], BLOCK_HASH_SEED);
        assert_eq!(local_block_hash(&[1, 2]), expected);
    }
}
