//! `ws2s bench train`: time per training step (forward, backward, optimiser) of four workloads,
//! to compare with PyTorch on the same machine (`bench/compare.sh`):
//! (a) all-MiniLM-L6-v2 full fine-tuning and (b) LoRA r = 8 on query/value, batch 16 x 128;
//! (c) a Qwen2.5-0.5B-shaped decoder (random weights) full fine-tuning and (d) LoRA r = 8 on
//! q_proj/v_proj, batch 2 x 128. Each step: forward, a classification head on the pooled hidden
//! states, cross-entropy, backward, AdamW.

use crate::losses;
use crate::models::heads::{pool, ClassificationHead, Pooling};
use crate::models::params::{LoraConfig, Params, Trainable};
use crate::models::{network_from_config, resolve_model, Model, Network};
use crate::rng::Rng;
use crate::train::optimizer::{AdamW, AdamWConfig};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

/// The four workloads, by name.
pub const WORKLOADS: [&str; 4] = ["minilm-full", "minilm-lora", "qwen-full", "qwen-lora"];

const MINILM_CONFIG: &str = r#"{"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6,
 "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512,
 "type_vocab_size": 2, "vocab_size": 30522, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}"#;

const QWEN_05B_CONFIG: &str = r#"{"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
 "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
 "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true}"#;

#[derive(Debug, Clone, Serialize)]
pub struct StepTimes {
    pub workload: String,
    pub batch: usize,
    pub seq_len: usize,
    pub trainable_parameters: usize,
    /// Medians over the timed steps, in milliseconds.
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    pub step_ms: f64,
    /// Each timed step's time in order, in milliseconds.
    pub step_runs_ms: Vec<f64>,
    pub steps: usize,
    pub threads: usize,
    /// "cpu" or "cuda", and the frozen weights' type.
    pub device: String,
    pub precision: String,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct Workload {
    network: Network,
    vars: BTreeMap<String, Var>,
    head: ClassificationHead,
    pooling: Pooling,
    batch: usize,
    seq_len: usize,
}

fn build(name: &str, device: &Device, dtype: candle_core::DType) -> Result<Workload> {
    let device = device.clone();
    let (is_minilm, lora) = match name {
        "minilm-full" => (true, false),
        "minilm-lora" => (true, true),
        "qwen-full" | "qwen1.5b-full" => (false, false),
        "qwen-lora" | "qwen1.5b-lora" => (false, true),
        other => bail!(
            "unknown workload `{other}`; expected one of {}, or qwen1.5b-full, qwen1.5b-lora (the 1.5B shape, for GPUs)",
            WORKLOADS.join(", ")
        ),
    };
    let targets: Vec<String> = if is_minilm {
        vec!["query".into(), "value".into()]
    } else {
        vec!["q_proj".into(), "v_proj".into()]
    };
    let trainable = if lora {
        Trainable::Lora(LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets,
        })
    } else {
        Trainable::All
    };
    // MiniLM: the real checkpoint when installed, else random weights of its shape.
    let (network, mut vars) = match (is_minilm, resolve_model("all-minilm-l6-v2")) {
        (true, Ok(path)) => {
            let model = Model::load_as(&path, trainable, 0, &device, dtype)?;
            (model.network, model.vars)
        }
        _ => {
            let config: serde_json::Value = serde_json::from_str(if is_minilm {
                MINILM_CONFIG
            } else if name.starts_with("qwen1.5b") {
                QWEN_15B_CONFIG
            } else {
                QWEN_05B_CONFIG
            })?;
            let mut params = Params::random(trainable, 0, 0.02, &device).with_frozen_dtype(dtype);
            let network = network_from_config(&config, Path::new(name), &mut params)?;
            (network, params.into_vars())
        }
    };
    let mut head_params = Params::new(HashMap::new(), Trainable::Frozen, 1, &device, "head");
    let head = ClassificationHead::new(&mut head_params, network.hidden_size(), 2)?;
    vars.extend(head_params.into_vars());
    let (batch, pooling) = if is_minilm {
        (16, Pooling::Mean)
    } else {
        (2, Pooling::LastToken)
    };
    Ok(Workload {
        network,
        vars,
        head,
        pooling,
        batch,
        seq_len: 128,
    })
}

