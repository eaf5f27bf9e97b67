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
    /// A JSON object, as text (what OpenAI's `function.arguments` carries), as the model wrote it.
    pub arguments: String,
}

/// A part of a call as it streams: the first of a call names it, the others add to its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct CallPiece {
    /// The call's place among the choice's calls.
    pub index: usize,
    /// On the call's first piece only.
    pub name: Option<String>,
    pub arguments: String,
}

/// What a piece of output turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Content(String),
    Call(CallPiece),
}

/// One choice's output as it streams. A call is given out as soon as its name is read, then its arguments
/// as they come (as OpenAI streams them); text is held back only while it may still turn out to be a call.
#[derive(Debug)]
pub struct ToolStream {
    reading: Calls,
    /// Text not yet read to the end: a possible start marker, or calls being read.
    pending: String,
    state: State,
    /// Where the call or separator being read starts in `pending` (in `Objects` and `Hermes` states).
    at: usize,
    /// The call being read, once its name is given out.
    current: Option<Emitted>,
    /// Calls started so far.
    pub calls: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace so far (`llama3_json` decides on the first other character).
    Start,
    Text,
    /// Inside `<tool_call>…</tool_call>` (hermes): one call object.
    Tagged,
    /// Call objects to the end of the output, between separators (`[`, `,`, `;`, `]`).
    Objects,
    /// The whole output is the arguments of the named function.
    Arguments,
    /// Everything after this is content (a list that closed, or text that broke it).
    Rest,
}

/// How much of a call has been given out.
#[derive(Debug, Clone, Copy)]
struct Emitted {
    index: usize,
    /// Bytes of the arguments' value given out.
    sent: usize,
    /// The arguments were given out whole (a value that is not an object streams only once it is complete).
    finished: bool,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_MARK: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolStream {
    pub fn new(reading: Calls) -> Self {
        let state = match reading {
            Calls::Named(_) => State::Arguments,
            Calls::Required => State::Objects,
            Calls::Parsed(_) => State::Start,
        };
        Self { reading, pending: String::new(), state, at: 0, current: None, calls: 0 }
    }

    /// The next piece of text; what can be said of the text so far.
    pub fn feed(&mut self, text: &str) -> Vec<Parsed> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        self.advance(&mut out, false);
        out.retain(|p| !matches!(p, Parsed::Content(text) if text.is_empty()));
        out
    }

    /// The output ended: whatever was held back, parsed or given out as content.
    pub fn finish(&mut self) -> Vec<Parsed> {
        let mut out = Vec::new();
        self.advance(&mut out, true);
        out.retain(|p| !matches!(p, Parsed::Content(text) if text.is_empty()));
        out
    }

    /// `feed`, and `finish` too on the `last` piece, as the content given out and the call pieces.
    pub fn read(&mut self, text: &str, last: bool) -> (String, Vec<CallPiece>) {
        let mut parsed = self.feed(text);
        if last {
            parsed.extend(self.finish());
        }
        let mut content = String::new();
        let mut pieces = Vec::new();
        for piece in parsed {
            match piece {
                Parsed::Content(text) => content.push_str(&text),
                Parsed::Call(piece) => pieces.push(piece),
            }
        }
        (content, pieces)
    }

