//! The shape a request asks its output to take: OpenAI's `response_format`, vLLM's `structured_outputs` and
//! its older `guided_*` fields, read into one `Constraint` and compiled against the model at once, so a bad
//! schema is a 400 naming its field rather than a failure deep in a worker.
use super::error::ApiError;
use crate::core::model::Model;
use crate::core::protocol::Constraint;
use crate::core::protocol::openai::SamplingParams;
use serde_json::Value;

/// The request's constraint, checked to compile; `None` for free text.
pub fn constraint(model: &Model, params: &SamplingParams) -> Result<Option<Constraint>, ApiError> {
    let mut found: Vec<(String, Constraint)> = Vec::new();
    if let Some(format) = params.response_format.as_ref().filter(|v| !v.is_null()) {
        found.extend(response_format(format)?.map(|c| ("response_format".to_string(), c)));
    }
    if let Some(json) = params.guided_json.as_ref().filter(|v| !v.is_null()) {
        found.push(("guided_json".into(), Constraint::JsonSchema(schema_text(json, "guided_json")?)));
    }
    if let Some(regex) = &params.guided_regex {
        found.push(("guided_regex".into(), Constraint::Regex(regex.clone())));
    }
    if let Some(choice) = &params.guided_choice {
        found.push(("guided_choice".into(), Constraint::Choice(choice.clone())));
    }
    if let Some(grammar) = &params.guided_grammar {
        found.push(("guided_grammar".into(), Constraint::Lark(grammar.clone())));
    }
    if let Some(outputs) = params.structured_outputs.as_ref().filter(|v| !v.is_null()) {
        found.extend(structured_outputs(outputs)?);
    }
    let (field, constraint) = match found.len() {
        0 => return Ok(None),
        1 => found.remove(0),
        _ => {
            let fields: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
            return Err(ApiError::bad_request(
                Some(fields[1]),
                format!("only one structured-output constraint may be given, got {}", fields.join(", ")),
            ));
        }
    };
    let grammars = model
        .grammars()
        .grammars()
        .map_err(|e| ApiError::invalid(&field, format!("cannot be served for this model: {e}")))?;
    grammars.compile(&constraint).map_err(|e| ApiError::invalid(&field, format!("does not compile: {e}")))?;
    Ok(Some(constraint))
}

/// OpenAI's `{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}`.
fn response_format(format: &Value) -> Result<Option<Constraint>, ApiError> {
    let kind = format.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonSchema(r#"{"type":"object"}"#.into()))),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .filter(|s| !s.is_null())
                .ok_or_else(|| ApiError::invalid("response_format.json_schema.schema", "is required"))?;
            Ok(Some(Constraint::JsonSchema(schema_text(schema, "response_format.json_schema.schema")?)))
        }
        _ => Err(ApiError::invalid(
            "response_format.type",
            format!(
                "must be \"text\", \"json_object\" or \"json_schema\", got {}",
                format.get("type").map_or("nothing".to_string(), Value::to_string)
            ),
        )),
    }
}

