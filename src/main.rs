//! The `ws2s` command line: a thin layer over the library. Definitions in `cli/args.rs`, the
//! commands' own code in `cli/commands.rs`; here the dispatch.

mod cli;

use anyhow::{bail, Result};
use clap::Parser;
use cli::args::*;
use cli::commands::*;
use std::process::ExitCode;
use ws2s::config::ExperimentConfig;
use ws2s::data::stats;
use ws2s::ops::{Precision, Purpose};

#[global_allocator]
static ALLOCATOR: ws2s::runtime::HugePageAlloc = ws2s::runtime::HugePageAlloc;

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Eval(EvalCommand::Classify { pred }) => eval_classify(&pred),
        Command::Eval(EvalCommand::Slurp { gold, pred }) => eval_slurp(&gold, &pred),
        Command::Data(DataCommand::Stats { task, json }) => {
            let summary = stats::dataset_stats(&task.load()?);
            if json {
                print_json(&summary)
            } else {
                print!("{}", stats::format_stats(&summary));
                Ok(())
            }
        }
        Command::Data(DataCommand::Show {
            task,
            split,
            n,
            json,
        }) => show(&task.load()?, split, n, json),
        Command::Config(ConfigCommand::Check { file, out }) => {
            let config = ExperimentConfig::load(&file)?;
            let checked = ws2s::experiment::preflight::check(&config, &file, out.as_deref())?;
            for (key, path) in &checked.models {
                eprintln!("{key}: {} (files parse)", path.display());
            }
            if let Some(d) = checked.datasets.first() {
                eprintln!(
                    "data: {} weak_train, {} strong_train, {} test, {} valid per seed ({} seeds)",
                    d.weak_train.len(),
                    d.strong_train.len(),
                    d.test.len(),
                    d.valid.len(),
                    checked.datasets.len()
                );
            }
            print_json(&config)
        }
        Command::Run {
            config,
            out,
            overrides,
        } => run_config(&config, &out, &overrides, false),
        Command::Sweep {
            config,
            out,
            overrides,
        } => run_config(&config, &out, &overrides, true),
        Command::Demo {
            out,
            precision,
            device,
        } => demo(&out, precision, device),
        Command::Study(StudyCommand::PromptPooling {
            models,
            n,
            seed,
            json,
        }) => {
            let solver = ws2s::train::convex::SolverConfig::default();
            let rows = ws2s::experiment::study::prompt_pooling(&models, n, seed, &solver, true)?;
            if let Some(path) = json {
                ws2s::io::write_atomic(&path, serde_json::to_string_pretty(&rows)?.as_bytes())?;
            }
            print!("{}", ws2s::experiment::study::markdown(&rows));
            Ok(())
        }
        Command::Study(StudyCommand::Precision {
            models,
            precisions,
            n,
            prompts,
            new_tokens,
            seed,
            json,
        }) => {
            let precisions: Vec<Precision> = if precisions.is_empty() {
                std::iter::once(Precision::Int8)
                    .chain(ws2s::ops::bf16x2::available().then_some(Precision::Bf16x2))
                    .collect()
            } else {
                precisions
                    .iter()
                    .map(|p| p.resolve_on(Purpose::Decoding, &candle_core::Device::Cpu))
                    .collect::<Result<_>>()?
            };
            let rows = ws2s::experiment::precision_study::precision_study(
                &models,
                &precisions,
                (n, prompts, new_tokens),
                seed,
                true,
            )?;
            if let Some(path) = json {
                ws2s::io::write_atomic(&path, serde_json::to_string_pretty(&rows)?.as_bytes())?;
            }
            print!("{}", ws2s::experiment::precision_study::markdown(&rows));
            Ok(())
        }
        Command::Model(ModelCommand::Info { model, json }) => model_info(&model, json),
        Command::Model(ModelCommand::Download { repo, revision }) => download(&repo, &revision),
        Command::Generate(args) => generate_text(&args),
        Command::Bench(command) => bench(command),
    }
}

/// `ws2s bench ...`: speed measurements, printed as a line (or JSON) per measurement.
fn bench(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Train {
            workload,
            warmup,
            steps,
            precision,
            device,
            json,
            turns,
        } => {
            if turns && workload == "all" {
                bail!("bench train --turns times one workload: name it with --workload");
            }
            let device = device.device()?;
            // Training computes in f32 on the CPU (the packed precisions are for inference only).
            let precision = match precision.resolve_on(Purpose::Decoding, &device)? {
                p if p.packs() => Precision::F32,
                p => p,
            };
            let names: Vec<&str> = if workload == "all" {
                ws2s::bench::WORKLOADS.to_vec()
            } else {
                vec![workload.as_str()]
            };
            for name in names {
                let plan = ws2s::bench::Runs {
                    warmup,
                    repeats: steps,
                    turns,
                };
                let times = ws2s::bench::bench_train(name, plan, precision, &device)?;
                if json {
                    println!("{}", serde_json::to_string(&times)?);
                } else {
                    println!(
                        "{:<12} batch {}x{}  forward {:>8.1} ms  backward {:>8.1} ms  optimizer {:>7.1} ms  step {:>8.1} ms  ({} trainable, {} threads)",
                        times.workload, times.batch, times.seq_len, times.forward_ms, times.backward_ms,
                        times.optimizer_ms, times.step_ms, times.trainable_parameters, times.threads
                    );
                }
            }
            Ok(())
        }
        BenchCommand::Special { elements, repeats } => {
            for (name, ms) in ws2s::bench::bench_special(elements, repeats)? {
                println!("{name:<11} lgamma + digamma, forward + backward, {elements} values: {ms:>8.1} ms");
            }
            Ok(())
        }
        BenchCommand::Forward {
            model,
            batch,
            seq_len,
            precision,
            run,
        } => {
            let device = run.device.device()?;
            let times = ws2s::bench::bench_forward(
                &model,
                (batch, seq_len, run.plan()),
                precision.resolve_on(Purpose::Features, &device)?,
                &device,
            )?;
            print_inference(&times, run.json)
        }
        BenchCommand::Decode {
            model,
            prompts,
            prompt_len,
            beams,
            new_tokens,
            precision,
            run,
        } => {
            let device = run.device.device()?;
            let times = ws2s::bench::bench_decode(
                &model,
                (prompts, prompt_len, beams, new_tokens, run.plan()),
                precision.resolve_on(Purpose::Decoding, &device)?,
                &device,
            )?;
            print_inference(&times, run.json)
        }
    }
}

fn main() -> ExitCode {
    ws2s::runtime::tune_allocator();
    ws2s::runtime::tune_threads();
    let cli = Cli::parse();
    if let Err(err) = ws2s::ops::check_env() {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    match ws2s::runtime::on_worker(|| run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