    fn advance(&mut self, out: &mut Vec<Parsed>, last: bool) {
        loop {
            let before = (self.state, self.pending.len(), self.at);
            match (self.state, &self.reading) {
                (State::Start, Calls::Parsed(ToolParser::Llama3Json)) => {
                    let trimmed = self.pending.trim_start();
                    let undecided = trimmed.is_empty() || PYTHON_TAG.starts_with(trimmed);
                    if undecided && !last {
                        return;
                    }
                    if let Some(after) = trimmed.strip_prefix(PYTHON_TAG) {
                        self.pending = after.to_string();
                        self.state = State::Objects;
                    } else if trimmed.starts_with('{') {
                        self.state = State::Objects;
                    } else {
                        self.state = State::Rest;
                    }
                }
                (State::Start, _) => self.state = State::Text,
                (State::Text, Calls::Parsed(ToolParser::Hermes)) => {
                    self.text_until(HERMES_OPEN, State::Tagged, out, last)
                }
                (State::Text, Calls::Parsed(ToolParser::Mistral)) => {
                    self.text_until(MISTRAL_MARK, State::Objects, out, last)
                }
                (State::Text | State::Rest, _) => {
                    out.push(Parsed::Content(std::mem::take(&mut self.pending)));
                    return;
                }
                (State::Arguments, Calls::Named(name)) => {
                    if self.current.is_none() {
                        let name = Some(name.clone());
                        out.push(Parsed::Call(CallPiece { index: 0, name, arguments: String::new() }));
                        self.current = Some(Emitted { index: 0, sent: 0, finished: false });
                        self.calls = 1;
                    }
                    let arguments = std::mem::take(&mut self.pending);
                    if !arguments.is_empty() {
                        out.push(Parsed::Call(CallPiece { index: 0, name: None, arguments }));
                    }
                    return;
                }
                (State::Tagged, _) => self.tagged(out, last),
                (State::Objects, _) => self.objects(out, last),
                (State::Arguments, _) => self.state = State::Rest,
            }
            if (self.state, self.pending.len(), self.at) == before {
                return;
            }
        }
    }

    /// Gives out the text before `marker` and enters `next` after it; holds back a tail that may be the
    /// start of the marker (unless the output ended).
    fn text_until(&mut self, marker: &str, next: State, out: &mut Vec<Parsed>, last: bool) {
        if let Some(found) = self.pending.find(marker) {
            let text: String = self.pending.drain(..found + marker.len()).collect();
            out.push(Parsed::Content(text[..found].to_string()));
            self.state = next;
            self.at = 0;
            return;
        }
        let keep = match last {
            true => 0,
            false => (1..marker.len())
                .rev()
                .find(|&n| {
                    self.pending.len() >= n
                        && self.pending.is_char_boundary(self.pending.len() - n)
                        && marker.starts_with(&self.pending[self.pending.len() - n..])
                })
                .unwrap_or(0),
        };
        let give = self.pending.len() - keep;
        out.push(Parsed::Content(self.pending.drain(..give).collect()));
    }

    /// One call object between `<tool_call>` and `</tool_call>`.
    fn tagged(&mut self, out: &mut Vec<Parsed>, last: bool) {
        let close = self.pending.find(HERMES_CLOSE);
        let body_end = close.unwrap_or(self.pending.len());
        let start = self.pending.len() - self.pending.trim_start().len();
        let body = self.pending[start.min(body_end)..body_end].to_string();
        let scan = scan(&body);
        self.give_call(&body, &scan, out);
        let ended = close.is_some() || last;
        if !ended {
            // A body that cannot be a call is content, but only once its closing tag says where it ends.
            return;
        }
        let rest_from = close.map_or(self.pending.len(), |c| c + HERMES_CLOSE.len());
        match self.current.take() {
            Some(emitted) => self.end_call(emitted, &body, &scan, out),
            None => out.push(Parsed::Content(format!("{HERMES_OPEN}{}", &self.pending[..rest_from]))),
        }
        self.pending.drain(..rest_from);
        self.state = State::Text;
    }

