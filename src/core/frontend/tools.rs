//! Tool calls in a chat model's output: the formats models write them in (`--tool-call-parser`, or the one
//! the chat template names), parsed as the text streams so that content before a call reaches the client at
//! once and each call is sent whole once its last character is in.
//!
//! - `hermes` (Hermes, Qwen 2.5 and 3, and most templates since): `<tool_call>{"name": …, "arguments": …}
//!   </tool_call>`, any number, text around them is content.
//! - `mistral`: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` to the end of the output.
//! - `llama3_json` (Llama 3.1 to 3.3): an output that is one JSON object `{"name", "parameters"}` (or several
//!   separated by `;`), possibly after `<|python_tag|>`; an output that starts otherwise is content.
//!
//! A call whose JSON does not parse, or names no function, stays content, as vLLM leaves it: the client sees
//! what the model wrote rather than losing it.
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolParser {
    Hermes,
    Mistral,
    Llama3Json,
}

impl ToolParser {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hermes" => Some(Self::Hermes),
            "mistral" => Some(Self::Mistral),
            "llama3_json" => Some(Self::Llama3Json),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Mistral => "mistral",
            Self::Llama3Json => "llama3_json",
        }
    }

    /// The format a chat template teaches its model, from the markers it writes; `None` when it names none.
    pub fn of_template(source: &str) -> Option<Self> {
        if source.contains("<tool_call>") {
            Some(Self::Hermes)
        } else if source.contains("[TOOL_CALLS]") {
            Some(Self::Mistral)
        } else if source.contains("<|python_tag|>") || source.contains("\"parameters\": ") {
            Some(Self::Llama3Json)
        } else {
            None
        }
    }
}

/// How a choice's output is read for calls.
#[derive(Debug, Clone, PartialEq)]
pub enum Calls {
    /// Written in the model's own format, among other text, if it chooses to call (`tool_choice: "auto"`).
    Parsed(ToolParser),
    /// The whole output is the arguments of this function, held to its parameters' schema (a named
    /// `tool_choice`).
    Named(String),
    /// The whole output is a JSON list of `{"name", "parameters"}`, at least one, held to the tools' schemas
    /// (`tool_choice: "required"`).
    Required,
}

impl From<ToolParser> for Calls {
    fn from(parser: ToolParser) -> Self {
        Calls::Parsed(parser)
    }
}

impl Calls {
    /// The `finish_reason` of a choice that made calls and would otherwise have said `stop`: OpenAI answers
    /// a named function with `stop`, every other call with `tool_calls`.
    pub fn finish_reason(&self) -> &'static str {
        match self {
            Calls::Named(_) => "stop",
            Calls::Parsed(_) | Calls::Required => "tool_calls",
        }
    }
}

/// One function call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// A JSON object, as text (what OpenAI's `function.arguments` carries).
    pub arguments: String,
}

/// What a piece of output turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Content(String),
    Call(ToolCall),
}

