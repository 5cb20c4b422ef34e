//! What the commands do that is not the library's: loading what they name, printing.

use super::args::*;
use anyhow::{Context, Result};
use candle_core::Device;
use std::path::Path;
use ws2s::config::{ExperimentConfig, PrecisionSetting};
use ws2s::data::{self, SplitName};
use ws2s::eval;
use ws2s::models::decode::{generate, DecodeOptions};
use ws2s::models::params::Trainable;
use ws2s::models::{self, Model};
use ws2s::ops::Purpose;
use ws2s::runtime::DeviceSetting;

pub(crate) fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(crate) fn eval_classify(pred: &Path) -> Result<()> {
    let predictions = eval::classify::read_predictions(pred)?;
    let metrics = eval::classify::classify_metrics(&predictions)
        .with_context(|| format!("{}", pred.display()))?;
    print_json(&metrics)
}

pub(crate) fn eval_slurp(gold: &Path, pred: &Path) -> Result<()> {
    let gold_records = eval::slurp::read_records(gold)?;
    let predicted = eval::slurp::read_records(pred)?;
    let (metrics, unknown) = eval::slurp::slurp_metrics(&gold_records, &predicted);
    if !unknown.is_empty() {
        eprintln!(
            "warning: {} prediction(s) in {} have ids not in {} and were ignored (first: {})",
            unknown.len(),
            pred.display(),
            gold.display(),
            unknown[0]
        );
    }
    print_json(&metrics)
}

pub(crate) fn show(dataset: &data::Dataset, split: SplitName, n: usize, json: bool) -> Result<()> {
    let examples = dataset.split(split);
    for example in examples.iter().take(n) {
        if json {
            println!("{}", serde_json::to_string(example)?);
            continue;
        }
        let label = match &example.label {
            data::Label::Class { class } => format!("label {class}"),
            data::Label::Text { target } => format!("target {target}"),
            data::Label::Slots { target, intent, .. } => {
                format!("intent {intent}\ntarget {target}")
            }
        };
        println!(
            "--- {} [{}]\n{}\n{}\n",
            example.id,
            split.as_str(),
            example.input,
            label
        );
    }
    if !json {
        println!(
            "({} of {} examples in {})",
            n.min(examples.len()),
            examples.len(),
            split.as_str()
        );
    }
    Ok(())
}

pub(crate) fn load_model(name: &str) -> Result<Model> {
    let path = models::resolve_model(name)?;
    Model::load(&path, Trainable::Frozen, 0, &Device::Cpu)
}

pub(crate) fn model_info(name: &str, json: bool) -> Result<()> {
    let model = load_model(name)?;
    let info = serde_json::json!({
        "source": model.source.display().to_string(),
        "architecture": model.network.architecture(),
        "parameters": model.parameters,
        "layers": model.network.num_layers(),
        "hidden_size": model.network.hidden_size(),
        "vocab_size": model.network.vocab_size(),
        "decoder": model.network.is_decoder(),
        "tokenizer": model.tokenizer.as_ref().map(|t| t.description.clone()),
        "stored_dtypes": model.stored_dtypes,
        "compute_dtype": "f32",
        "config": model.config,
    });
    if json {
        return print_json(&info);
    }
    println!("source        {}", model.source.display());
    println!("architecture  {}", model.network.architecture());
    println!(
        "parameters    {} ({:.1}M)",
        model.parameters,
        model.parameters as f64 / 1e6
    );
    println!("layers        {}", model.network.num_layers());
    println!("hidden size   {}", model.network.hidden_size());
    println!("vocabulary    {}", model.network.vocab_size());
    println!(
        "tokenizer     {}",
        info["tokenizer"]
            .as_str()
            .unwrap_or("none (no tokenizer.json)")
    );
    let stored: Vec<String> = model
        .stored_dtypes
        .iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    println!("stored as     {}", stored.join(", "));
    println!("computes in   f32");
    Ok(())
}

pub(crate) fn generate_text(args: &GenerateArgs) -> Result<()> {
    if args.n_best > args.beams {
        anyhow::bail!(
            "--n-best {} asks for more outputs than --beams {} keeps; give --n-best <= --beams",
            args.n_best,
            args.beams
        );
    }
    let device = args.device.device()?;
    let precision = args.precision.resolve_on(Purpose::Decoding, &device)?;
    let model =
        Model::load_for_inference(&models::resolve_model(&args.model)?, precision, &device)?;
    let tokenizer = model.tokenizer()?;
    let prompt = tokenizer.encode(&args.prompt)?;
    let options = DecodeOptions {
        max_new_tokens: args.max_new_tokens,
        eos_ids: tokenizer.eos_ids.clone(),
        beams: args.beams,
        n_best: args.n_best,
        length_penalty: 1.0,
        early_stopping: false,
        json_stop: None,
    };
    let results = generate(&model.network, &[prompt], &options, &device)?;
    for (rank, hypothesis) in results[0].iter().enumerate() {
        let text = tokenizer.decode(&hypothesis.tokens)?;
        if results[0].len() > 1 {
            println!("#{} (score {:.4})", rank + 1, hypothesis.score);
        }
        println!("{}{}", args.prompt, text);
        if args.logprobs {
            for (token, logprob) in hypothesis.tokens.iter().zip(&hypothesis.logprobs) {
                println!(
                    "  {:>8} {:>10.4}  {:?}",
                    token,
                    logprob,
                    tokenizer.decode(&[*token])?
                );
            }
        }
    }
    Ok(())
}