    /// Call objects one after another, with separators between them (a JSON list, or `;`).
    fn objects(&mut self, out: &mut Vec<Parsed>, last: bool) {
        loop {
            let rest = &self.pending[self.at..];
            let skipped = rest.len() - rest.trim_start_matches(|c: char| c.is_whitespace() || ",;[".contains(c)).len();
            if self.current.is_none() {
                self.at += skipped;
            }
            let rest = &self.pending[self.at..];
            if rest.is_empty() {
                return;
            }
            if self.current.is_none() && rest.starts_with(']') {
                // The list closed: what follows is content.
                self.pending.drain(..self.at + 1);
                self.at = 0;
                self.state = State::Rest;
                return;
            }
            let scan = scan(rest);
            let rest = rest.to_string();
            self.give_call(&rest, &scan, out);
            match scan.end {
                Some(end) => {
                    match self.current.take() {
                        Some(emitted) => self.end_call(emitted, &rest, &scan, out),
                        // Not a call after all: it and everything after it is content.
                        None => {
                            self.fall_back(out);
                            return;
                        }
                    }
                    self.at += end;
                }
                None if scan.broken || last => {
                    match self.current.take() {
                        Some(emitted) => self.end_call(emitted, &rest, &scan, out),
                        None => self.fall_back(out),
                    }
                    self.pending.drain(..self.pending.len().min(self.at + rest.len()));
                    self.at = 0;
                    self.state = State::Rest;
                    return;
                }
                None => return,
            }
        }
    }

    /// Text read as calls that is none: given out as it was written (with the marker that opened it), from
    /// where the calls given out so far end.
    fn fall_back(&mut self, out: &mut Vec<Parsed>) {
        let marker = match (&self.reading, self.calls) {
            (Calls::Parsed(ToolParser::Mistral), 0) => MISTRAL_MARK,
            _ => "",
        };
        let from = if self.calls == 0 { 0 } else { self.at };
        out.push(Parsed::Content(format!("{marker}{}", &self.pending[from..])));
        self.pending.clear();
        self.at = 0;
        self.state = State::Rest;
    }

    /// Gives out what `scan` of the call text `text` allows: its name once read, then its arguments.
    fn give_call(&mut self, text: &str, scan: &Scan, out: &mut Vec<Parsed>) {
        if self.current.is_none() {
            let Some(name) = &scan.name else { return };
            let index = self.calls;
            self.calls += 1;
            out.push(Parsed::Call(CallPiece { index, name: Some(name.clone()), arguments: String::new() }));
            self.current = Some(Emitted { index, sent: 0, finished: false });
        }
        let (Some(emitted), Some((start, end))) = (self.current.as_mut(), scan.arguments) else { return };
        if emitted.finished {
            return;
        }
        let value = &text[start..end.unwrap_or(text.len())];
        let arguments = match value.as_bytes().first() {
            // An object (or list) streams as it is written.
            Some(b'{' | b'[') => {
                let fragment = value[emitted.sent..].to_string();
                emitted.sent = value.len();
                emitted.finished = end.is_some();
                fragment
            }
            // Some models write the arguments as a JSON string of JSON: given out unquoted, once whole.
            Some(b'"') if end.is_some() => {
                emitted.finished = true;
                serde_json::from_str::<String>(value).unwrap_or_else(|_| value.to_string())
            }
            Some(_) if end.is_some() => {
                emitted.finished = true;
                if value == "null" { "{}".to_string() } else { value.to_string() }
            }
            _ => return,
        };
        if !arguments.is_empty() {
            out.push(Parsed::Call(CallPiece { index: emitted.index, name: None, arguments }));
        }
    }

    /// A call whose text ended: arguments it never gave are `{}`; a value cut before it closed is given as far
    /// as it goes (an object's part already went out as it came).
    fn end_call(&self, emitted: Emitted, text: &str, scan: &Scan, out: &mut Vec<Parsed>) {
        if emitted.finished {
            return;
        }
        let arguments = match scan.arguments {
            None if emitted.sent == 0 => "{}".to_string(),
            Some((start, None)) if !text[start..].starts_with(['{', '[']) => text[start..].to_string(),
            _ => return,
        };
        out.push(Parsed::Call(CallPiece { index: emitted.index, name: None, arguments }));
    }
}

