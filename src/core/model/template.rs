//! Chat templates: the model's Jinja template rendered with minijinja, with the functions HF templates call.
//!
//! Rendering follows transformers: `trim_blocks` and `lstrip_blocks` on, `raise_exception(msg)` fails the
//! request with the template's message, `strftime_now(fmt)` gives the local time, python string methods
//! (`.strip()`, `.split()`, …) work, and `tojson` writes JSON the way Python's `json.dumps` does
//! (`", "` and `": "` separators, non-ASCII kept), so prompts tokenize exactly as they would under vLLM.
use super::{ModelError, card::special_token_text};
use minijinja::{Environment, Error, ErrorKind, Value as JinjaValue, value::Kwargs};
use serde::Serialize;
use serde_json::{Map, Value};

const TEMPLATE_NAME: &str = "chat";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The template names the `developer` role; otherwise such messages reach it as `system`, which is what
    /// OpenAI's newer clients mean by it and what templates written before it know.
    knows_developer: bool,
    source: String,
}

/// What a chat request gives the template.
pub struct TemplateInput<'a> {
    pub messages: &'a [Value],
    pub tools: Option<&'a [Value]>,
    pub add_generation_prompt: bool,
    /// `chat_template_kwargs` from the request: extra variables some templates read (`enable_thinking`, …).
    pub extra: Option<&'a Map<String, Value>>,
}

/// The template text from tokenizer_config.json: a string, or a list of named templates (take "default").
pub(crate) fn source_from_tokenizer_config(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    pub fn new(source: &str, tokenizer_config: Option<&Value>) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(|e| ModelError::Template(e.to_string()))?;
        let token = |key: &str| tokenizer_config.and_then(|c| c.get(key)).and_then(special_token_text);
        Ok(Self {
            env,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            knows_developer: source.contains("developer"),
            source: source.to_string(),
        })
    }

    /// The template's text (what a tool-call format is recognised by).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the prompt; a template error (e.g. `raise_exception`) comes back as its message.
    pub fn render(&self, input: &TemplateInput<'_>) -> Result<String, ModelError> {
        let mut context = input.extra.cloned().unwrap_or_default();
        let mut messages = input.messages.to_vec();
        if !self.knows_developer {
            for message in &mut messages {
                if message.get("role").and_then(Value::as_str) == Some("developer") {
                    message["role"] = Value::from("system");
                }
            }
        }
        context.insert("messages".into(), Value::Array(messages));
        context.insert("tools".into(), input.tools.map(|t| Value::Array(t.to_vec())).unwrap_or(Value::Null));
        context.insert("add_generation_prompt".into(), Value::Bool(input.add_generation_prompt));
        context.insert("bos_token".into(), self.bos_token.clone().map(Value::String).unwrap_or_default());
        context.insert("eos_token".into(), self.eos_token.clone().map(Value::String).unwrap_or_default());
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| ModelError::Render(e.to_string()))?;
        template.render(JinjaValue::from_serialize(&context)).map_err(|e| {
            ModelError::Render(match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("the chat template failed").to_string(),
                _ => format!("the chat template failed: {e}"),
            })
        })
    }
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

fn tojson(value: &JinjaValue, kwargs: Kwargs) -> Result<JinjaValue, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let spaces = " ".repeat(n);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(spaces.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter)),
    };
    written.map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = String::from_utf8(out).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(JinjaValue::from_safe_string(text))
}

/// `json.dumps` default separators: `", "` between items, `": "` after keys.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: Value) -> Result<String, String> {
        let template = ChatTemplate::new(source, Some(&json!({"bos_token": "<s>", "eos_token": {"content": "</s>"}})))
            .map_err(|e| e.to_string())?;
        let messages = messages.as_array().cloned().unwrap_or_default();
        template
            .render(&TemplateInput { messages: &messages, tools: None, add_generation_prompt: true, extra: None })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn builtin_chatml_template_renders() {
        let model = crate::core::model::Model::load(&crate::core::model::ModelSource::Builtin, None).unwrap();
        let messages = [json!({"role": "system", "content": "  Be brief. "}), json!({"role": "user", "content": "Hi"})];
        let text = model
            .chat_template
            .unwrap()
            .render(&TemplateInput { messages: &messages, tools: None, add_generation_prompt: true, extra: None })
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_the_error_message() {
        let err = render("{{ raise_exception('roles must alternate') }}", json!([])).unwrap_err();
        assert_eq!(err, "roles must alternate");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let out =
            render("{{ messages[0] | tojson }}", json!([{"role": "user", "content": "é<b>", "n": [1, 2]}])).unwrap();
        assert_eq!(out, r#"{"role": "user", "content": "é<b>", "n": [1, 2]}"#);
        let indented = render("{{ messages[0] | tojson(indent=2) }}", json!([{"a": 1}])).unwrap();
        assert_eq!(indented, "{\n  \"a\": 1\n}");
    }

    #[test]
    fn python_string_methods_and_special_tokens_work() {
        let out = render(
            "{{ bos_token }}{{ messages[0].content.strip().upper() }}{{ eos_token }}",
            json!([{"content": " x "}]),
        )
        .unwrap();
        assert_eq!(out, "<s>X</s>");
    }

    #[test]
    fn strftime_now_formats_the_current_date() {
        let out = render("{{ strftime_now('%Y') }}", json!([])).unwrap();
        assert_eq!(out, chrono::Local::now().format("%Y").to_string());
    }

    #[test]
    fn named_templates_pick_default() {
        let config =
            json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(source_from_tokenizer_config(&config).as_deref(), Some("D"));
    }

    #[test]
    fn a_developer_message_is_a_system_message_to_templates_that_do_not_know_the_role() {
        let chatml = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}";
        let template = ChatTemplate::new(chatml, None).unwrap();
        let messages = [json!({"role": "developer", "content": "Be brief."}), json!({"role": "user", "content": "Hi"})];
        let input = TemplateInput { messages: &messages, tools: None, add_generation_prompt: false, extra: None };
        assert_eq!(template.render(&input).unwrap(), "<|system|>Be brief.<|user|>Hi");
        let knowing =
            "{% for m in messages %}{% if m.role == 'developer' %}[dev]{% endif %}{{ m.content }}{% endfor %}";
        let template = ChatTemplate::new(knowing, None).unwrap();
        assert_eq!(template.render(&input).unwrap(), "[dev]Be brief.Hi");
    }
}
