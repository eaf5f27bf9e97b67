//! A model directory as the frontend and engines see it: the card (context length, vocab, EOS ids), the
//! tokenizer, the chat template, and incremental detokenization.
//!
//! The same loading code reads a real HF checkpoint directory and the tiny model built into the binary
//! (`testdata/tiny-chat`, so `dynamo run` works with no download). Weights are the engine's business.
mod card;
mod detokenize;
mod error;
mod template;
mod tokenizer;

pub use card::{ImageTokens, ModelCard};
pub use detokenize::{IncrementalDecoder, StopStringMatcher};
pub use error::ModelError;
pub use template::{ChatTemplate, TemplateInput};
pub use tokenizer::Tokenizer;

use crate::core::grammar::Compiler;
use std::path::{Path, PathBuf};

/// Where a model's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An HF-style model directory.
    Dir(PathBuf),
    /// The tiny model compiled into the binary (the default of `dynamo run`).
    Builtin,
}

/// The names a model is served under besides its first (`--served-model-name a b c`), as a JSON list among
/// its text files: not a file of the model's directory, but travels with them to routers.
const ALIASES_FILE: &str = "served_model_aliases.json";

/// The name `dynamo run` serves the built-in model under.
pub const BUILTIN_MODEL_NAME: &str = "tiny-chat";

const BUILTIN_FILES: &[(&str, &str)] = &[
    ("config.json", include_str!("../../../testdata/tiny-chat/config.json")),
    ("generation_config.json", include_str!("../../../testdata/tiny-chat/generation_config.json")),
    ("tokenizer.json", include_str!("../../../testdata/tiny-chat/tokenizer.json")),
    ("tokenizer_config.json", include_str!("../../../testdata/tiny-chat/tokenizer_config.json")),
];

/// The built-in model's weights (f32 safetensors), for the native engine.
pub const BUILTIN_WEIGHTS: &[u8] = include_bytes!("../../../testdata/tiny-chat/model.safetensors");

/// The model's `config.json`, for engines that need the architecture.
pub fn read_config(source: &ModelSource) -> Result<serde_json::Value, ModelError> {
    let files = ModelFiles::read(source)?;
    files
        .json("config.json")?
        .ok_or_else(|| ModelError::MissingFile { file: "config.json".into(), origin: files.origin })
}

/// Everything the frontend needs to turn requests into token ids and token ids back into text.
pub struct Model {
    pub card: ModelCard,
    pub tokenizer: Tokenizer,
    /// `None` when the model has no chat template (only `/v1/completions` works then).
    pub chat_template: Option<ChatTemplate>,
    /// xxh3 of `tokenizer.json`: workers and routers that disagree on it must not be mixed.
    pub tokenizer_hash: u64,
    /// The text files it was read from, for routers in other processes (`text_files`).
    files: ModelFiles,
    /// Structured output's view of the vocabulary, built on first use (`grammars`).
    grammars: Compiler,
}

/// What a user may change of a model as it is served (vLLM's flags of the same names).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOptions {
    /// The names clients address it by, the first the one answers carry (default: the directory name).
    pub served_names: Vec<String>,
    /// The longest sequence served, at most the model's own context.
    pub max_model_len: Option<u32>,
    /// A Jinja chat template file used instead of the model's (routers in other processes get it too).
    pub chat_template: Option<PathBuf>,
}

impl Model {
    /// Loads a model; `served_name` overrides the name clients address it by (default: the directory name).
    pub fn load(source: &ModelSource, served_name: Option<&str>) -> Result<Self, ModelError> {
        let served_names = served_name.map(str::to_string).into_iter().collect();
        Self::load_with(source, &ModelOptions { served_names, ..Default::default() })
    }

