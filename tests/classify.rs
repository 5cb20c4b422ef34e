//! `ws2s run` end to end on tiny models in seconds: every method, every output, PGR and summaries.

mod common;

use common::{tiny_gguf, write, write_class_task, ws2s_config};
use std::path::Path;

#[test]
fn ws2s_run_writes_every_output_with_every_method() {
    let dir = tempfile::tempdir().unwrap();
    let task = write_class_task(dir.path(), 160, 5);
    let model = tiny_gguf();
    let config = format!(
        r#"
name = "tiny"
seeds = [0, 1]
[task]
name = "classify:{task}"
[task.sizes]
weak_train = 60
strong_train = 60
test = 40
[[weak]]
name = "w1"
model = "{model}"
[[weak]]
name = "w2"
model = "{model}"
pooling = "mean"
[strong]
name = "s"
model = "{model}"
[probe]
epochs = 5
batch_size = 16
lr = 0.01
[methods]
weights = "dawid_skene"
"#,
        task = task.display(),
        model = model.display()
    );
    let config_path = write(dir.path(), "tiny.toml", &config);
    let out = dir.path().join("run");
    let output = ws2s_config("run", &config_path, &out, &dir.path().join("home"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap();
    assert_eq!(
        last,
        format!("results: {}", out.join("results.md").display())
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let seeds = results["seeds"].as_array().unwrap();
    assert_eq!(seeds.len(), 2);
    let methods: Vec<&str> = seeds[0]["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    for expected in [
        "xent[w1]",
        "xent[w2]",
        "logconf[w1]",
        "product[w2]",
        "naive",
        "joint_average",
        "joint_vote",
        "joint_dawid_skene",
        "edl",
        "edl_step",
        "dirichlet_multinomial",
    ] {
        assert!(
            methods.contains(&expected),
            "{expected} missing from {methods:?}"
        );
    }
    for seed in seeds {
        let weights: Vec<f64> = seed["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap())
            .collect();
        assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        for m in seed["methods"].as_array().unwrap() {
            let acc = m["test"]["accuracy"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&acc));
        }
    }
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("| edl |") && md.contains("PGR vs best weak") && md.contains("ceiling"),
        "{md}"
    );
    for plot in [
        "accuracy.svg",
        "accuracy.png",
        "pgr.svg",
        "pgr.png",
        "weak_labels.parquet",
    ] {
        assert!(
            std::fs::metadata(out.join(plot)).unwrap().len() > 100,
            "{plot}"
        );
    }
    // Every training's steps: the probes' refits (weak, ceiling, students) of both seeds.
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for stage in ["weak", "ceiling", "student"] {
        let of_stage: Vec<&serde_json::Value> =
            steps.iter().filter(|s| s["stage"] == stage).collect();
        assert!(!of_stage.is_empty(), "no {stage} steps");
        for seed in [0, 1] {
            assert!(
                of_stage.iter().any(|s| s["seed"] == seed),
                "{stage} seed {seed}"
            );
        }
        for s in &of_stage {
            assert!(s["loss"].as_f64().unwrap().is_finite(), "{s}");
            assert!(s["step"].as_u64().unwrap() >= 1 && s["epoch"].as_u64().unwrap() >= 1);
            assert!(
                s["model"].is_string() && s["grad_norm"].is_number() && s["seconds"].is_number()
            );
        }
        assert!(
            md.contains(&format!("[loss-{stage}.svg](loss-{stage}.svg)")),
            "{md}"
        );
        assert!(
            std::fs::metadata(out.join(format!("loss-{stage}.png")))
                .unwrap()
                .len()
                > 100
        );
    }
    // Within one refit, the objective never rises (L-BFGS with a Wolfe line search).
    let ceiling: Vec<f64> = steps
        .iter()
        .filter(|s| s["stage"] == "ceiling" && s["seed"] == 0)
        .map(|s| s["loss"].as_f64().unwrap())
        .collect();
    assert!(
        ceiling.windows(2).all(|w| w[1] <= w[0] + 1e-12),
        "{ceiling:?}"
    );
    let labels = std::fs::read_to_string(out.join("weak_labels.jsonl")).unwrap();
    assert_eq!(
        labels.lines().count(),
        120,
        "strong_train rows of both seeds"
    );
    let row: serde_json::Value = serde_json::from_str(labels.lines().next().unwrap()).unwrap();
    assert!(
        row["weak"]["w1"].is_array()
            && row["bayesian_confidence"].is_array()
            && row["joint"].is_array()
    );
    // Features were extracted once per (model, pooling) and cached: a second run reuses them.
    let features = std::fs::read_dir(dir.path().join("home/features"))
        .unwrap()
        .count();
    assert_eq!(features, 2);
}

fn stage_files(home: &Path, prefix: &str) -> usize {
    std::fs::read_dir(home.join("stages"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(prefix)
        })
        // Stage files, not the training logs beside them.
        .filter(|e| {
            !e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".log.jsonl")
        })
        .count()
}

#[test]
fn reruns_reuse_stages_and_a_changed_setting_reruns_only_what_depends_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let task = write_class_task(dir.path(), 160, 5);
    let model = tiny_gguf();
    let config = |a_max: f64, c_steps: usize| {
        format!(
            "name = \"t\"\n[task]\nname = \"classify:{}\"\n[task.sizes]\nweak_train = 40\nstrong_train = 40\ntest = 40\n\
             [[weak]]\nmodel = \"{m}\"\n[[weak]]\nmodel = \"{m}\"\npooling = \"mean\"\n[strong]\nmodel = \"{m}\"\n\
             [solver]\nc_steps = {c_steps}\n[methods]\nlist = [\"logconf\", \"edl\"]\nlogconf_a_max = {a_max}\n",
            task.display(),
            m = model.display()
        )
    };
    let home = dir.path().join("home");
    let run = |text: String| {
        let path = write(dir.path(), "c.toml", &text);
        let out = ws2s_config("run", &path, &dir.path().join("out"), &home);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join("out/results.json")).unwrap();
        // Everything but the wall times.
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json.as_object_mut().unwrap().remove("timings");
        json
    };
    let features = |h: &Path| -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
        let mut files: Vec<_> = std::fs::read_dir(h.join("features"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path(), e.metadata().unwrap().modified().unwrap())
            })
            .collect();
        files.sort();
        files
    };
    let first = run(config(0.5, 11));
    let counts = |h: &Path| {
        (
            stage_files(h, "weak"),
            stage_files(h, "ceiling"),
            stage_files(h, "student"),
        )
    };
    assert_eq!(counts(&home), (2, 1, 3));
    let second = run(config(0.5, 11));
    assert_eq!(counts(&home), (2, 1, 3), "a rerun computes nothing new");
    assert_eq!(first, second);
    let cached = features(&home);
    run(config(0.3, 11));
    assert_eq!(
        counts(&home),
        (2, 1, 6),
        "only the students depend on the methods section"
    );
    // A changed probe setting refits every probe but reads the features from the cache.
    run(config(0.3, 10));
    assert_eq!(counts(&home), (4, 2, 9));
    assert_eq!(features(&home), cached, "features are not recomputed");
}

