//! Engines built from settings: one per worker id, on one model (native workers of a process share one
//! copy of the weights). What `dynamo run` and every worker role start their engines with.
use super::Engine;
use super::external::{ExternalEngine, ExternalError, ExternalSettings};
use super::mocker::{MockerConfig, MockerEngine};
use super::native::{self, NativeError, NativeSettings};
use crate::core::model::{Model, ModelSource};
use crate::core::protocol::WorkerId;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq)]
pub enum EngineSettings {
    Mocker(MockerConfig),
    Native(NativeSettings),
    /// Another server (vLLM) that one worker puts on the planes.
    External(ExternalSettings),
}

impl EngineSettings {
    pub fn block_size(&self) -> usize {
        match self {
            EngineSettings::Mocker(config) => config.scheduler.block_size,
            EngineSettings::Native(settings) => settings.scheduler.block_size,
            EngineSettings::External(settings) => settings.block_size,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            EngineSettings::Mocker(config) => format!("mocker (speedup {})", config.speedup),
            EngineSettings::Native(settings) => match settings.device {
                native::Device::Cpu => {
                    let weights = match settings.quantization {
                        native::Quantization::None => "",
                        native::Quantization::Int8 => ", int8 weights",
                    };
                    format!("native (cpu, {} threads{weights})", settings.threads)
                }
                device => format!("native ({device})"),
            },
            EngineSettings::External(settings) => format!("{} at {}", settings.kind.name(), settings.url),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Native(#[from] NativeError),
    #[error("no engine was started")]
    NoEngine,
    #[error(transparent)]
    External(#[from] ExternalError),
    #[error(
        "--engine {0} wraps one running server, which one worker process puts on the planes: start it with \
         `dynamo decode --engine {0} --engine-url URL` and route to it with `dynamo route`"
    )]
    ExternalHere(&'static str),
}

/// One engine with id `id`: a server this process connects to, or one it runs (as `spawn_engines`).
pub async fn start_engine(
    model: &Model,
    source: &ModelSource,
    engine: &EngineSettings,
    id: WorkerId,
) -> Result<Arc<dyn Engine>, SpawnError> {
    match engine {
        EngineSettings::External(settings) => Ok(Arc::new(ExternalEngine::connect(id, settings).await?)),
        _ => spawn_engines(model, source, engine, &[id])?.pop().ok_or(SpawnError::NoEngine),
    }
}

/// Starts one engine per id on `model` (native workers of one process share one copy of the weights), with a
/// progress bar while weights load. Must run inside a tokio runtime.
pub fn spawn_engines(
    model: &Model,
    source: &ModelSource,
    engine: &EngineSettings,
    ids: &[WorkerId],
) -> Result<Vec<Arc<dyn Engine>>, SpawnError> {
    Ok(match engine {
        EngineSettings::Mocker(config) => {
            let vocab: Arc<[u32]> = model.tokenizer.printable_ids().into();
            ids.iter()
                .map(|&id| {
                    let engine = MockerEngine::spawn(id, config.clone(), vocab.clone());
                    Arc::new(engine.with_grammars(model.grammars().clone())) as Arc<dyn Engine>
                })
                .collect()
        }
        EngineSettings::Native(native_settings) => {
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template("loading weights {bar:30} {pos}/{len} layers")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            // indicatif draws nothing when stderr is not a terminal.
            let spawned = native::spawn_workers(source, native_settings, ids, |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            });
            bar.finish_and_clear();
            spawned?
                .into_iter()
                .map(|engine| Arc::new(engine.with_grammars(model.grammars().clone())) as Arc<dyn Engine>)
                .collect()
        }
        EngineSettings::External(settings) => return Err(SpawnError::ExternalHere(settings.kind.name())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_line_names_int8_weights() {
        let settings = |quantization| {
            EngineSettings::Native(native::NativeSettings {
                device: native::Device::Cpu,
                threads: 2,
                kv_cache_gib: 1.0,
                num_blocks: None,
                scheduler: Default::default(),
                profile: None,
                quantization,
            })
        };
        assert_eq!(settings(native::Quantization::None).describe(), "native (cpu, 2 threads)");
        assert_eq!(settings(native::Quantization::Int8).describe(), "native (cpu, 2 threads, int8 weights)");
    }
}
