//! Tasks and datasets: loading, splitting and prompt formats, one file per task.
//!
//! Every task ends up as a [`Dataset`]: four disjoint splits (`weak_train`, `strong_train`, `test`,
//! optional `valid`) of [`Example`]s, drawn deterministically from the seed (METHOD.md section 1).

pub mod cosmosqa;
pub mod ethics;
pub mod jsonl;
pub mod sciq;
pub mod slurp;
pub mod stats;
pub mod table;

use crate::hash::{example_id, sha256_hex};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One SLURP-style entity: a slot type and the words that fill it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    #[serde(rename = "type")]
    pub kind: String,
    pub filler: String,
}

impl Entity {
    pub fn new(kind: &str, filler: &str) -> Entity {
        Entity {
            kind: kind.into(),
            filler: filler.into(),
        }
    }
}

/// What an example should be mapped to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Label {
    /// A class index in `0..num_classes`.
    Class { class: usize },
    /// Free text to generate (generic generation JSONL).
    Text { target: String },
    /// Slot filling (SLURP): the target text plus what the scorer needs.
    Slots {
        target: String,
        entities: Vec<Entity>,
        scenario: String,
        action: String,
        intent: String,
    },
}

impl Label {
    pub fn class(&self) -> Option<usize> {
        match self {
            Label::Class { class } => Some(*class),
            _ => None,
        }
    }

    pub fn target(&self) -> Option<&str> {
        match self {
            Label::Class { .. } => None,
            Label::Text { target } | Label::Slots { target, .. } => Some(target),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Stable id: a content hash (see [`crate::hash::example_id`]).
    pub id: String,
    /// The model input: the text to classify, or the prompt to continue.
    pub input: String,
    pub label: Label,
}

/// Requested split sizes. `None` means the task's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSizes {
    pub weak_train: Option<usize>,
    pub strong_train: Option<usize>,
    pub test: Option<usize>,
    pub valid: Option<usize>,
}

/// Sizes after defaults were applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResolvedSizes {
    pub weak_train: usize,
    pub strong_train: usize,
    pub test: usize,
    pub valid: usize,
}

impl SplitSizes {
    pub fn resolve(&self, defaults: ResolvedSizes) -> ResolvedSizes {
        ResolvedSizes {
            weak_train: self.weak_train.unwrap_or(defaults.weak_train),
            strong_train: self.strong_train.unwrap_or(defaults.strong_train),
            test: self.test.unwrap_or(defaults.test),
            valid: self.valid.unwrap_or(defaults.valid),
        }
    }
}

/// The names of the splits, in the order they are stored and printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitName {
    WeakTrain,
    StrongTrain,
    Test,
    Valid,
}

impl SplitName {
    pub const ALL: [SplitName; 4] = [
        SplitName::WeakTrain,
        SplitName::StrongTrain,
        SplitName::Test,
        SplitName::Valid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SplitName::WeakTrain => "weak_train",
            SplitName::StrongTrain => "strong_train",
            SplitName::Test => "test",
            SplitName::Valid => "valid",
        }
    }
}

/// Options of the binary multiple-choice tasks (SciQ, CosmosQA).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChoiceOptions {
    /// Both a positive and a negative example per question instead of one of the two.
    pub pairs: bool,
    /// SciQ: prepend the support paragraph (when the question has one).
    pub support: bool,
    /// End the text by asking whether the answer is correct ([`ASK_SUFFIX`]).
    pub ask: bool,
}

/// What the `ask` option appends to a multiple-choice item's text.
pub const ASK_SUFFIX: &str = "\nIs this answer correct?";

/// Which task, and with which options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskSpec {
    Sciq(ChoiceOptions),
    CosmosQa(ChoiceOptions),
    Ethics(ethics::Subset),
    Slurp,
    /// Users' classification data (JSONL, CSV, TSV or Parquet): a text and a label column.
    ClassifyJsonl {
        path: PathBuf,
        test_path: Option<PathBuf>,
        columns: jsonl::Columns,
    },
    /// Users' generation data (JSONL, CSV, TSV or Parquet): a prompt and a target column.
    GenerateJsonl {
        path: PathBuf,
        test_path: Option<PathBuf>,
        columns: jsonl::Columns,
    },
}

pub const TASK_NAMES_HELP: &str = "sciq, cosmosqa, ethics-commonsense, ethics-deontology, \
ethics-justice, ethics-virtue, ethics-utilitarianism, slurp, classify:PATH, generate:PATH (PATH: .jsonl, .csv, .tsv or .parquet)";