/// Where a call object stands, from its text so far (which starts at its `{`).
#[derive(Debug, Default, PartialEq)]
struct Scan {
    name: Option<String>,
    /// Byte range of the arguments' value (`arguments` or `parameters`): its start, and its end once whole.
    arguments: Option<(usize, Option<usize>)>,
    /// Just past the object's closing brace, once it is in.
    end: Option<usize>,
    /// Not a JSON object.
    broken: bool,
}

/// Reads the top level of a JSON object as far as it goes: the `name` string and where the arguments' value
/// lies. Nested values are skipped by depth, strings with their escapes.
fn scan(text: &str) -> Scan {
    #[derive(PartialEq)]
    enum Expect {
        Key,
        Colon,
        Value,
        Comma,
    }
    let mut scan = Scan::default();
    let bytes = text.as_bytes();
    if bytes.first() != Some(&b'{') {
        scan.broken = !text.is_empty();
        return scan;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut expect = Expect::Key;
    let mut key = String::new();
    let mut token_start = 0;
    let mut value_start: Option<usize> = None;
    let close = |scan: &mut Scan, key: &str, start: usize, end: usize| match key {
        "name" => scan.name = serde_json::from_str::<String>(&text[start..end]).ok(),
        "arguments" | "parameters" => scan.arguments = Some((start, Some(end))),
        _ => {}
    };
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    in_string = false;
                    if depth == 1 && expect == Expect::Key {
                        key = serde_json::from_str::<String>(&text[token_start..=i]).unwrap_or_default();
                        expect = Expect::Colon;
                    } else if depth == 1
                        && let Some(start) = value_start.take()
                    {
                        close(&mut scan, &key, start, i + 1);
                        expect = Expect::Comma;
                    }
                }
                _ => {}
            }
            continue;
        }
        // A primitive value at the top level ends at whatever is not part of it.
        if depth == 1
            && expect == Expect::Value
            && let Some(start) = value_start
            && (b == b',' || b == b'}' || b.is_ascii_whitespace())
        {
            close(&mut scan, &key, start, i);
            value_start = None;
            expect = Expect::Comma;
        }
        match b {
            b'"' => {
                in_string = true;
                if depth == 1 && expect == Expect::Key {
                    token_start = i;
                } else if depth == 1 && expect == Expect::Value {
                    value_start = Some(i);
                }
            }
            b'{' | b'[' => {
                if depth == 1 && expect == Expect::Value {
                    value_start = Some(i);
                }
                depth += 1;
            }
            b'}' | b']' => {
                if depth == 0 {
                    scan.broken = true;
                    return scan;
                }
                depth -= 1;
                if depth == 1
                    && let Some(start) = value_start.take()
                {
                    close(&mut scan, &key, start, i + 1);
                    expect = Expect::Comma;
                } else if depth == 0 {
                    scan.end = Some(i + 1);
                    return scan;
                }
            }
            b':' if depth == 1 && expect == Expect::Colon => expect = Expect::Value,
            b',' if depth == 1 && expect == Expect::Comma => expect = Expect::Key,
            b if depth == 1 && expect == Expect::Value && value_start.is_none() && !b.is_ascii_whitespace() => {
                value_start = Some(i);
            }
            b if depth == 1 && !b.is_ascii_whitespace() && expect != Expect::Value => {
                // Neither a key, a colon nor a comma where one belongs: not JSON.
                scan.broken = true;
                return scan;
            }
            _ => {}
        }
    }
    if let Some(start) = value_start
        && (key == "arguments" || key == "parameters")
    {
        scan.arguments = Some((start, None));
    }
    scan
}

/// Parses a whole output (a request that does not stream) into its content and calls.
pub fn parse_whole(reading: &Calls, text: &str) -> (String, Vec<ToolCall>) {
    let (content, pieces) = ToolStream::new(reading.clone()).read(text, true);
    (content, assemble(pieces))
}