/// vLLM's `{"json" | "regex" | "choice" | "grammar" | "json_object": …}`, exactly one of them.
fn structured_outputs(outputs: &Value) -> Result<Vec<(String, Constraint)>, ApiError> {
    let Some(object) = outputs.as_object() else {
        return Err(ApiError::invalid("structured_outputs", "must be an object"));
    };
    let mut found = Vec::new();
    for (key, value) in object.iter().filter(|(_, v)| !v.is_null()) {
        let field = format!("structured_outputs.{key}");
        let text = |value: &Value| {
            value.as_str().map(str::to_string).ok_or_else(|| ApiError::invalid(&field, "must be a string"))
        };
        let constraint = match key.as_str() {
            "json" => Constraint::JsonSchema(schema_text(value, &field)?),
            "regex" => Constraint::Regex(text(value)?),
            "grammar" => Constraint::Lark(text(value)?),
            "choice" => Constraint::Choice(
                serde_json::from_value(value.clone())
                    .map_err(|_| ApiError::invalid(&field, "must be a list of strings"))?,
            ),
            "json_object" if value == &Value::Bool(true) => Constraint::JsonSchema(r#"{"type":"object"}"#.into()),
            "json_object" => continue,
            // Always true here: JSON is written without free whitespace.
            "disable_any_whitespace" if value == &Value::Bool(true) => continue,
            _ => {
                return Err(ApiError::invalid(
                    &field,
                    "is not supported: give one of json, regex, choice, grammar (Lark) or json_object",
                ));
            }
        };
        found.push((field, constraint));
    }
    Ok(found)
}

/// A schema as compact JSON text: given as an object, or as a string holding one.
fn schema_text(schema: &Value, field: &str) -> Result<String, ApiError> {
    let parsed = match schema {
        Value::String(text) => serde_json::from_str(text)
            .map_err(|e| ApiError::invalid(field, format!("is a string that is not a JSON schema: {e}")))?,
        other => other.clone(),
    };
    match parsed {
        Value::Object(_) => Ok(parsed.to_string()),
        _ => Err(ApiError::invalid(field, "must be a JSON schema (an object)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::ModelSource;
    use serde_json::json;

    fn model() -> Model {
        Model::load(&ModelSource::Builtin, None).unwrap()
    }

    fn read(body: Value) -> Result<Option<Constraint>, ApiError> {
        let params: SamplingParams = serde_json::from_value(body).unwrap();
        constraint(&model(), &params)
    }

    #[test]
    fn every_spelling_reads_to_one_constraint() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let as_schema = Some(Constraint::JsonSchema(schema.to_string()));
        let object = Some(Constraint::JsonSchema(r#"{"type":"object"}"#.into()));
        for (body, expected) in [
            (json!({}), None),
            (json!({"response_format": {"type": "text"}}), None),
            (json!({"response_format": {"type": "json_object"}}), object.clone()),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
                as_schema.clone(),
            ),
            (json!({"guided_json": schema}), as_schema.clone()),
            (json!({"guided_json": schema.to_string()}), as_schema.clone()),
            (json!({"structured_outputs": {"json": schema}}), as_schema.clone()),
            (json!({"structured_outputs": {"json_object": true}}), object),
            (json!({"guided_regex": "[0-9]{3}"}), Some(Constraint::Regex("[0-9]{3}".into()))),
            (json!({"structured_outputs": {"regex": "a|b"}}), Some(Constraint::Regex("a|b".into()))),
            (json!({"guided_choice": ["yes", "no"]}), Some(Constraint::Choice(vec!["yes".into(), "no".into()]))),
            (json!({"structured_outputs": {"choice": ["x"]}}), Some(Constraint::Choice(vec!["x".into()]))),
            (json!({"guided_grammar": "start: \"hi\""}), Some(Constraint::Lark("start: \"hi\"".into()))),
        ] {
            assert_eq!(read(body.clone()).unwrap_or_else(|e| panic!("{body}: {e:?}")), expected, "{body}");
        }
    }

    #[test]
    fn bad_constraints_are_refused_naming_their_field() {
        for (body, field) in [
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                "response_format.json_schema.schema",
            ),
            (json!({"response_format": {"type": "yaml"}}), "response_format.type"),
            (json!({"guided_json": "{not json"}), "guided_json"),
            (json!({"guided_json": [1, 2]}), "guided_json"),
            (json!({"guided_regex": "(unclosed"}), "guided_regex"),
            (json!({"guided_choice": []}), "guided_choice"),
            (json!({"guided_grammar": "start: undefined_rule"}), "guided_grammar"),
            (json!({"structured_outputs": {"structural_tag": "x"}}), "structured_outputs.structural_tag"),
            (json!({"structured_outputs": {"choice": "x"}}), "structured_outputs.choice"),
            (json!({"guided_regex": "a", "guided_choice": ["a"]}), "guided_choice"),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}}),
                "response_format",
            ),
        ] {
            let error = read(body.clone()).err().unwrap_or_else(|| panic!("{body} was accepted"));
            assert_eq!(error.param.as_deref(), Some(field), "{body}: {error:?}");
        }
    }
}