impl TaskSpec {
    /// Parses a task name as written on the command line or in a config.
    pub fn parse(name: &str, options: ChoiceOptions) -> Result<Self> {
        if let Some(path) = name.strip_prefix("classify:") {
            return Ok(TaskSpec::ClassifyJsonl {
                path: path.into(),
                test_path: None,
                columns: Default::default(),
            });
        }
        if let Some(path) = name.strip_prefix("generate:") {
            return Ok(TaskSpec::GenerateJsonl {
                path: path.into(),
                test_path: None,
                columns: Default::default(),
            });
        }
        if let Some(subset) = name.strip_prefix("ethics-") {
            return Ok(TaskSpec::Ethics(ethics::Subset::parse(subset)?));
        }
        match name {
            "sciq" => Ok(TaskSpec::Sciq(options)),
            "cosmosqa" => Ok(TaskSpec::CosmosQa(options)),
            "slurp" => Ok(TaskSpec::Slurp),
            other => bail!("unknown task `{other}`; expected one of: {TASK_NAMES_HELP}"),
        }
    }

    /// Whether the task's labels are texts (SLURP, generate:PATH) rather than classes.
    pub fn is_generation(&self) -> bool {
        matches!(self, TaskSpec::Slurp | TaskSpec::GenerateJsonl { .. })
    }

    pub fn name(&self) -> String {
        match self {
            TaskSpec::Sciq(_) => "sciq".into(),
            TaskSpec::CosmosQa(_) => "cosmosqa".into(),
            TaskSpec::Ethics(subset) => format!("ethics-{}", subset.as_str()),
            TaskSpec::Slurp => "slurp".into(),
            TaskSpec::ClassifyJsonl { path, .. } => format!("classify:{}", path.display()),
            TaskSpec::GenerateJsonl { path, .. } => format!("generate:{}", path.display()),
        }
    }
}

/// A task split for one seed.
#[derive(Debug, Clone, Serialize)]
pub struct Dataset {
    pub task: String,
    /// `Some(K)` for classification, `None` for generation.
    pub num_classes: Option<usize>,
    pub seed: u64,
    pub weak_train: Vec<Example>,
    pub strong_train: Vec<Example>,
    pub test: Vec<Example>,
    pub valid: Vec<Example>,
    /// How the splits were drawn, in one or two sentences, for reports.
    pub provenance: String,
    /// Users' classification files with string labels: the class names, class k = names[k]
    /// (sorted). None where labels are numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_names: Option<Vec<String>>,
}

impl Dataset {
    pub fn split(&self, name: SplitName) -> &[Example] {
        match name {
            SplitName::WeakTrain => &self.weak_train,
            SplitName::StrongTrain => &self.strong_train,
            SplitName::Test => &self.test,
            SplitName::Valid => &self.valid,
        }
    }

    /// The same examples with weak_train and strong_train re-split between each other with
    /// `seed` (test and valid unchanged): several seeds then share one pool of examples, so that
    /// their features are computed once.
    pub fn resplit(&self, seed: u64) -> Dataset {
        let mut pool: Vec<Example> = self
            .weak_train
            .iter()
            .chain(&self.strong_train)
            .cloned()
            .collect();
        Rng::derived(seed, "resplit").shuffle(&mut pool);
        let strong_train = pool.split_off(self.weak_train.len());
        Dataset {
            task: self.task.clone(),
            num_classes: self.num_classes,
            seed,
            weak_train: pool,
            strong_train,
            test: self.test.clone(),
            valid: self.valid.clone(),
            provenance: format!(
                "{}; weak_train / strong_train re-split with seed {seed} from that pool",
                self.provenance
            ),
            label_names: self.label_names.clone(),
        }
    }

    /// A hash of every example id of every split, in order: two datasets with the same hash hold
    /// the same examples in the same splits.
    pub fn data_hash(&self) -> String {
        let mut text = format!("{}\n", self.task);
        for name in SplitName::ALL {
            text.push_str(name.as_str());
            text.push('\n');
            for example in self.split(name) {
                text.push_str(&example.id);
                text.push('\n');
            }
        }
        sha256_hex(text.as_bytes())
    }
}

/// Where the bundled datasets live: `$WS2S_DATA`, else the `data/` folder of the source tree.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("WS2S_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("data"),
    }
}