/// Runs `plan.warmup` untimed and `plan.repeats` timed training steps of a workload (with
/// `plan.turns`, each timed step on cue, as [`Runs`] says).
/// `precision` is the type of the frozen base (LoRA); trained weights are f32 whatever it says.
pub fn bench_train(
    name: &str,
    plan: Runs,
    precision: crate::ops::Precision,
    device: &Device,
) -> Result<StepTimes> {
    let w = build(name, device, precision.dtype())?;
    let device = device.clone();
    let mut rng = Rng::new(0);
    let vocab = w.network.vocab_size();
    let ids: Vec<u32> = (0..w.batch * w.seq_len)
        .map(|_| rng.below(vocab) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (w.batch, w.seq_len), &device)?;
    let mask = vec![vec![1u32; w.seq_len]; w.batch];
    let labels: Vec<f32> = (0..w.batch)
        .flat_map(|i| if i % 2 == 0 { [1.0, 0.0] } else { [0.0, 1.0] })
        .collect();
    let labels = Tensor::from_vec(labels, (w.batch, 2), &device)?;
    let mut optimizer = AdamW::new(&w.vars, AdamWConfig::default());
    let (mut forward, mut backward, mut update) = (Vec::new(), Vec::new(), Vec::new());
    let warmup = plan.warmup;
    let mut cues = None;
    for step in 0..warmup + plan.repeats {
        if step == warmup {
            cues = Some(Cues::start(plan));
        }
        if let Some(cues) = cues.as_mut() {
            if !cues.wait()? {
                break;
            }
        }
        let t0 = Instant::now();
        let hidden = w.network.hidden(&ids, &mask, &mut w.network.new_cache())?;
        let logits = w.head.forward(&pool(&hidden, &mask, w.pooling)?)?;
        let loss = losses::xent(&logits, &labels)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        let mut sum = optimizer.new_grad_sum();
        optimizer.accumulate(&mut sum, &grads)?;
        optimizer.update(&sum, 1e-5, Some(1.0))?;
        // A GPU runs asynchronously: the step ends when its last kernel has.
        device.synchronize()?;
        let t3 = Instant::now();
        if step >= warmup {
            forward.push((t1 - t0).as_secs_f64() * 1e3);
            backward.push((t2 - t1).as_secs_f64() * 1e3);
            update.push((t3 - t2).as_secs_f64() * 1e3);
            if let Some(cues) = &cues {
                cues.report((t3 - t0).as_secs_f64());
            }
        }
    }
    if forward.is_empty() {
        bail!("no timed step: the input ended before the first turn");
    }
    let totals: Vec<f64> = (0..forward.len())
        .map(|i| forward[i] + backward[i] + update[i])
        .collect();
    Ok(StepTimes {
        workload: name.to_string(),
        batch: w.batch,
        seq_len: w.seq_len,
        trainable_parameters: w.vars.values().map(|v| v.as_tensor().elem_count()).sum(),
        forward_ms: median(&mut forward),
        backward_ms: median(&mut backward),
        optimizer_ms: median(&mut update),
        step_ms: median(&mut totals.clone()),
        steps: totals.len(),
        step_runs_ms: totals,
        threads: rayon::current_num_threads(),
        device: if device.is_cpu() { "cpu" } else { "cuda" }.to_string(),
        precision: precision.name().to_string(),
    })
}

