use super::*;
use crate::core::model::{Model, ModelSource};
use serde_json::{Value, json};

fn model() -> Model {
    Model::load(&ModelSource::Builtin, None).unwrap()
}

/// Draws allowed tokens (by a simple generator, as a model with random weights would) until the guide ends
/// the output or `limit` tokens were drawn; the text, and how it ended.
fn generate(model: &Model, constraint: &Constraint, seed: u64, limit: usize) -> (String, Option<FinishReason>) {
    let grammars = model.grammars().grammars().unwrap();
    let mut guide = grammars.guide(constraint, &[]).unwrap();
    let mut state = seed;
    let mut tokens = Vec::new();
    for _ in 0..limit {
        let allowed = guide.allowed();
        assert!(!allowed.is_empty(), "nothing allowed after {:?}", model.tokenizer.decode(&tokens, false));
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let token = allowed[((state >> 33) % allowed.len() as u64) as usize];
        let ends = guide.consume(token);
        if !model.card.eos_token_ids.contains(&token) {
            tokens.push(token);
        }
        if ends.is_some() {
            return (model.tokenizer.decode(&tokens, false), ends);
        }
    }
    (model.tokenizer.decode(&tokens, false), None)
}

#[test]
fn drawn_outputs_keep_to_a_bounded_json_schema() {
    let model = model();
    let schema = json!({
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green"]},
            "ok": {"type": "boolean"},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["colour", "ok", "count"],
        "additionalProperties": false,
    });
    let constraint = Constraint::JsonSchema(schema.to_string());
    for seed in 0..20 {
        let (text, ends) = generate(&model, &constraint, seed, 200);
        assert_eq!(ends, Some(FinishReason::Complete), "seed {seed}: {text}");
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {text}: {e}"));
        assert!(["red", "green"].contains(&value["colour"].as_str().unwrap()), "{text}");
        assert!(value["ok"].is_boolean(), "{text}");
        assert!((0..=9).contains(&value["count"].as_i64().unwrap()), "{text}");
    }
}

