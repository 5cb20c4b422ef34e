//! A run's training log: `train_log.jsonl` (one line per step of every training) and one
//! loss-curve plot per stage (`loss-{stage}.svg` / `.png`), linked from results.md.

use crate::report::plot::{line_chart, svg_to_png, Series, PALETTE};
use crate::train::log::LogLine;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;

/// The loss curves of one stage: one line per training (model, method, seed), coloured by
/// model (weak and ceiling stages) or by method family (students).
pub fn stage_plot(stage: &str, lines: &[&LogLine]) -> String {
    // (model, method, seed) -> (step, loss)
    type Training = (String, Option<String>, u64);
    let mut trainings: BTreeMap<Training, Vec<(f64, f64)>> = BTreeMap::new();
    for l in lines {
        trainings
            .entry((l.model.clone(), l.method.clone(), l.seed))
            .or_default()
            .push((l.step.step as f64, l.step.loss));
    }
    let mut colors: Vec<String> = Vec::new();
    let series: Vec<Series> = trainings
        .into_iter()
        .map(|((model, method, _seed), points)| {
            // Students by method family (xent, logconf, ...: the teachers share a colour).
            let label = method.map_or(model, |m| {
                m.split_once('[')
                    .map_or(m.clone(), |(family, _)| family.to_string())
            });
            let k = colors.iter().position(|c| *c == label).unwrap_or_else(|| {
                colors.push(label.clone());
                colors.len() - 1
            });
            Series {
                label,
                points,
                color: PALETTE[k % PALETTE.len()],
                dashed: false,
                markers: false,
            }
        })
        .collect();
    let probe = lines.iter().all(|l| l.step.lr.is_none());
    let (x_label, y_label) = if probe {
        (
            "L-BFGS iteration (the probe's refit)",
            "regularised objective",
        )
    } else {
        ("optimiser update", "training loss")
    };
    line_chart(
        &format!("Training: {stage} (one line per model and seed)"),
        (x_label, y_label),
        &series,
        None,
    )
}

/// Writes `train_log.jsonl` and the per-stage plots into `out`; returns the markdown section
/// that links them (empty when nothing was trained).
pub fn write(out: &Path, lines: &[LogLine]) -> Result<String> {
    let mut jsonl = String::new();
    for line in lines {
        jsonl.push_str(&serde_json::to_string(line)?);
        jsonl.push('\n');
    }
    crate::io::write_atomic(&out.join("train_log.jsonl"), jsonl.as_bytes())?;
    let mut stages: Vec<&str> = Vec::new();
    for l in lines {
        if !stages.contains(&l.stage.as_str()) {
            stages.push(&l.stage);
        }
    }
    if stages.is_empty() {
        return Ok(String::new());
    }
    let mut md = String::from(
        "\n## Training\n\nEvery step of every training is in `train_log.jsonl` (stage, model, seed, \
         epoch, step, loss, learning rate, gradient norm, seconds). Loss curves per stage:\n\n",
    );
    for stage in stages {
        let of_stage: Vec<&LogLine> = lines.iter().filter(|l| l.stage == stage).collect();
        let svg = stage_plot(stage, &of_stage);
        let name = format!("loss-{stage}");
        crate::io::write_atomic(&out.join(format!("{name}.svg")), svg.as_bytes())?;
        crate::io::write_atomic(&out.join(format!("{name}.png")), &svg_to_png(&svg)?)?;
        md.push_str(&format!(
            "- {stage}: [{name}.svg]({name}.svg) ({} steps)\n",
            of_stage.len()
        ));
    }
    Ok(md)
}