/// One choice's output as it streams.
#[derive(Debug)]
pub struct ToolStream {
    reading: Calls,
    /// Text not yet given out: a possible start marker, or a call not yet closed.
    pending: String,
    state: State,
    /// Calls given out so far.
    pub calls: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace so far (`llama3_json` decides on the first other character).
    Start,
    Text,
    /// Inside a `<tool_call>` (hermes), or past `[TOOL_CALLS]` / a leading `{` (to the end of the output).
    Call,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_MARK: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolStream {
    pub fn new(reading: Calls) -> Self {
        Self { reading, pending: String::new(), state: State::Start, calls: 0 }
    }

    /// The next piece of text; what can be said of the text so far.
    pub fn feed(&mut self, text: &str) -> Vec<Parsed> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        // A forced call is the whole output: read at the end.
        let Calls::Parsed(parser) = self.reading else { return out };
        loop {
            let before = (self.state, self.pending.len());
            match (parser, self.state) {
                (ToolParser::Llama3Json, State::Start) => {
                    let trimmed = self.pending.trim_start();
                    if trimmed.is_empty() || PYTHON_TAG.starts_with(trimmed) && trimmed.len() < PYTHON_TAG.len() {
                        break;
                    }
                    self.state = if trimmed.starts_with('{') || trimmed.starts_with(PYTHON_TAG) {
                        State::Call
                    } else {
                        State::Text
                    };
                }
                (ToolParser::Llama3Json, State::Text) | (_, State::Start) => {
                    self.state = State::Text;
                    if parser == ToolParser::Llama3Json {
                        out.push(Parsed::Content(std::mem::take(&mut self.pending)));
                        break;
                    }
                }
                (ToolParser::Hermes, State::Text) => self.text_until(HERMES_OPEN, &mut out),
                (ToolParser::Mistral, State::Text) => self.text_until(MISTRAL_MARK, &mut out),
                (ToolParser::Hermes, State::Call) => {
                    let Some(end) = self.pending.find(HERMES_CLOSE) else { break };
                    let body: String = self.pending.drain(..end + HERMES_CLOSE.len()).collect();
                    let inner = &body[..end];
                    match one_call(inner) {
                        Some(call) => {
                            self.calls += 1;
                            out.push(Parsed::Call(call));
                        }
                        None => out.push(Parsed::Content(format!("{HERMES_OPEN}{body}"))),
                    }
                    self.state = State::Text;
                }
                // To the end of the output: decided in `finish`.
                (ToolParser::Mistral | ToolParser::Llama3Json, State::Call) => break,
            }
            if (self.state, self.pending.len()) == before {
                break;
            }
        }
        out.retain(|p| !matches!(p, Parsed::Content(text) if text.is_empty()));
        out
    }

    /// The output ended: whatever was held back, parsed or given out as content.
    pub fn finish(&mut self) -> Vec<Parsed> {
        let rest = std::mem::take(&mut self.pending);
        let parser = match &self.reading {
            Calls::Parsed(parser) => *parser,
            // Held to the schema, so it parses unless `max_tokens` cut it: then it is what it is, content.
            Calls::Named(name) => {
                let call = serde_json::from_str::<Value>(&rest)
                    .ok()
                    .filter(Value::is_object)
                    .map(|arguments| ToolCall { name: name.clone(), arguments: arguments.to_string() });
                return self
                    .finished(call.map_or_else(|| vec![Parsed::Content(rest)], |call| vec![Parsed::Call(call)]));
            }
            Calls::Required => {
                let calls = call_list(&rest).filter(|_| rest.trim_start().starts_with('['));
                return self.finished(match calls {
                    Some(calls) => calls.into_iter().map(Parsed::Call).collect(),
                    None => vec![Parsed::Content(rest)],
                });
            }
        };
        let out = match (parser, self.state) {
            (ToolParser::Hermes, State::Call) => vec![Parsed::Content(format!("{HERMES_OPEN}{rest}"))],
            (ToolParser::Mistral, State::Call) => match call_list(&rest) {
                Some(calls) => calls.into_iter().map(Parsed::Call).collect(),
                None => vec![Parsed::Content(format!("{MISTRAL_MARK}{rest}"))],
            },
            (ToolParser::Llama3Json, State::Call) => {
                let body = rest.trim_start();
                let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body);
                let calls: Option<Vec<ToolCall>> = body.split(';').map(one_call).collect();
                match calls {
                    Some(calls) if !calls.is_empty() => calls.into_iter().map(Parsed::Call).collect(),
                    _ => vec![Parsed::Content(rest)],
                }
            }
            _ => vec![Parsed::Content(rest)],
        };
        self.finished(out)
    }

    fn finished(&mut self, out: Vec<Parsed>) -> Vec<Parsed> {
        self.calls += out.iter().filter(|p| matches!(p, Parsed::Call(_))).count();
        out.into_iter().filter(|p| !matches!(p, Parsed::Content(text) if text.is_empty())).collect()
    }

    /// `feed`, and `finish` too on the `last` piece, as the content given out and the calls completed.
    pub fn read(&mut self, text: &str, last: bool) -> (String, Vec<ToolCall>) {
        let mut parsed = self.feed(text);
        if last {
            parsed.extend(self.finish());
        }
        let mut content = String::new();
        let mut calls = Vec::new();
        for piece in parsed {
            match piece {
                Parsed::Content(text) => content.push_str(&text),
                Parsed::Call(call) => calls.push(call),
            }
        }
        (content, calls)
    }

    /// Gives out the text before `marker` and enters the call after it; holds back a tail that may be the
    /// start of the marker.
    fn text_until(&mut self, marker: &str, out: &mut Vec<Parsed>) {
        if let Some(at) = self.pending.find(marker) {
            let text: String = self.pending.drain(..at + marker.len()).collect();
            out.push(Parsed::Content(text[..at].to_string()));
            self.state = State::Call;
            return;
        }
        let keep = (1..marker.len())
            .rev()
            .find(|&n| {
                self.pending.len() >= n
                    && self.pending.is_char_boundary(self.pending.len() - n)
                    && marker.starts_with(&self.pending[self.pending.len() - n..])
            })
            .unwrap_or(0);
        let give = self.pending.len() - keep;
        out.push(Parsed::Content(self.pending.drain(..give).collect()));
    }
}