#[test]
fn lora_and_full_fine_tuning_modes_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let task = write_class_task(dir.path(), 160, 5);
    let model = tiny_gguf();
    let config = format!(
        r#"
name = "modes"
[task]
name = "classify:{task}"
[task.sizes]
weak_train = 24
strong_train = 24
test = 16
[[weak]]
name = "probe"
model = "{m}"
[[weak]]
name = "lora"
model = "{m}"
mode = "lora"
lora = {{ rank = 2, alpha = 4.0, dropout = 0.1, targets = ["q_proj", "v_proj"] }}
[strong]
name = "full"
model = "{m}"
mode = "full"
train = {{ epochs = 1, batch_size = 8, lr = 0.001 }}
[probe]
epochs = 2
batch_size = 8
[methods]
list = ["xent", "edl"]
"#,
        task = task.display(),
        m = model.display()
    );
    let path = write(dir.path(), "modes.toml", &config);
    let out = dir.path().join("out");
    let output = ws2s_config("run", &path, &out, &dir.path().join("home"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let methods: Vec<&str> = results["seeds"][0]["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, vec!["xent[probe]", "xent[lora]", "edl"]);
    // Only the probe model needed features.
    assert_eq!(
        std::fs::read_dir(dir.path().join("home/features"))
            .unwrap()
            .count(),
        1
    );
    // Fine-tuning steps carry their learning rate and gradient norm.
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let tuned: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|s| s["model"] == "lora" || s["model"] == "full")
        .collect();
    assert!(tuned
        .iter()
        .any(|s| s["model"] == "lora" && s["stage"] == "weak"));
    assert!(tuned
        .iter()
        .any(|s| s["model"] == "full" && s["stage"] == "ceiling"));
    for s in &tuned {
        assert!(
            s["lr"].as_f64().unwrap() > 0.0 && s["grad_norm"].as_f64().unwrap() > 0.0,
            "{s}"
        );
    }
}

#[test]
fn ws2s_sweep_runs_a_ladder_and_shares_stages_between_rungs() {
    let dir = tempfile::tempdir().unwrap();
    let task = write_class_task(dir.path(), 160, 5);
    let model = tiny_gguf();
    let config = format!(
        r#"
name = "tiny ladder"
seeds = [0, 1]
[task]
name = "classify:{task}"
pool_seed = 0
[task.sizes]
weak_train = 40
strong_train = 40
test = 40
[sweep]
order = "ceiling"
multi = ["naive", "edl"]
[[sweep.models]]
name = "a"
model = "{model}"
[[sweep.models]]
name = "b"
model = "{model}"
pooling = "mean"
[[sweep.models]]
name = "c"
model = "{model}"
max_tokens = 8
"#,
        task = task.display(),
        model = model.display()
    );
    let config_path = write(dir.path(), "ladder.toml", &config);
    let out = dir.path().join("sweep");
    let output = ws2s_config("sweep", &config_path, &out, &dir.path().join("home"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!("results: {}", out.join("sweep.md").display())
    );
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    let ladder: Vec<&str> = results["ladder"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let mut sorted = ladder.clone();
    sorted.sort();
    assert_eq!(sorted, ["a", "b", "c"]);
    // Ordered weakest first by the measured cross-validated loss (non-increasing).
    let strength: Vec<f64> = results["strength"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(strength.windows(2).all(|w| w[0] >= w[1]), "{strength:?}");
    let cells = results["cells"].as_array().unwrap();
    // xent and logconf for each of the 3 pairs, naive and edl for the top rung.
    assert_eq!(cells.len(), 2 * 3 + 2, "{cells:?}");
    for (i, weak) in ladder.iter().enumerate() {
        for strong in &ladder[i + 1..] {
            for method in ["xent", "logconf"] {
                let cell = cells
                    .iter()
                    .find(|c| c["method"] == method && c["weak"] == *weak && c["strong"] == *strong)
                    .unwrap_or_else(|| panic!("{method} {weak} -> {strong}"));
                let acc = cell["accuracy"]["mean"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&acc));
            }
        }
    }
    assert!(cells
        .iter()
        .any(|c| c["method"] == "edl" && c["strong"] == ladder[2] && c["weak"] == "all below"));
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert!(
        md.contains("Median PGR") && md.contains("## xent: PGR") && md.contains("## edl"),
        "{md}"
    );
    for file in [
        "ladder.svg",
        "ladder.png",
        "pgr.svg",
        "pgr.png",
        "sweep.parquet",
    ] {
        assert!(
            std::fs::metadata(out.join(file)).unwrap().len() > 100,
            "{file}"
        );
    }
    // Each rung's own run, with its training log.
    assert!(out.join("runs").read_dir().unwrap().count() == 2);
    // A model's weak stages are computed once for the whole ladder: per seed, one weak stage
    // per model below the top (the ordering measured them, the rungs reused them).
    assert_eq!(stage_files(&dir.path().join("home"), "weak-"), 2 * 3);
    assert!(stderr.contains("ladder, weakest first"), "{stderr}");
}

#[test]
fn seeds_run_side_by_side_with_the_results_and_log_of_one_thread() {
    // Seeds (and their folds) run in parallel; nothing they write may depend on the threads.
    let dir = tempfile::tempdir().unwrap();
    let task = write_class_task(dir.path(), 160, 5);
    let model = tiny_gguf();
    let config = format!(
        "name = \"t\"\nseeds = [0, 1, 2]\n[task]\nname = \"classify:{}\"\n[task.sizes]\n\
         weak_train = 40\nstrong_train = 40\ntest = 40\n[[weak]]\nmodel = \"{m}\"\n[[weak]]\n\
         model = \"{m}\"\npooling = \"mean\"\n[strong]\nmodel = \"{m}\"\n[solver]\nc_steps = 4\n\
         [methods]\nlist = [\"xent\", \"logconf\", \"edl\"]\n",
        task.display(),
        m = model.display()
    );
    let path = write(dir.path(), "c.toml", &config);
    let run = |threads: &str| {
        let out = dir.path().join(format!("out-{threads}"));
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ws2s"))
            .args([
                "run",
                path.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .env("WS2S_HOME", dir.path().join(format!("home-{threads}")))
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap())
                .unwrap();
        // Wall times and the thread count differ; nothing else may.
        results.as_object_mut().unwrap().remove("timings");
        results.as_object_mut().unwrap().remove("cpu");
        let log: Vec<serde_json::Value> = std::fs::read_to_string(out.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|line| {
                let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
                v.as_object_mut().unwrap().remove("seconds");
                v
            })
            .collect();
        let labels = std::fs::read_to_string(out.join("weak_labels.jsonl")).unwrap();
        (results, log, labels)
    };
    let one = run("1");
    let three = run("3");
    assert!(!one.1.is_empty(), "the training log has the probes' steps");
    let seeds: Vec<u64> = one.1.iter().map(|l| l["seed"].as_u64().unwrap()).collect();
    assert!(seeds.windows(2).all(|w| w[0] <= w[1]), "log in seed order");
    // Compared as text (a failure prints where they part, not two whole documents).
    let text = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap();
    let first_difference = |a: &str, b: &str| {
        a.lines().zip(b.lines()).position(|(x, y)| x != y).map(|i| {
            (
                i,
                a.lines().nth(i).map(String::from),
                b.lines().nth(i).map(String::from),
            )
        })
    };
    let (a, b) = (text(&one.0), text(&three.0));
    assert!(a == b, "results.json: {:?}", first_difference(&a, &b));
    assert!(one.1 == three.1, "train_log.jsonl differs");
    assert!(
        one.2 == three.2,
        "weak_labels.jsonl: {:?}",
        first_difference(&one.2, &three.2)
    );
}
