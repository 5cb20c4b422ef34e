//! CosmosQA (Huang et al. 2019) as binary classification: "is this answer correct?".
//!
//! Text format: `Context: {context}\nQ: {question} A: {answer}`. Per question either the correct
//! answer (label 1) or one of the three wrong ones chosen with the seed (label 0), balanced per
//! split; with `pairs`, both. Only the official validation file (2,985 questions) is public here, so
//! all splits are drawn from it with the seed (2,603 distinct context + question
//! pairs after keeping the first of each repeated question; default 1,000 / 1,000 / 603 / 0).

use super::{
    choice_examples, dedup_by_key, shuffled, take, ChoiceOptions, ChoiceQuestion, Dataset,
    ResolvedSizes, SplitSizes,
};
use crate::error::InputError;
use crate::io::read_text;
use crate::rng::Rng;
use anyhow::Result;
use std::path::Path;

pub const DEFAULT_SIZES: ResolvedSizes = ResolvedSizes {
    weak_train: 1000,
    strong_train: 1000,
    test: 603,
    valid: 0,
};

fn read_questions(path: &Path, ask: bool) -> Result<Vec<ChoiceQuestion>> {
    let text = read_text(path)?;
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let expected = "columns id,context,question,answer0,answer1,answer2,answer3,label";
    let headers = reader
        .headers()
        .map_err(|e| {
            InputError::at_line(path, 1, format!("expected a header with {expected}: {e}"))
        })?
        .clone();
    let column = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            InputError::at_line(
                path,
                1,
                format!("missing column `{name}`; expected {expected}"),
            )
        })
    };
    let (context, question, label) = (column("context")?, column("question")?, column("label")?);
    let answers = [
        column("answer0")?,
        column("answer1")?,
        column("answer2")?,
        column("answer3")?,
    ];
    let mut questions = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
            InputError::at_line(path, line, format!("malformed CSV row: {e}"))
        })?;
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        let correct: usize = record[label]
            .trim()
            .parse()
            .ok()
            .filter(|&l: &usize| l < 4)
            .ok_or_else(|| {
                InputError::at_line(path, line, format!("label `{}` is not 0-3", &record[label]))
            })?;
        let texts: Vec<String> = answers
            .iter()
            .map(|&c| record[c].trim().to_string())
            .collect();
        questions.push(ChoiceQuestion {
            prefix: format!(
                "Context: {}\nQ: {} A: ",
                record[context].trim(),
                record[question].trim()
            ),
            correct: texts[correct].clone(),
            wrong: texts
                .iter()
                .enumerate()
                .filter(|(i, t)| *i != correct && !t.is_empty())
                .map(|(_, t)| t.clone())
                .collect(),
            suffix: if ask {
                super::ASK_SUFFIX.into()
            } else {
                String::new()
            },
        });
    }
    Ok(questions)
}

pub fn load(dir: &Path, options: ChoiceOptions, sizes: &SplitSizes, seed: u64) -> Result<Dataset> {
    let sizes = sizes.resolve(DEFAULT_SIZES);
    let questions = read_questions(&dir.join("valid.csv"), options.ask)?;
    let total = questions.len();
    let questions = dedup_by_key(questions, |q| q.prefix.clone());
    let mut pool = shuffled(questions, seed, "cosmosqa/pool");
    let available = format!("CosmosQA valid.csv has {total} questions");
    let mut split = |n: usize, name: &str| -> Result<Vec<crate::data::Example>> {
        let questions = take(&mut pool, n, name, &available)?;
        let mut rng = Rng::derived(seed, &format!("cosmosqa/labels/{name}"));
        Ok(choice_examples(
            "cosmosqa",
            &questions,
            options.pairs,
            &mut rng,
        ))
    };
    let weak_train = split(sizes.weak_train, "weak_train")?;
    let strong_train = split(sizes.strong_train, "strong_train")?;
    let test = split(sizes.test, "test")?;
    let valid = split(sizes.valid, "valid")?;
    Ok(Dataset {
        task: "cosmosqa".into(),
        num_classes: Some(2),
        seed,
        weak_train,
        strong_train,
        test,
        valid,
        provenance: format!(
            "CosmosQA official validation file (the only public split here), re-split with seed {seed}"
        ),
        label_names: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{default_data_dir, load as load_task, Label, TaskSpec};

    #[test]
    fn cosmosqa_default_splits_are_balanced_and_formatted() {
        let spec = TaskSpec::parse("cosmosqa", ChoiceOptions::default()).unwrap();
        let data = load_task(&default_data_dir(), &spec, &SplitSizes::default(), 0).unwrap();
        assert_eq!(
            (
                data.weak_train.len(),
                data.strong_train.len(),
                data.test.len()
            ),
            (1000, 1000, 603)
        );
        let positives = data
            .test
            .iter()
            .filter(|e| e.label == Label::Class { class: 1 })
            .count();
        assert_eq!(positives, 301);
        assert!(data.test[0].input.starts_with("Context: "));
        assert!(data.test[0].input.contains("\nQ: "));
    }
}