pub(crate) fn print_inference(times: &ws2s::bench::InferenceTimes, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(times)?);
        return Ok(());
    }
    println!(
        "{} {} ({}): {}, median {:.3} s over {} runs, {:.1} tokens/s, CPU busy {:.0}% of {} threads (load {:.1} s)",
        times.architecture,
        times.precision,
        times.kernel,
        times.workload,
        times.median_s,
        times.runs.len(),
        times.tokens_per_s,
        100.0 * times.cpu_utilisation,
        times.threads,
        times.load_s
    );
    Ok(())
}

#[cfg(feature = "hub")]
pub(crate) fn download(repo: &str, revision: &str) -> Result<()> {
    let dir = models::hub::download(repo, revision)?;
    println!("{}", dir.display());
    Ok(())
}

#[cfg(not(feature = "hub"))]
pub(crate) fn download(_repo: &str, _revision: &str) -> Result<()> {
    anyhow::bail!(
        "this ws2s was built without hub access; rebuild with `cargo build --release --features hub`, \
         or pass a local HF folder or .gguf file"
    )
}

const DEMO_CONFIG: &str = include_str!("../../configs/demo.toml");

pub(crate) fn demo(
    out: &Path,
    precision: Option<PrecisionSetting>,
    device: Option<DeviceSetting>,
) -> Result<()> {
    let mut config = ExperimentConfig::parse(DEMO_CONFIG, Path::new("configs/demo.toml"))?;
    if let Some(p) = precision {
        config.precision = p;
    }
    if let Some(d) = device {
        config.device = d;
    }
    let missing: Vec<&str> = config
        .weak
        .iter()
        .chain(config.strong.as_ref())
        .filter(|m| models::resolve_model(&m.model).is_err())
        .map(|m| m.model.as_str())
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "the demo needs models that are not installed in {}: {}\ninstall them with:\n  scripts/fetch-models {}",
            ws2s::home::Home::from_env().models().display(),
            missing.join(", "),
            missing.join(" ")
        );
    }
    let start = std::time::Instant::now();
    let report = run_experiment(&config, Path::new("configs/demo.toml"), out)?;
    if let ws2s::experiment::Report::Classify(results) = &report {
        println!(
            "margin of the strong ceiling over the best weak model: {:.3} (mean over {} seeds); wall time {:.0} s",
            results.ceiling_margin(),
            results.seeds.len(),
            start.elapsed().as_secs_f64()
        );
    }
    println!("results: {}", out.join(report.file_name()).display());
    Ok(())
}

/// Runs an experiment and prints its table.
pub(crate) fn run_experiment(
    config: &ExperimentConfig,
    path: &Path,
    out: &Path,
) -> Result<ws2s::experiment::Report> {
    let report = ws2s::experiment::run(config, path, out, (&ws2s::home::Home::from_env(), true))?;
    println!("{}", report.markdown());
    Ok(report)
}

/// `ws2s run` (`ladder` false) or `ws2s sweep` (`ladder` true) on a config: each refuses the
/// other's kind of config, then runs it and prints where its report is.
pub(crate) fn run_config(config: &Path, out: &Path, flags: &RunFlags, ladder: bool) -> Result<()> {
    let parsed = load_config(config, (flags.precision, flags.device), &flags.task)?;
    match (parsed.sweep.is_some(), ladder) {
        (true, false) => anyhow::bail!(
            "{}: has a [sweep] section: run it with `ws2s sweep {}`",
            config.display(),
            config.display()
        ),
        (false, true) => anyhow::bail!(
            "{}: has no [sweep] section (a ladder lists its models in [[sweep.models]]; see configs/sciq-ladder.toml); run a single experiment with `ws2s run`",
            config.display()
        ),
        _ => {}
    }
    let report = run_experiment(&parsed, config, out)?;
    println!("results: {}", out.join(report.file_name()).display());
    Ok(())
}

/// A config with the command line's overrides.
pub(crate) fn load_config(
    path: &Path,
    (precision, device): (Option<PrecisionSetting>, Option<DeviceSetting>),
    task: &TaskFlags,
) -> Result<ExperimentConfig> {
    let mut parsed = ExperimentConfig::load(path)?;
    let overrides = task.overrides();
    if overrides.name.is_some()
        || [
            &overrides.text_column,
            &overrides.label_column,
            &overrides.prompt_column,
            &overrides.target_column,
        ]
        .iter()
        .any(|c| c.is_some())
    {
        parsed.override_task(&overrides, path)?;
    }
    if let Some(p) = precision {
        parsed.precision = p;
    }
    if let Some(d) = device {
        parsed.device = d;
    }
    Ok(parsed)
}