    /// Loads a model as `options` say it is served.
    pub fn load_with(source: &ModelSource, options: &ModelOptions) -> Result<Self, ModelError> {
        let mut files = ModelFiles::read(source)?;
        if let Some(path) = &options.chat_template {
            let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
            // As a chat_template.jinja beside the model's files: it wins over tokenizer_config.json's, and goes
            // with the files to routers.
            files.files.retain(|(name, _)| name != "chat_template.jinja");
            files.files.push(("chat_template.jinja".to_string(), text));
        }
        let default_name = match source {
            ModelSource::Dir(dir) => dir
                .canonicalize()
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| dir.display().to_string()),
            ModelSource::Builtin => BUILTIN_MODEL_NAME.to_string(),
        };
        let (name, aliases) = match options.served_names.split_first() {
            Some((name, aliases)) => (name.clone(), aliases),
            None => (default_name, &[][..]),
        };
        if !aliases.is_empty() {
            // Beside the model's files, as the chat template is: routers in other processes serve it under
            // every name too.
            files.files.push((ALIASES_FILE.to_string(), serde_json::Value::from(aliases.to_vec()).to_string()));
        }
        let mut model = Self::from_files(files, name)?;
        if let Some(limit) = options.max_model_len {
            let context = model.card.context_length;
            if limit == 0 || limit > context {
                return Err(ModelError::Config(format!(
                    "--max-model-len {limit} must be between 1 and the model's context of {context} tokens \
                     (max_position_embeddings in its config.json)"
                )));
            }
            model.card.context_length = limit;
        }
        Ok(model)
    }

    /// A model from the text files another process sent (`text_files` there), served under `name`.
    pub fn from_text_files(origin: String, files: Vec<(String, String)>, name: String) -> Result<Self, ModelError> {
        Self::from_files(ModelFiles { origin, files }, name)
    }

    /// The config, tokenizer and template files, by name (no weights).
    pub fn text_files(&self) -> &[(String, String)] {
        &self.files.files
    }

    fn from_files(files: ModelFiles, name: String) -> Result<Self, ModelError> {
        let tokenizer = Tokenizer::from_json(files.required("tokenizer.json")?, &files.origin)?;
        let tokenizer_config = files.json("tokenizer_config.json")?;
        let card = ModelCard::resolve(
            name,
            files.json("config.json")?.as_ref(),
            files.json("generation_config.json")?.as_ref(),
            tokenizer_config.as_ref(),
            &tokenizer,
        )?;
        // As transformers 5 looks for it: chat_template.jinja, then chat_template.json (`{"chat_template": …}`,
        // as multimodal hub checkpoints ship it), then tokenizer_config.json.
        let from_json =
            files.json("chat_template.json")?.and_then(|json| template::source_from_tokenizer_config(&json));
        let template_source = match files.optional("chat_template.jinja") {
            Some(source) => Some(source.to_string()),
            None => from_json.or_else(|| tokenizer_config.as_ref().and_then(template::source_from_tokenizer_config)),
        };
        let chat_template =
            template_source.map(|source| ChatTemplate::new(&source, tokenizer_config.as_ref())).transpose()?;
        let tokenizer_hash = xxhash_rust::xxh3::xxh3_64(files.required("tokenizer.json")?.as_bytes());
        let grammars = Compiler::new(files.required("tokenizer.json")?, tokenizer.shared(), &card.eos_token_ids);
        let mut card = card;
        if let Some(aliases) = files.json(ALIASES_FILE)? {
            card.aliases = serde_json::from_value(aliases)
                .map_err(|source| ModelError::BadJson { file: format!("{}/{ALIASES_FILE}", files.origin), source })?;
        }
        Ok(Self { card, tokenizer, chat_template, tokenizer_hash, files, grammars })
    }

    /// What structured-output constraints compile against (built on first use, shared by its clones).
    pub fn grammars(&self) -> &Compiler {
        &self.grammars
    }
}

/// The text files of a model, read once from a directory or the built-in set.
#[derive(Debug, Clone)]
struct ModelFiles {
    origin: String,
    files: Vec<(String, String)>,
}

impl ModelFiles {
    fn read(source: &ModelSource) -> Result<Self, ModelError> {
        match source {
            ModelSource::Builtin => Ok(Self {
                origin: format!("built-in model {BUILTIN_MODEL_NAME}"),
                files: BUILTIN_FILES.iter().map(|(n, c)| (n.to_string(), c.to_string())).collect(),
            }),
            ModelSource::Dir(dir) => {
                if !dir.is_dir() {
                    return Err(match hub_id(dir) {
                        Some(id) => ModelError::HubId(id),
                        None => ModelError::NotADirectory(dir.clone()),
                    });
                }
                let mut files = Vec::new();
                for name in [
                    "config.json",
                    "generation_config.json",
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "chat_template.jinja",
                    "chat_template.json",
                ] {
                    if let Some(text) = read_if_present(&dir.join(name))? {
                        files.push((name.to_string(), text));
                    }
                }
                Ok(Self { origin: dir.display().to_string(), files })
            }
        }
    }

    fn optional(&self, name: &str) -> Option<&str> {
        self.files.iter().find(|(n, _)| n == name).map(|(_, c)| c.as_str())
    }

    fn required(&self, name: &str) -> Result<&str, ModelError> {
        self.optional(name)
            .ok_or_else(|| ModelError::MissingFile { file: name.to_string(), origin: self.origin.clone() })
    }

    fn json(&self, name: &str) -> Result<Option<serde_json::Value>, ModelError> {
        self.optional(name)
            .map(|text| {
                serde_json::from_str(text)
                    .map_err(|source| ModelError::BadJson { file: format!("{}/{name}", self.origin), source })
            })
            .transpose()
    }
}