#[test]
fn json_object_outputs_parse_as_objects_when_they_end() {
    let model = model();
    let constraint = Constraint::JsonSchema(r#"{"type":"object"}"#.into());
    let mut ended = 0;
    for seed in 0..20 {
        let (text, ends) = generate(&model, &constraint, seed, 300);
        assert!(text.starts_with('{'), "{text}");
        if ends == Some(FinishReason::Complete) {
            ended += 1;
            // Random digits write numbers like 4E2345: valid JSON, past what an f64 holds.
            match serde_json::from_str::<Value>(&text) {
                Ok(value) => assert!(value.is_object(), "{text}"),
                Err(e) => assert!(e.to_string().contains("number out of range"), "{text}: {e}"),
            }
        }
    }
    assert!(ended > 0, "no object ended within 300 tokens in 20 draws");
}

#[test]
fn choices_and_regexes_are_matched_whole() {
    let model = model();
    let choices = vec!["yes".to_string(), "no, \"never\"".to_string(), "maybe\n".to_string()];
    for seed in 0..20 {
        let (text, ends) = generate(&model, &Constraint::Choice(choices.clone()), seed, 50);
        assert!(ends.is_some() && choices.contains(&text), "seed {seed}: {text:?} {ends:?}");
        let (text, ends) = generate(&model, &Constraint::Regex("[0-9]{3}-[a-z]{2}".into()), seed, 50);
        assert_eq!(ends, Some(FinishReason::Complete), "{text:?}");
        let bytes = text.as_bytes();
        assert!(text.len() == 6 && bytes[..3].iter().all(u8::is_ascii_digit) && bytes[3] == b'-', "{text:?}");
        assert!(bytes[4..].iter().all(u8::is_ascii_lowercase), "{text:?}");
    }
}

#[test]
fn masked_logits_keep_only_what_the_constraint_allows_and_eos_only_where_it_may_end() {
    let model = model();
    let grammars = model.grammars().grammars().unwrap();
    let eos = model.card.eos_token_ids[0];
    let mut guide = grammars.guide(&Constraint::Regex("ab?".into()), &[]).unwrap();
    let mut logits = vec![0.5f32; model.card.vocab_size as usize + 7];
    guide.mask_logits(&mut logits);
    let kept: Vec<usize> = (0..logits.len()).filter(|&t| logits[t].is_finite()).collect();
    let texts: Vec<String> = kept.iter().map(|&t| model.tokenizer.decode(&[t as u32], false)).collect();
    assert!(!kept.is_empty() && texts.iter().all(|t| t == "a" || t == "ab"), "{texts:?}");
    assert!(!kept.contains(&(eos as usize)), "EOS allowed before anything was written");

    let a = model.tokenizer.encode("a", false).unwrap();
    assert_eq!(guide.consume(a[0]), None);
    let mut logits = vec![0.5f32; model.card.vocab_size as usize];
    guide.mask_logits(&mut logits);
    assert!(logits[eos as usize].is_finite(), "\"a\" is whole, so EOS may follow");
    assert_eq!(guide.consume(eos), Some(FinishReason::Complete));

    // A model with two EOS ids may end with either.
    let other_eos = 1;
    let json = model.text_files().iter().find(|(n, _)| n == "tokenizer.json").unwrap().1.as_str();
    let two = Grammars::new(json, model.tokenizer.shared(), &[eos, other_eos]).unwrap();
    let mut guide = two.guide(&Constraint::Regex("a".into()), &a).unwrap();
    let mut logits = vec![0.5f32; model.card.vocab_size as usize];
    guide.mask_logits(&mut logits);
    assert!(logits[eos as usize].is_finite() && logits[other_eos as usize].is_finite());
    assert_eq!(logits.iter().filter(|l| l.is_finite()).count(), 2, "only the EOS ids may follow a whole \"a\"");
}

#[test]
fn a_guide_resumes_after_tokens_generated_elsewhere() {
    let model = model();
    let grammars = model.grammars().grammars().unwrap();
    let constraint = Constraint::Choice(vec!["hello world".into(), "help".into()]);
    let prefix = model.tokenizer.encode("hel", false).unwrap();
    let mut resumed = grammars.guide(&constraint, &prefix).unwrap();
    let mut fresh = grammars.guide(&constraint, &[]).unwrap();
    for &token in &prefix {
        assert_eq!(fresh.consume(token), None);
    }
    assert_eq!(resumed.allowed(), fresh.allowed());
    let wrong = model.tokenizer.encode("xyz", false).unwrap();
    let error = grammars.guide(&constraint, &wrong).err().unwrap();
    assert!(error.to_string().contains("do not match"), "{error}");
}

#[test]
fn nested_models_as_pydantic_writes_them_resolve_their_local_refs() {
    let model = model();
    let schema = json!({
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["x"], "additionalProperties": false}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/Point"}, "b": {"type": "array", "items": {"$ref": "#/$defs/Point"}, "maxItems": 2}},
        "required": ["a", "b"],
        "additionalProperties": false,
    });
    for seed in 0..5 {
        let (text, ends) = generate(&model, &Constraint::JsonSchema(schema.to_string()), seed, 200);
        assert_eq!(ends, Some(FinishReason::Complete), "{text}");
        let value: Value = serde_json::from_str(&text).unwrap();
        assert!(value["a"]["x"].is_i64() && value["b"].as_array().is_some_and(|b| b.len() <= 2), "{text}");
    }
    let remote = json!({"$ref": "https://example.com/schema.json"});
    let error = model.grammars().grammars().unwrap().compile(&Constraint::JsonSchema(remote.to_string())).err();
    assert!(error.is_some(), "a remote $ref compiled");
}

#[test]
fn bad_constraints_say_what_is_wrong() {
    let grammars = model().grammars().grammars().unwrap();
    for (constraint, says) in [
        (Constraint::JsonSchema("{".into()), "not valid JSON"),
        (Constraint::JsonSchema("[1]".into()), "must be an object"),
        (Constraint::Choice(Vec::new()), "empty"),
        (Constraint::Regex("(".into()), ""),
        (Constraint::Lark("start: nowhere".into()), "nowhere"),
    ] {
        let error = grammars.compile(&constraint).err().unwrap_or_else(|| panic!("{constraint:?} compiled"));
        assert!(error.to_string().contains(says), "{constraint:?}: {error}");
    }
}

#[test]
fn tokenizers_whose_bytes_cannot_be_read_are_refused_plainly() {
    let json = json!({"decoder": {"type": "WordPiece"}, "model": {"vocab": {"a": 0}}, "added_tokens": []});
    let error = Grammars::new(&json.to_string(), model().tokenizer.shared(), &[0]).err().unwrap();
    assert!(error.to_string().contains("WordPiece"), "{error}");
}