/// Parses a whole output (a request that does not stream).
pub fn parse_whole(reading: &Calls, text: &str) -> (String, Vec<ToolCall>) {
    ToolStream::new(reading.clone()).read(text, true)
}

/// `{"name": …, "arguments" | "parameters": {…}}`, arguments re-serialised as compact JSON text.
fn one_call(text: &str) -> Option<ToolCall> {
    let value: Value = serde_json::from_str(text.trim()).ok()?;
    call_of(&value)
}

fn call_of(value: &Value) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        // Some models write the arguments as a JSON string already.
        Some(Value::String(text)) => text.clone(),
        Some(arguments @ Value::Object(_)) => arguments.to_string(),
        None | Some(Value::Null) => "{}".to_string(),
        Some(_) => return None,
    };
    Some(ToolCall { name, arguments })
}

/// A JSON list of calls (or one call object).
fn call_list(text: &str) -> Option<Vec<ToolCall>> {
    match serde_json::from_str::<Value>(text.trim()).ok()? {
        Value::Array(items) => items.iter().map(call_of).collect::<Option<Vec<_>>>().filter(|c| !c.is_empty()),
        object @ Value::Object(_) => call_of(&object).map(|call| vec![call]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The output fed in pieces of `size` bytes (on character boundaries), everything it gave out in order.
    fn streamed(parser: impl Into<Calls>, text: &str, size: usize) -> Vec<Parsed> {
        let mut stream = ToolStream::new(parser.into());
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = size.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            out.extend(stream.feed(&rest[..cut]));
            rest = &rest[cut..];
        }
        out.extend(stream.finish());
        // Neighbouring content pieces read as one.
        let mut merged: Vec<Parsed> = Vec::new();
        for piece in out {
            match (merged.last_mut(), piece) {
                (Some(Parsed::Content(a)), Parsed::Content(b)) => a.push_str(&b),
                (_, piece) => merged.push(piece),
            }
        }
        merged
    }

    fn call(name: &str, arguments: &str) -> Parsed {
        Parsed::Call(ToolCall { name: name.into(), arguments: arguments.into() })
    }

    #[test]
    fn hermes_calls_are_parsed_between_content_however_the_text_is_cut() {
        let text = "Let me check. <tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Zürich\"}}\n\
                    </tool_call>\n<tool_call>{\"name\": \"time\", \"arguments\": {}}</tool_call>";
        let expected = vec![
            Parsed::Content("Let me check. ".into()),
            call("weather", r#"{"city":"Zürich"}"#),
            Parsed::Content("\n".into()),
            call("time", "{}"),
        ];
        for size in [1, 2, 3, 7, 11, 1000] {
            assert_eq!(streamed(ToolParser::Hermes, text, size), expected, "pieces of {size}");
        }
    }

    #[test]
    fn text_that_only_looks_like_a_call_stays_content() {
        let plain = "a < b, and <tool is not a tag";
        assert_eq!(streamed(ToolParser::Hermes, plain, 1), vec![Parsed::Content(plain.into())]);
        let broken = "<tool_call>{not json}</tool_call> then text";
        assert_eq!(streamed(ToolParser::Hermes, broken, 3), vec![Parsed::Content(broken.into())]);
        let unclosed = "see <tool_call>{\"name\": \"f\"";
        assert_eq!(streamed(ToolParser::Hermes, unclosed, 4), vec![Parsed::Content(unclosed.into())]);
        let nameless = "<tool_call>{\"arguments\": {}}</tool_call>";
        assert_eq!(streamed(ToolParser::Hermes, nameless, 5), vec![Parsed::Content(nameless.into())]);
    }

    #[test]
    fn mistral_and_llama3_calls_run_to_the_end_of_the_output() {
        let mistral =
            "Sure.[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {\"x\": 1}}, {\"name\": \"b\", \"arguments\": {}}]";
        let expected = vec![Parsed::Content("Sure.".into()), call("a", r#"{"x":1}"#), call("b", "{}")];
        assert_eq!(streamed(ToolParser::Mistral, mistral, 4), expected);
        let llama = "<|python_tag|>{\"name\": \"search\", \"parameters\": {\"q\": \"rust\"}}; {\"name\": \"b\", \"parameters\": {}}";
        assert_eq!(
            streamed(ToolParser::Llama3Json, llama, 3),
            vec![call("search", r#"{"q":"rust"}"#), call("b", "{}")]
        );
        let bare = "  {\"name\": \"f\", \"parameters\": {\"n\": 2}}";
        assert_eq!(streamed(ToolParser::Llama3Json, bare, 5), vec![call("f", r#"{"n":2}"#)]);
        let prose = "It is {probably} fine.";
        assert_eq!(streamed(ToolParser::Llama3Json, prose, 2), vec![Parsed::Content(prose.into())]);
        let not_a_call = "{\"answer\": 42}";
        assert_eq!(streamed(ToolParser::Llama3Json, not_a_call, 2), vec![Parsed::Content(not_a_call.into())]);
    }

    #[test]
    fn a_whole_output_splits_into_content_and_calls() {
        let (content, calls) = parse_whole(
            &Calls::Parsed(ToolParser::Hermes),
            "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>",
        );
        assert_eq!(content, "");
        assert_eq!(calls, vec![ToolCall { name: "f".into(), arguments: r#"{"a": 1}"#.into() }]);
    }

    #[test]
    fn forced_calls_are_the_whole_output_and_content_when_cut() {
        let named = || Calls::Named("weather".into());
        assert_eq!(streamed(named(), "{\"city\": \"Oslo\"}", 3), vec![call("weather", r#"{"city":"Oslo"}"#)]);
        assert_eq!(streamed(named(), "{\"city\": \"Os", 3), vec![Parsed::Content("{\"city\": \"Os".into())]);
        let list = r#"[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]"#;
        assert_eq!(streamed(Calls::Required, list, 5), vec![call("a", r#"{"x":1}"#), call("b", "{}")]);
        let cut = r#"[{"name": "a", "param"#;
        assert_eq!(streamed(Calls::Required, cut, 5), vec![Parsed::Content(cut.into())]);
        assert_eq!(named().finish_reason(), "stop");
        assert_eq!(Calls::Required.finish_reason(), "tool_calls");
    }

    #[test]
    fn the_template_names_its_format() {
        assert_eq!(ToolParser::of_template("{{ '<tool_call>' }}"), Some(ToolParser::Hermes));
        assert_eq!(ToolParser::of_template("[TOOL_CALLS]"), Some(ToolParser::Mistral));
        assert_eq!(ToolParser::of_template("<|python_tag|>"), Some(ToolParser::Llama3Json));
        assert_eq!(ToolParser::of_template("{{ messages }}"), None);
    }
}