/// Calls put together from their pieces.
pub fn assemble(pieces: Vec<CallPiece>) -> Vec<ToolCall> {
    let mut calls: Vec<ToolCall> = Vec::new();
    for piece in pieces {
        match piece.name {
            Some(name) => calls.push(ToolCall { name, arguments: piece.arguments }),
            None => {
                if let Some(call) = calls.get_mut(piece.index) {
                    call.arguments.push_str(&piece.arguments);
                }
            }
        }
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Item {
        Content(String),
        Call(ToolCall),
    }

    /// The output fed in pieces of `size` bytes (on character boundaries): content in order, and each call put
    /// together from its pieces (the first of which must name it).
    fn streamed(reading: impl Into<Calls>, text: &str, size: usize) -> Vec<Item> {
        let mut stream = ToolStream::new(reading.into());
        let mut parsed = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = size.min(rest.len());
            while !rest.is_char_boundary(cut) {
                cut += 1;
            }
            parsed.extend(stream.feed(&rest[..cut]));
            rest = &rest[cut..];
        }
        parsed.extend(stream.finish());
        let mut items: Vec<Item> = Vec::new();
        let mut calls: Vec<usize> = Vec::new();
        for piece in parsed {
            match piece {
                Parsed::Content(text) => match items.last_mut() {
                    Some(Item::Content(before)) => before.push_str(&text),
                    _ => items.push(Item::Content(text)),
                },
                Parsed::Call(CallPiece { index, name: Some(name), arguments }) => {
                    assert_eq!(index, calls.len(), "calls are numbered in order");
                    calls.push(items.len());
                    items.push(Item::Call(ToolCall { name, arguments }));
                }
                Parsed::Call(CallPiece { index, name: None, arguments }) => {
                    let at = *calls.get(index).unwrap_or_else(|| panic!("arguments of call {index} before its name"));
                    if let Item::Call(call) = &mut items[at] {
                        call.arguments.push_str(&arguments);
                    }
                }
            }
        }
        items
    }

    fn call(name: &str, arguments: &str) -> Item {
        Item::Call(ToolCall { name: name.into(), arguments: arguments.into() })
    }

    fn content(text: &str) -> Item {
        Item::Content(text.into())
    }

    #[test]
    fn hermes_calls_are_parsed_between_content_however_the_text_is_cut() {
        let text = "Let me check. <tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Zürich\"}}\n\
                    </tool_call>\n<tool_call>{\"name\": \"time\", \"arguments\": {}}</tool_call>";
        let expected = vec![
            content("Let me check. "),
            call("weather", r#"{"city": "Zürich"}"#),
            content("\n"),
            call("time", "{}"),
        ];
        for size in [1, 2, 3, 7, 11, 1000] {
            assert_eq!(streamed(ToolParser::Hermes, text, size), expected, "pieces of {size}");
        }
    }

    #[test]
    fn a_call_goes_out_by_its_name_then_its_arguments_as_they_come() {
        let mut stream = ToolStream::new(Calls::Parsed(ToolParser::Hermes));
        assert!(stream.feed("<tool_call>{\"name\": \"weat").is_empty());
        let named = stream.feed("her\", \"arguments\": {\"ci");
        assert_eq!(
            named,
            vec![
                Parsed::Call(CallPiece { index: 0, name: Some("weather".into()), arguments: String::new() }),
                Parsed::Call(CallPiece { index: 0, name: None, arguments: "{\"ci".into() }),
            ]
        );
        let more = stream.feed("ty\": \"Oslo\"}}</tool_call> done");
        assert_eq!(
            more,
            vec![
                Parsed::Call(CallPiece { index: 0, name: None, arguments: "ty\": \"Oslo\"}".into() }),
                Parsed::Content(" done".into()),
            ]
        );
    }

    #[test]
    fn text_that_only_looks_like_a_call_stays_content() {
        let plain = "a < b, and <tool is not a tag";
        assert_eq!(streamed(ToolParser::Hermes, plain, 1), vec![content(plain)]);
        let broken = "<tool_call>{not json}</tool_call> then text";
        assert_eq!(streamed(ToolParser::Hermes, broken, 3), vec![content(broken)]);
        let unclosed = "see <tool_call>{\"name\": \"f\"";
        assert_eq!(streamed(ToolParser::Hermes, unclosed, 4), vec![content("see "), call("f", "{}")]);
        let nameless = "<tool_call>{\"arguments\": {}}</tool_call>";
        assert_eq!(streamed(ToolParser::Hermes, nameless, 5), vec![content(nameless)]);
    }

    #[test]
    fn mistral_and_llama3_calls_run_to_the_end_of_the_output() {
        let mistral =
            "Sure.[TOOL_CALLS] [{\"name\": \"a\", \"arguments\": {\"x\": 1}}, {\"name\": \"b\", \"arguments\": {}}]";
        let expected = vec![content("Sure."), call("a", r#"{"x": 1}"#), call("b", "{}")];
        for size in [1, 4, 1000] {
            assert_eq!(streamed(ToolParser::Mistral, mistral, size), expected, "pieces of {size}");
        }
        let llama = "<|python_tag|>{\"name\": \"search\", \"parameters\": {\"q\": \"rust\"}}; {\"name\": \"b\", \"parameters\": {}}";
        assert_eq!(
            streamed(ToolParser::Llama3Json, llama, 3),
            vec![call("search", r#"{"q": "rust"}"#), call("b", "{}")]
        );
        let bare = "  {\"name\": \"f\", \"parameters\": {\"n\": 2}}";
        assert_eq!(streamed(ToolParser::Llama3Json, bare, 5), vec![call("f", r#"{"n": 2}"#)]);
        let prose = "It is {probably} fine.";
        assert_eq!(streamed(ToolParser::Llama3Json, prose, 2), vec![content(prose)]);
        let not_a_call = "{\"answer\": 42}";
        assert_eq!(streamed(ToolParser::Llama3Json, not_a_call, 2), vec![content(not_a_call)]);
        let not_a_list = "[TOOL_CALLS] sorry, no";
        assert_eq!(streamed(ToolParser::Mistral, not_a_list, 3), vec![content(not_a_list)]);
    }

    #[test]
    fn arguments_written_as_a_json_string_or_in_another_order_are_read() {
        let stringly = "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call>";
        assert_eq!(streamed(ToolParser::Hermes, stringly, 2), vec![call("f", r#"{"a": 1}"#)]);
        let reversed = "<tool_call>{\"arguments\": {\"a\": [1, {\"b\": \"}\"}]}, \"name\": \"g\"}</tool_call>";
        assert_eq!(streamed(ToolParser::Hermes, reversed, 3), vec![call("g", r#"{"a": [1, {"b": "}"}]}"#)]);
        let (content, calls) = parse_whole(&Calls::Parsed(ToolParser::Hermes), stringly);
        assert_eq!(
            (content.as_str(), calls),
            ("", vec![ToolCall { name: "f".into(), arguments: r#"{"a": 1}"#.into() }])
        );
    }

    #[test]
    fn forced_calls_are_the_whole_output() {
        let named = || Calls::Named("weather".into());
        assert_eq!(streamed(named(), "{\"city\": \"Oslo\"}", 3), vec![call("weather", r#"{"city": "Oslo"}"#)]);
        // Cut by max_tokens, the call is what was written, as OpenAI returns it.
        assert_eq!(streamed(named(), "{\"city\": \"Os", 3), vec![call("weather", "{\"city\": \"Os")]);
        let list = r#"[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]"#;
        assert_eq!(streamed(Calls::Required, list, 5), vec![call("a", r#"{"x": 1}"#), call("b", "{}")]);
        let cut = r#"[{"name": "a", "param"#;
        assert_eq!(streamed(Calls::Required, cut, 5), vec![call("a", "{}")]);
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