fn read_if_present(path: &Path) -> Result<Option<String>, ModelError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModelError::Io { path: path.to_path_buf(), source }),
    }
}

/// `org/name` for a path that does not exist and reads like a Hugging Face hub id.
fn hub_id(path: &std::path::Path) -> Option<String> {
    let text = path.to_str()?;
    let (org, name) = text.split_once('/')?;
    let plain = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (!path.exists() && plain(org) && plain(name)).then(|| text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_model_len_shortens_the_context_and_a_chat_template_replaces_the_models() {
        let options =
            |max_model_len, chat_template| ModelOptions { max_model_len, chat_template, ..Default::default() };
        let model = Model::load_with(&ModelSource::Builtin, &options(Some(64), None)).unwrap();
        assert_eq!(model.card.context_length, 64);
        let context = Model::load(&ModelSource::Builtin, None).unwrap().card.context_length;
        let past = Model::load_with(&ModelSource::Builtin, &options(Some(context + 1), None)).err().unwrap();
        assert!(past.to_string().contains("--max-model-len"), "{past}");

        let dir = std::env::temp_dir().join(format!("dynamo-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jinja");
        std::fs::write(&path, "{% for m in messages %}<<{{ m.content }}>>{% endfor %}").unwrap();
        let model = Model::load_with(&ModelSource::Builtin, &options(None, Some(path.clone()))).unwrap();
        let messages = [serde_json::json!({"role": "user", "content": "hi"})];
        let input = TemplateInput { messages: &messages, tools: None, add_generation_prompt: true, extra: None };
        assert_eq!(model.chat_template.as_ref().unwrap().render(&input).unwrap(), "<<hi>>");
        // Routers in other processes build the model from these files: they get the same template.
        let files = model.text_files().to_vec();
        let remote = Model::from_text_files("worker".into(), files, "tiny-chat".into()).unwrap();
        assert_eq!(remote.chat_template.unwrap().render(&input).unwrap(), "<<hi>>");
        std::fs::write(&path, "{% for m in messages %}").unwrap();
        assert!(Model::load_with(&ModelSource::Builtin, &options(None, Some(path))).is_err(), "a broken template");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_chat_template_json_is_read_as_multimodal_checkpoints_ship_it() {
        let dir = std::env::temp_dir().join(format!("dynamo-template-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tiny-chat");
        for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(tiny.join(file), dir.join(file)).unwrap();
        }
        let template = r#"{"chat_template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"}"#;
        std::fs::write(dir.join("chat_template.json"), template).unwrap();
        let model = Model::load(&ModelSource::Dir(dir.clone()), None).unwrap();
        let messages = [serde_json::json!({"role": "user", "content": "hi"})];
        let input = TemplateInput { messages: &messages, tools: None, add_generation_prompt: true, extra: None };
        assert_eq!(model.chat_template.as_ref().unwrap().render(&input).unwrap(), "[hi]", "over tokenizer_config's");
        let remote = Model::from_text_files("worker".into(), model.text_files().to_vec(), "m".into()).unwrap();
        assert_eq!(remote.chat_template.unwrap().render(&input).unwrap(), "[hi]", "and on a router");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn builtin_and_testdata_dir_load_the_same_model() {
        let builtin = Model::load(&ModelSource::Builtin, None).unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tiny-chat");
        let from_dir = Model::load(&ModelSource::Dir(dir), None).unwrap();
        assert_eq!(builtin.card, from_dir.card);
        assert_eq!(builtin.card.name, "tiny-chat");
        assert!(builtin.chat_template.is_some());
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let err = Model::load(&ModelSource::Dir("/no/such/model".into()), None).err().unwrap();
        assert!(err.to_string().contains("/no/such/model"), "{err}");
    }

    #[test]
    fn a_directory_without_tokenizer_says_which_file() {
        let dir = std::env::temp_dir().join(format!("dynamo-empty-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        let err = Model::load(&ModelSource::Dir(dir.clone()), None).err().unwrap();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_hub_id_given_as_a_model_path_says_how_to_fetch_it() {
        let error = Model::load(&ModelSource::Dir("Qwen/Qwen3-0.6B".into()), None).err().expect("not a directory");
        let message = error.to_string();
        assert!(message.contains("huggingface-cli download Qwen/Qwen3-0.6B --local-dir"), "{message}");
        for path in ["/no/such/dir", "./models/x", "nothing-here"] {
            let error = Model::load(&ModelSource::Dir(path.into()), None).err().expect("not a directory");
            assert!(matches!(error, ModelError::NotADirectory(_)), "{path}: {error}");
        }
    }
}
