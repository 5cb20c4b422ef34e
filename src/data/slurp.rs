//! SLURP (Bastianelli et al. 2020) as generation: slot filling from the utterance text.
//!
//! Input: the `sentence` field. Target: the slots as a JSON object `{"type": "filler", ...}` with
//! the types in order of first appearance and several fillers of one type joined by `" & "`;
//! `{}` when the utterance has no entity. The fillers are built exactly as the official SLURP
//! scorer builds its gold entities: the `surface` of the tokens in each entity's `span`, lowercased,
//! joined by single spaces (so `[person : jessica's]` gives `jessica 's`). The gold entity list and
//! the scenario / action / intent are kept with each example for scoring.
//!
//! Splits: the SLURP train split is not available here, so the `devel` (2,033) and `test` (2,974)
//! files are pooled (5,007 utterances) and re-split with the seed into weak_train 2,000,
//! strong_train 2,000 and test 1,007 (valid 0 by default). Reports say so.

use super::{
    dedup_by_key, shuffled, take, Dataset, Entity, Example, Label, ResolvedSizes, SplitSizes,
};
use crate::error::InputError;
use crate::hash::example_id;
use crate::io::read_jsonl_map;
use anyhow::Result;
use serde::Deserialize;
use std::path::Path;

pub const DEFAULT_SIZES: ResolvedSizes = ResolvedSizes {
    weak_train: 2000,
    strong_train: 2000,
    test: 1007,
    valid: 0,
};

/// The separator between several fillers of one slot type in the target text.
pub const FILLER_SEPARATOR: &str = " & ";

#[derive(Debug, Deserialize)]
struct Token {
    surface: String,
}

#[derive(Debug, Deserialize)]
struct RawEntity {
    span: Vec<usize>,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Deserialize)]
struct Record {
    slurp_id: serde_json::Value,
    sentence: String,
    scenario: String,
    action: String,
    intent: String,
    tokens: Vec<Token>,
    entities: Vec<RawEntity>,
}

const RECORD_SHAPE: &str =
    "{\"slurp_id\", \"sentence\", \"scenario\", \"action\", \"intent\", \"tokens\": [{\"surface\"}], \"entities\": [{\"span\", \"type\"}]}";

