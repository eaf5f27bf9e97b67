//! The real `openai` Python client against `dynamo run`, streaming and not. The client is installed into a
//! venv under the target directory on first use; without python3 or PyPI the test says so and skips.
use crate::util::{Server, python_venv};
use std::process::Command;

const CLIENT_SCRIPT: &str = r#"
import sys
import openai
from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="sk-local")
try:
    OpenAI(base_url=sys.argv[1] + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    raise SystemExit("a wrong API key was accepted")
except openai.AuthenticationError as error:
    assert error.status_code == 401, error
model = client.models.list().data[0].id
assert model == "tiny-chat", model

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0)
assert chat.choices[0].finish_reason == "length", chat
assert chat.usage.completion_tokens == 8, chat.usage
text = chat.choices[0].message.content
assert text, chat

stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0,
    stream=True, stream_options={"include_usage": True})
pieces, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
assert "".join(pieces) == text, ("".join(pieces), text)
assert finish == "length" and usage.completion_tokens == 8, (finish, usage)

completion = client.completions.create(model=model, prompt="Once upon", max_tokens=5, temperature=0, logprobs=2)
assert len(completion.choices[0].logprobs.tokens) == 5, completion
assert completion.usage.prompt_tokens_details is None or completion.usage.prompt_tokens_details.cached_tokens == 0

try:
    client.chat.completions.create(model=model, messages=[], max_tokens=1)
    raise SystemExit("an empty message list was accepted")
except Exception as error:  # openai.BadRequestError
    assert getattr(error, "status_code", None) == 400, error
print("openai client ok")
"#;

#[test]
fn the_openai_python_client_works_streaming_and_not() {
    run_client(CLIENT_SCRIPT, || Server::start(&["--speedup", "100", "--api-key", "sk-local"]));
}

/// Runs `script` with the openai client against the server `start` starts (its base URL the one argument),
/// or says SKIPPED when the client cannot be installed.
fn run_client(script: &str, start: impl FnOnce() -> Server) {
    let python = match python_venv("openai-venv", &["openai>=1.40"]) {
        Ok(venv) => venv.join("bin/python"),
        Err(why) => {
            eprintln!("SKIPPED: could not install the openai Python client ({why})");
            return;
        }
    };
    let server = start();
    let out = Command::new(python).args(["-c", script, &server.base]).output().expect("python runs");
    assert!(
        out.status.success(),
        "the openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const PARSE_SCRIPT: &str = r#"
import sys
from typing import Literal
from openai import OpenAI
from pydantic import BaseModel, Field

class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int = Field(ge=1, le=5)
    sure: bool

client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="none")
completions = client.chat.completions
parse = getattr(completions, "parse", None) or client.beta.chat.completions.parse
for temperature in (0, 1.0):
    result = parse(
        model="tiny-chat", messages=[{"role": "user", "content": "Is the sky blue?"}],
        response_format=Verdict, max_tokens=64, temperature=temperature)
    choice = result.choices[0]
    assert choice.finish_reason == "stop", result
    assert isinstance(choice.message.parsed, Verdict), result

# Three tokens cannot hold the object: the answer ends for length, which the client raises as such rather
# than parsing half a JSON value.
import openai
try:
    parse(model="tiny-chat", messages=[{"role": "user", "content": "Is the sky blue?"}],
          response_format=Verdict, max_tokens=3, temperature=0)
    raise SystemExit("a cut structured output was parsed")
except openai.LengthFinishReasonError:
    pass

assert client.models.retrieve("tiny-chat").id == "tiny-chat"
developer = completions.create(
    model="tiny-chat", max_tokens=2, messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
assert developer.choices[0].finish_reason == "length", developer

# The client asks for base64 by default and decodes it; floats when asked.
embeddings = client.embeddings.create(model="tiny-chat", input=["the sky is blue", "grass is green"])
assert [e.index for e in embeddings.data] == [0, 1], embeddings
assert all(len(e.embedding) == 64 for e in embeddings.data), embeddings
assert abs(sum(v * v for v in embeddings.data[0].embedding) - 1.0) < 1e-4
floats = client.embeddings.create(model="tiny-chat", input="the sky is blue", encoding_format="float")
assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, embeddings.data[0].embedding)) < 1e-6
assert embeddings.usage.prompt_tokens == embeddings.usage.total_tokens > 0, embeddings.usage

# A forced call, streamed: the deltas reassemble into one call whose arguments are valid JSON.
import json
tools = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}]
calls, finish = {}, None
for chunk in completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=tools,
        tool_choice={"type": "function", "function": {"name": "weather"}}, stream=True, max_tokens=64):
    for choice in chunk.choices:
        finish = choice.finish_reason or finish
        for call in choice.delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = entry["id"] or call.id
            entry["name"] += (call.function.name or "") if call.function else ""
            entry["arguments"] += (call.function.arguments or "") if call.function else ""
assert list(calls) == [0] and calls[0]["name"] == "weather" and calls[0]["id"], calls
arguments = json.loads(calls[0]["arguments"])
assert arguments["city"] in ("Oslo", "Lima") and 1 <= arguments["days"] <= 7, arguments
assert finish == "stop", finish
print("parse, embeddings and a streamed call ok")
"#;

/// `parse()` with a pydantic model on the built-in model, whose random weights write JSON only because the
/// grammar lets nothing else through; `embeddings.create`, base64 (the client's default) and floats; and a
/// forced tool call, streamed, reassembled by index into valid JSON arguments.
#[test]
fn the_openai_python_client_parses_structured_output_and_reads_embeddings() {
    run_client(PARSE_SCRIPT, || Server::native(&[]));
}