/// Milliseconds (median over `repeats`, after one warm-up) of lgamma + digamma, forward and
/// backward, on `elements` values of Dirichlet parameters (1 + exp(z)), fused and decomposed:
/// what token EDL computes over a batch of vocabulary rows.
pub fn bench_special(elements: usize, repeats: usize) -> Result<Vec<(String, f64)>> {
    use crate::losses::special::{digamma, digamma_decomposed, lgamma, lgamma_decomposed};
    type F = fn(&Tensor) -> candle_core::Result<Tensor>;
    let mut rng = Rng::new(0);
    let values: Vec<f32> = (0..elements)
        .map(|_| 1.0 + ((rng.next_f64() * 8.0 - 4.0) as f32).exp())
        .collect();
    let x = Var::from_tensor(&Tensor::from_vec(values, elements, &Device::Cpu)?)?;
    let mut out = Vec::new();
    for (name, lg, dg) in [
        ("fused", lgamma as F, digamma as F),
        (
            "decomposed",
            lgamma_decomposed as F,
            digamma_decomposed as F,
        ),
    ] {
        let mut times = Vec::new();
        for i in 0..=repeats {
            let start = Instant::now();
            let y = (lg(x.as_tensor())?.sum_all()? + dg(x.as_tensor())?.sum_all()?)?;
            y.backward()?;
            if i > 0 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        out.push((name.to_string(), median(&mut times)));
    }
    Ok(out)
}

/// Process CPU time (user + system) in seconds, all threads.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// One inference benchmark's result: median wall time of the timed runs, tokens per second,
/// and how busy the threads were (CPU seconds / (wall seconds x threads), over the timed runs).
#[derive(Debug, Clone, Serialize)]
pub struct InferenceTimes {
    pub model: String,
    pub architecture: String,
    pub precision: String,
    pub kernel: String,
    pub workload: String,
    pub tokens: usize,
    pub median_s: f64,
    pub runs: Vec<f64>,
    pub tokens_per_s: f64,
    pub cpu_utilisation: f64,
    pub threads: usize,
    pub load_s: f64,
    /// Untimed runs before `runs`.
    pub warmup: usize,
}

impl InferenceTimes {
    fn new(
        name: &str,
        model: &Model,
        precision: crate::ops::Precision,
        (workload, tokens): (String, usize),
        (runs, median_s, cpu_utilisation, load_s, warmup): (Vec<f64>, f64, f64, f64, usize),
        device: &Device,
    ) -> InferenceTimes {
        // On a GPU the frozen weights are bf16 and candle's CUDA kernels run.
        let (precision, kernel) = if device.is_cpu() {
            (precision.name(), precision.kernel())
        } else {
            (precision.name(), "cuda")
        };
        InferenceTimes {
            model: name.to_string(),
            architecture: model.network.architecture().to_string(),
            precision: precision.to_string(),
            kernel: kernel.to_string(),
            workload,
            tokens,
            median_s,
            runs,
            tokens_per_s: tokens as f64 / median_s,
            cpu_utilisation,
            threads: rayon::current_num_threads(),
            load_s,
            // As many as ran: at least one (time_runs).
            warmup: warmup.max(1),
        }
    }
}

/// How an inference benchmark times its workload: `warmup` untimed runs (at least one), then
/// `repeats` timed ones. With `turns`, each timed run waits for a line on standard input first
/// and reports its time on standard error right after (`turn <seconds>`; `ready` once the
/// warm-up is done); the timed runs end early at the end of the input. A driver that holds
/// several such processes (bench/compare-forward.sh: ws2s and PyTorch) then lets them take
/// turns run by run, so that each run of one side has a run of the other a few seconds away,
/// under the same outside load.
#[derive(Clone, Copy, Debug)]
pub struct Runs {
    pub warmup: usize,
    pub repeats: usize,
    pub turns: bool,
}

/// The cue protocol of [`Runs::turns`] on this process's standard input and error (None
/// without turns): `ready` once, a line read before each timed run, `turn SECONDS` after it.
struct Cues(Option<std::io::StdinLock<'static>>);

impl Cues {
    /// After the warm-up: `ready` where the plan takes turns.
    fn start(plan: Runs) -> Cues {
        let cues = Cues(plan.turns.then(|| std::io::stdin().lock()));
        if cues.0.is_some() {
            eprintln!("ready");
        }
        cues
    }

    /// Before a timed run: whether to run it (false at the end of the input).
    fn wait(&mut self) -> Result<bool> {
        use std::io::BufRead;
        match self.0.as_mut() {
            Some(input) => Ok(input.read_line(&mut String::new())? > 0),
            None => Ok(true),
        }
    }

    /// After a timed run of `seconds`.
    fn report(&self, seconds: f64) {
        if self.0.is_some() {
            eprintln!("turn {seconds:.6}");
        }
    }
}

/// `run` as `plan` says: (times, median, share of the threads' CPU time busy during the timed
/// runs).
fn time_runs(plan: Runs, mut run: impl FnMut() -> Result<()>) -> Result<(Vec<f64>, f64, f64)> {
    for _ in 0..plan.warmup.max(1) {
        run()?;
    }
    let mut cues = Cues::start(plan);
    let mut busy_s = 0.0;
    let mut times = Vec::new();
    for _ in 0..plan.repeats.max(1) {
        if !cues.wait()? {
            break;
        }
        let cpu0 = cpu_seconds();
        let start = Instant::now();
        run()?;
        let t = start.elapsed().as_secs_f64();
        busy_s += cpu_seconds() - cpu0;
        times.push(t);
        cues.report(t);
    }
    if times.is_empty() {
        bail!("no timed run: the input ended before the first turn");
    }
    // Busy over the timed runs alone (with turns, the waits between them are not counted).
    let busy = busy_s / times.iter().sum::<f64>();
    let med = median(&mut times.clone());
    Ok((times, med, busy / rayon::current_num_threads() as f64))
}

/// Random weights of a real model's shape, for benchmarks where no checkpoint can go (a GPU
/// machine): `random:qwen2.5-0.5b`, `random:qwen2.5-1.5b`.
pub const RANDOM_SHAPES: [(&str, &str); 2] = [
    ("random:qwen2.5-0.5b", QWEN_05B_CONFIG),
    ("random:qwen2.5-1.5b", QWEN_15B_CONFIG),
];

const QWEN_15B_CONFIG: &str = r#"{"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
 "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
 "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true}"#;

fn load_for_inference(
    name: &str,
    precision: crate::ops::Precision,
    device: &Device,
) -> Result<(Model, f64)> {
    let start = Instant::now();
    let model = match RANDOM_SHAPES.iter().find(|(n, _)| *n == name) {
        Some((_, config)) => {
            let config: serde_json::Value = serde_json::from_str(config)?;
            let mut params = Params::random(Trainable::Frozen, 0, 0.02, device)
                .with_frozen_dtype(precision.dtype());
            let mut network = network_from_config(&config, Path::new(name), &mut params)?;
            network.set_precision(precision)?;
            Model {
                network,
                vars: BTreeMap::new(),
                tokenizer: None,
                source: name.into(),
                config,
                parameters: 0,
                stored_dtypes: BTreeMap::new(),
            }
        }
        // Packed for `precision` as it loads (a second set_precision would pack the head again).
        None => Model::load_for_inference(&resolve_model(name)?, precision, device)?,
    };
    Ok((model, start.elapsed().as_secs_f64()))
}

/// `ws2s bench forward`: final hidden states (no LM head) of `batch` sequences of `seq_len`
/// random token ids, with nothing cached.
pub fn bench_forward(
    name: &str,
    (batch, seq_len, plan): (usize, usize, Runs),
    precision: crate::ops::Precision,
    device: &Device,
) -> Result<InferenceTimes> {
    let (model, load_s) = load_for_inference(name, precision, device)?;
    let vocab = model.network.vocab_size() as u64;
    let mut rng = Rng::new(0);
    let ids: Vec<u32> = (0..batch * seq_len)
        .map(|_| (rng.next_u64() % vocab) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq_len), device)?;
    let mask = vec![vec![1u32; seq_len]; batch];
    let (runs, median_s, cpu_utilisation) = time_runs(plan, || {
        let hidden = model.network.hidden_parallel(&ids, &mask)?;
        hidden
            .sum_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        Ok(())
    })?;
    let workload = format!("forward {batch}x{seq_len}");
    let timed = (runs, median_s, cpu_utilisation, load_s, plan.warmup);
    Ok(InferenceTimes::new(
        name,
        &model,
        precision,
        (workload, batch * seq_len),
        timed,
        device,
    ))
}

/// `ws2s bench decode`: beam search (KV cache) from `prompts` prompts of `prompt_len` random
/// token ids, exactly `new_tokens` new tokens each (no end-of-sequence token).
pub fn bench_decode(
    name: &str,
    (prompts, prompt_len, beams, new_tokens, plan): (usize, usize, usize, usize, Runs),
    precision: crate::ops::Precision,
    device: &Device,
) -> Result<InferenceTimes> {
    use crate::models::decode::{generate, DecodeOptions};
    let (model, load_s) = load_for_inference(name, precision, device)?;
    if !model.network.is_decoder() {
        bail!("{name}: decoding needs a decoder model");
    }
    let vocab = model.network.vocab_size() as u64;
    let mut rng = Rng::new(1);
    let ids: Vec<Vec<u32>> = (0..prompts)
        .map(|_| {
            (0..prompt_len)
                .map(|_| (rng.next_u64() % vocab) as u32)
                .collect()
        })
        .collect();
    let options = DecodeOptions {
        max_new_tokens: new_tokens,
        beams,
        n_best: 1,
        ..DecodeOptions::default()
    };
    let (runs, median_s, cpu_utilisation) = time_runs(plan, || {
        let out = generate(&model.network, &ids, &options, device)?;
        if out
            .iter()
            .any(|h| h.first().is_none_or(|h| h.tokens.len() != new_tokens))
        {
            bail!("decode bench: a hypothesis of the wrong length");
        }
        Ok(())
    })?;
    let workload = format!("decode {prompts}x{prompt_len} beam {beams} +{new_tokens}");
    let timed = (runs, median_s, cpu_utilisation, load_s, plan.warmup);
    let mut times = InferenceTimes::new(
        name,
        &model,
        precision,
        (workload, prompts * new_tokens),
        timed,
        device,
    );
    if device.is_cpu() && model.network.screens_head() {
        // The head's next tokens screened in int8 (ops::head): how often a row was computed
        // whole.
        let (screened, whole) = crate::ops::head::counts();
        times.kernel.push_str(&format!(
            "+head-screen-{} ({:.1}% of rows whole)",
            crate::ops::int8::Kernel::detected().name(),
            100.0 * whole as f64 / screened.max(1) as f64
        ));
    }
    Ok(times)
}
