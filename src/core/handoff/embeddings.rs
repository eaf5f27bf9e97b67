//! Images' embeddings that encode workers hold, read into this worker's embeddings cache before the request
//! that needs them starts, so its engine finds them there instead of encoding the images. An image already
//! in the cache is not read again (its lease is ended all the same); a read that fails, or bytes that are not
//! the ones the encode worker wrote, leave the image to the engine, which encodes it from the file the
//! request still carries: the client gets the same tokens, later.
use super::Shared;
use crate::core::multimodal::EmbeddingCache;
use crate::core::protocol::{HeldEmbeddings, PreprocessedRequest};
use crate::core::transfer::{Agent, Descriptor, Region, RegionId, TransferError};
use std::sync::{Arc, Mutex};

/// Images whose embeddings may be landing here at once; more wait for a place.
const PLACES: usize = 4;

/// Registered memory that read embeddings land in before they are copied into the cache.
pub(super) struct Landing {
    cache: Arc<EmbeddingCache>,
    region_id: RegionId,
    region: Arc<Region>,
    image_bytes: u64,
    free: Mutex<Vec<u64>>,
    turns: tokio::sync::Semaphore,
}

impl Landing {
    pub(super) fn register(agent: &Agent, cache: Arc<EmbeddingCache>) -> Result<Self, TransferError> {
        let image_bytes = cache.image_len() as u64 * 4;
        let (region_id, region) = agent.register(Region::new(image_bytes.max(1) * PLACES as u64)?);
        let free = Mutex::new((0..PLACES as u64).collect());
        Ok(Self { cache, region_id, region, image_bytes, free, turns: tokio::sync::Semaphore::new(PLACES) })
    }
}

impl Shared {
    /// Reads the embeddings encode workers hold for the request's images into the cache, ending every lease.
    pub(super) async fn take_embeddings(&self, request: PreprocessedRequest) -> PreprocessedRequest {
        let Some(landing) = &self.landing else { return request };
        for media in request.media() {
            let Some(held) = &media.encoded else { continue };
            let cached = landing.cache.contains(media.hash);
            let taken = match cached {
                true => self.end_lease(held).await,
                false => self.read_embeddings(landing, media.hash, held).await,
            };
            if !cached {
                landing.cache.count_read(taken.is_ok());
            }
            if let Err(why) = taken {
                tracing::warn!(
                    request = %request.request_id,
                    "could not take an image's embeddings from the encode worker at {}: {why}; encoding it here",
                    held.agent
                );
            }
        }
        request
    }

    /// Tells the holder its embeddings are not needed: a notification that moves nothing.
    async fn end_lease(&self, held: &HeldEmbeddings) -> Result<(), String> {
        self.transfer(&held.agent, &[], &[], held.lease).await.map(drop)
    }

    async fn read_embeddings(&self, landing: &Landing, hash: u64, held: &HeldEmbeddings) -> Result<(), String> {
        if held.len != landing.image_bytes {
            let _ = self.end_lease(held).await;
            return Err(format!(
                "it holds {} bytes of embeddings an image, and this model's images take {}",
                held.len, landing.image_bytes
            ));
        }
        let _turn = landing.turns.acquire().await.map_err(|e| e.to_string())?;
        let place = landing.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        // A turn always finds a place: there are as many of each.
        let place = place.ok_or("no landing place is free")?;
        let read = self.read_into(landing, place * landing.image_bytes, held).await;
        if let Ok(values) = &read {
            landing.cache.put(hash, Arc::new(values.clone()))?;
        }
        landing.free.lock().unwrap_or_else(|p| p.into_inner()).push(place);
        read.map(drop)
    }

    /// Reads the held embeddings to `offset` of the landing region and checks them against their checksum.
    async fn read_into(&self, landing: &Landing, offset: u64, held: &HeldEmbeddings) -> Result<Vec<f32>, String> {
        let local = [Descriptor { region: landing.region_id, offset, len: held.len }];
        let remote = [Descriptor { region: held.region, offset: held.offset, len: held.len }];
        self.transfer(&held.agent, &local, &remote, held.lease).await?;
        // SAFETY: this place is ours until it is put back on the free list, and the read into it completed.
        let bytes =
            unsafe { landing.region.bytes(offset, held.len) }.ok_or("the landing place is outside its region")?;
        if xxhash_rust::xxh3::xxh3_64(bytes) != held.checksum {
            return Err(
                "the bytes read are not the ones it wrote (its lease had ended and the memory was reused)".into()
            );
        }
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
}