fn to_example(path: &Path, line: usize, record: Record) -> Result<Example, InputError> {
    let mut entities = Vec::with_capacity(record.entities.len());
    for entity in &record.entities {
        let words: Result<Vec<String>, InputError> = entity
            .span
            .iter()
            .map(|&i| {
                record
                    .tokens
                    .get(i)
                    .map(|t| t.surface.to_lowercase())
                    .ok_or_else(|| {
                        InputError::at_line(
                            path,
                            line,
                            format!(
                                "entity span index {i} is outside the {} tokens",
                                record.tokens.len()
                            ),
                        )
                    })
            })
            .collect();
        entities.push(Entity {
            kind: entity.kind.clone(),
            filler: words?.join(" "),
        });
    }
    let slurp_id = match &record.slurp_id {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Ok(Example {
        id: example_id(&["slurp", &slurp_id, &record.sentence]),
        input: record.sentence.trim().to_string(),
        label: Label::Slots {
            target: slots_to_json(&entities),
            entities,
            scenario: record.scenario,
            action: record.action,
            intent: record.intent,
        },
    })
}

/// Reads one SLURP release file (one JSON object per line) into examples.
pub fn read_file(path: &Path) -> Result<Vec<Example>, InputError> {
    read_jsonl_map(path, RECORD_SHAPE, |line, record: Record| {
        to_example(path, line, record)
    })
}

/// The target text of a slot list: `{"type": "filler & filler", ...}` in order of first appearance.
pub fn slots_to_json(entities: &[Entity]) -> String {
    let mut grouped: Vec<(&str, Vec<&str>)> = Vec::new();
    for entity in entities {
        match grouped.iter_mut().find(|(kind, _)| *kind == entity.kind) {
            Some((_, fillers)) => fillers.push(&entity.filler),
            None => grouped.push((&entity.kind, vec![&entity.filler])),
        }
    }
    let body: Vec<String> = grouped
        .iter()
        .map(|(kind, fillers)| {
            let key = serde_json::to_string(kind).expect("string");
            let value = serde_json::to_string(&fillers.join(FILLER_SEPARATOR)).expect("string");
            format!("{key}: {value}")
        })
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// Parses a generated slot JSON back into entities (`None` when it is not a JSON object of strings).
/// Values joined by `" & "` become several entities of that type.
pub fn json_to_slots(text: &str) -> Option<Vec<Entity>> {
    let value: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
    let object = value.as_object()?;
    let mut entities = Vec::new();
    for (kind, value) in object {
        for filler in value.as_str()?.split(FILLER_SEPARATOR) {
            entities.push(Entity {
                kind: kind.clone(),
                filler: filler.to_string(),
            });
        }
    }
    Some(entities)
}

pub fn load(dir: &Path, sizes: &SplitSizes, seed: u64) -> Result<Dataset> {
    let sizes = sizes.resolve(DEFAULT_SIZES);
    let mut pool = read_file(&dir.join("devel.jsonl"))?;
    pool.extend(read_file(&dir.join("test.jsonl"))?);
    let total = pool.len();
    let pool = dedup_by_key(pool, |e| e.id.clone());
    let mut pool = shuffled(pool, seed, "slurp/pool");
    let available = format!("SLURP devel + test hold {total} utterances");
    let weak_train = take(&mut pool, sizes.weak_train, "weak_train", &available)?;
    let strong_train = take(&mut pool, sizes.strong_train, "strong_train", &available)?;
    let test = take(&mut pool, sizes.test, "test", &available)?;
    let valid = take(&mut pool, sizes.valid, "valid", &available)?;
    Ok(Dataset {
        task: "slurp".into(),
        num_classes: None,
        seed,
        weak_train,
        strong_train,
        test,
        valid,
        provenance: format!(
            "SLURP devel + test ({total} utterances; the train split is not available here) re-split with seed {seed}"
        ),
        label_names: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{default_data_dir, load as load_task, TaskSpec};
    use crate::io::read_jsonl;

    fn entity(kind: &str, filler: &str) -> Entity {
        Entity::new(kind, filler)
    }

    #[test]
    fn target_json_groups_types_in_order_and_round_trips() {
        let entities = vec![
            entity("date", "tuesday"),
            entity("person", "jessica 's"),
            entity("date", "friday"),
        ];
        let json = slots_to_json(&entities);
        assert_eq!(
            json,
            r#"{"date": "tuesday & friday", "person": "jessica 's"}"#
        );
        let mut back = json_to_slots(&json).unwrap();
        back.sort_by(|a, b| (&a.kind, &a.filler).cmp(&(&b.kind, &b.filler)));
        let mut expected = entities.clone();
        expected.sort_by(|a, b| (&a.kind, &a.filler).cmp(&(&b.kind, &b.filler)));
        assert_eq!(back, expected);
        assert_eq!(slots_to_json(&[]), "{}");
        assert_eq!(json_to_slots("{}"), Some(vec![]));
        assert_eq!(json_to_slots("{\"date\": "), None);
        assert_eq!(json_to_slots("[1]"), None);
        assert_eq!(json_to_slots("{\"a\": 1}"), None);
        assert_eq!(
            json_to_slots("{\"q\": \"\\\"x\\\"\"}"),
            Some(vec![entity("q", "\"x\"")])
        );
    }

    #[derive(serde::Deserialize)]
    struct Gold {
        id: String,
        entities: Vec<Entity>,
    }

    #[test]
    fn gold_entities_match_the_official_scorer_loader() {
        // Fixture made by running the official SLURP loader on five real utterances.
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/slurp");
        let examples = read_file(&fixtures.join("release_sample.jsonl")).unwrap();
        let gold: Vec<Gold> =
            read_jsonl(&fixtures.join("release_sample_expected_gold.jsonl"), "gold").unwrap();
        assert_eq!(examples.len(), gold.len());
        for (example, gold) in examples.iter().zip(&gold) {
            match &example.label {
                Label::Slots { entities, .. } => {
                    assert_eq!(entities, &gold.entities, "{}", gold.id)
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn default_resplit_sizes_and_targets() {
        let data = load_task(
            &default_data_dir(),
            &TaskSpec::Slurp,
            &SplitSizes::default(),
            0,
        )
        .unwrap();
        assert_eq!(
            (
                data.weak_train.len(),
                data.strong_train.len(),
                data.test.len()
            ),
            (2000, 2000, 1007)
        );
        let empty = data
            .test
            .iter()
            .filter(|e| e.label.target() == Some("{}"))
            .count();
        assert!(empty > 0 && empty < data.test.len());
        for example in &data.test {
            let Label::Slots {
                target, entities, ..
            } = &example.label
            else {
                panic!()
            };
            let mut parsed = json_to_slots(target).unwrap();
            let mut entities = entities.clone();
            parsed.sort_by(|a, b| (&a.kind, &a.filler).cmp(&(&b.kind, &b.filler)));
            entities.sort_by(|a, b| (&a.kind, &a.filler).cmp(&(&b.kind, &b.filler)));
            assert_eq!(parsed, entities, "{target}");
        }
    }
}