/// Loads a task and draws its splits for `seed`.
pub fn load(data_dir: &Path, spec: &TaskSpec, sizes: &SplitSizes, seed: u64) -> Result<Dataset> {
    let dataset = match spec {
        TaskSpec::Sciq(options) => sciq::load(&data_dir.join("sciq"), *options, sizes, seed),
        TaskSpec::CosmosQa(options) => {
            cosmosqa::load(&data_dir.join("cosmosqa"), *options, sizes, seed)
        }
        TaskSpec::Ethics(subset) => ethics::load(&data_dir.join("ethics"), *subset, sizes, seed),
        TaskSpec::Slurp => slurp::load(&data_dir.join("slurp"), sizes, seed),
        TaskSpec::ClassifyJsonl {
            path,
            test_path,
            columns,
        } => jsonl::load_classification(path, test_path.as_deref(), columns, sizes, seed),
        TaskSpec::GenerateJsonl {
            path,
            test_path,
            columns,
        } => jsonl::load_generation(path, test_path.as_deref(), columns, sizes, seed),
    }
    .with_context(|| format!("loading task {}", spec.name()))?;
    check_disjoint(&dataset)?;
    Ok(dataset)
}

fn check_disjoint(dataset: &Dataset) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    for name in SplitName::ALL {
        for example in dataset.split(name) {
            if let Some(other) = seen.insert(example.id.as_str(), name) {
                bail!(
                    "internal error: example {} is in both {} and {}",
                    example.id,
                    other.as_str(),
                    name.as_str()
                );
            }
        }
    }
    Ok(())
}

/// Draws `n` items from a pool after a seeded shuffle. Errors when the pool is too small.
pub(crate) fn take<T>(pool: &mut Vec<T>, n: usize, what: &str, available: &str) -> Result<Vec<T>> {
    if n > pool.len() {
        bail!(
            "asked for {n} {what} examples but only {} remain ({available})",
            pool.len()
        );
    }
    let rest = pool.split_off(n);
    Ok(std::mem::replace(pool, rest))
}

/// Removes items whose key was already seen (keeps the first), so that no two examples of a task
/// share an id.
pub(crate) fn dedup_by_key<T>(items: Vec<T>, key: impl Fn(&T) -> String) -> Vec<T> {
    let mut seen = std::collections::HashSet::new();
    items
        .into_iter()
        .filter(|item| seen.insert(key(item)))
        .collect()
}

/// A multiple-choice question turned into binary "is this answer correct" examples.
pub(crate) struct ChoiceQuestion {
    /// Text shown before the answer, e.g. `Q: {question} A: `.
    pub prefix: String,
    pub correct: String,
    pub wrong: Vec<String>,
    /// Text after the answer (empty, or [`ASK_SUFFIX`]).
    pub suffix: String,
}

/// Turns questions into binary examples. Without `pairs`, a seeded half of the questions (rounded
/// down) get their correct answer (label 1) and the rest one wrong answer chosen with the seed
/// (label 0), so the classes are balanced; with `pairs`, every question gives both.
pub(crate) fn choice_examples(
    task: &str,
    questions: &[ChoiceQuestion],
    pairs: bool,
    rng: &mut Rng,
) -> Vec<Example> {
    let make = |question: &ChoiceQuestion, answer: &str, class: usize| {
        let input = format!("{}{}{}", question.prefix, answer, question.suffix);
        Example {
            id: example_id(&[task, &input, &class.to_string()]),
            input,
            label: Label::Class { class },
        }
    };
    let mut positive = vec![false; questions.len()];
    if !pairs {
        let mut order: Vec<usize> = (0..questions.len()).collect();
        rng.shuffle(&mut order);
        for &i in &order[..questions.len() / 2] {
            positive[i] = true;
        }
    }
    let mut examples = Vec::with_capacity(questions.len() * if pairs { 2 } else { 1 });
    for (question, &is_positive) in questions.iter().zip(&positive) {
        let wrong = &question.wrong[rng.below(question.wrong.len())];
        if pairs {
            examples.push(make(question, &question.correct, 1));
            examples.push(make(question, wrong, 0));
        } else if is_positive {
            examples.push(make(question, &question.correct, 1));
        } else {
            examples.push(make(question, wrong, 0));
        }
    }
    examples
}

/// Splits a pool of questions (already deduplicated) into the four splits of a binary choice
/// task: used by CosmosQA and by SciQ's training pool.
pub(crate) fn shuffled<T>(mut items: Vec<T>, seed: u64, purpose: &str) -> Vec<T> {
    Rng::derived(seed, purpose).shuffle(&mut items);
    items
}
