//! Why a model directory could not be used, worded for the person who passed `--model`.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "model path {0} is not a directory; pass --model with an HF model directory (config.json, tokenizer.json, …)"
    )]
    NotADirectory(PathBuf),
    #[error(
        "{0} is not a directory here; it looks like a Hugging Face hub id, and this binary does not download \
         models: fetch it with `huggingface-cli download {0} --local-dir DIR` (or `hf download {0} --local-dir \
         DIR`), then pass --model DIR"
    )]
    HubId(String),
    #[error("{origin} has no {file}; an HF model directory needs it")]
    MissingFile { file: String, origin: String },
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{file} is not valid JSON: {source}")]
    BadJson { file: String, source: serde_json::Error },
    #[error("cannot load the tokenizer of {origin}: {message}")]
    Tokenizer { origin: String, message: String },
    #[error("the chat template does not compile: {0}")]
    Template(String),
    #[error("{0}")]
    Config(String),
    #[error("the tokenizer cannot encode the text: {0}")]
    Encode(String),
    /// The chat template refused the messages; the text is the template's own message.
    #[error("{0}")]
    Render(String),
}
