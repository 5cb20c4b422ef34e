"""An independent check of `ws2s demo`'s probes with scikit-learn, on ws2s's own cached features.

For each seed of a finished demo run it rebuilds the splits (the pool from `ws2s data show`, the
seed's strong_train from the run's weak_labels.jsonl, test from test_predictions.jsonl), then:
  weak model (SmolLM2-135M by default): LogisticRegressionCV on weak_train's ground truth
    (standardised features, C grid 1e-5..1, 5 stratified folds, held-out log-loss);
  its soft labels on strong_train;
  the student (Qwen2.5-Coder-1.5B features): logistic regression on those soft labels (each row
    twice, weighted p and 1 - p: the soft-label cross-entropy), C chosen by 5-fold CV on the
    held-out soft log-loss;
and prints the weak model's and the student's test accuracy next to ws2s's.

Usage (in a venv with numpy and scikit-learn):
  python scripts/reference_probe.py RUN_DIR FEATURES_DIR WS2S_BINARY [--weak-dim 576 --strong-dim 1536]
"""
import argparse
import json
import os
import struct
import subprocess

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold


def load_features(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        info = header["features"]
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        data = np.frombuffer(f.read(end - start), dtype=np.float32)
    return data.reshape(info["shape"]).astype(np.float64)


def by_dim(features_dir, rows):
    out = {}
    for name in os.listdir(features_dir):
        x = load_features(os.path.join(features_dir, name))
        if x.shape[0] == rows:
            out[x.shape[1]] = x
    return out


def standardise(train, *others):
    mean = train.mean(axis=0)
    scale = np.sqrt(train.var(axis=0) + 1e-6)
    return [(a - mean) / scale for a in (train,) + others]


GRID = np.logspace(-5, 0, 11)


def soft_fit(x, p1, seed):
    """Logistic regression on soft labels p1 (probability of class 1), C by 5-fold CV."""
    strata = (p1 > 0.5).astype(int)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=seed).split(x, strata))

    def fit(c, rows):
        xx = np.vstack([x[rows], x[rows]])
        yy = np.r_[np.ones(len(rows)), np.zeros(len(rows))]
        ww = np.r_[p1[rows], 1 - p1[rows]]
        return LogisticRegression(C=c, tol=1e-8, max_iter=10000).fit(xx, yy, sample_weight=ww)

    scores = []
    for c in GRID:
        losses = []
        for train, held in folds:
            q = np.clip(fit(c, train).predict_proba(x[held])[:, 1], 1e-15, 1 - 1e-15)
            losses.append(-np.mean(p1[held] * np.log(q) + (1 - p1[held]) * np.log(1 - q)))
        scores.append(np.mean(losses))
    c = GRID[int(np.argmin(scores))]
    return fit(c, np.arange(len(x))), c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("features")
    ap.add_argument("ws2s")
    ap.add_argument("--weak-dim", type=int, default=576)
    ap.add_argument("--strong-dim", type=int, default=1536)
    ap.add_argument("--weak-name", default="SmolLM2-135M")
    args = ap.parse_args()
    config = ["--seed", "0", "--weak-train", "450", "--strong-train", "450", "--test", "1000", "--ask"]
    labels = {}
    for split in ["weak-train", "strong-train", "test"]:
        out = subprocess.run(
            [args.ws2s, "data", "show", "sciq", "--split", split, "-n", "1000", "--json"] + config,
            check=True, capture_output=True, text=True,
        ).stdout
        for line in out.splitlines():
            e = json.loads(line)
            labels[e["id"]] = e["label"]["class"]
    ids = sorted(labels)  # the feature tables' row order (examples by id)
    row = {i: k for k, i in enumerate(ids)}
    feats = by_dim(args.features, len(ids))
    xw_all, xs_all = feats[args.weak_dim], feats[args.strong_dim]
    results = json.load(open(os.path.join(args.run, "results.json")))
    preds = [json.loads(l) for l in open(os.path.join(args.run, "test_predictions.jsonl"))]
    strong_ids = {}
    for line in open(os.path.join(args.run, "weak_labels.jsonl")):
        r = json.loads(line)
        strong_ids.setdefault(r["seed"], []).append(r["id"])
    weak_index = [w["name"] for w in results["config"]["weak"]].index(args.weak_name)
    print("seed | weak: sklearn / ws2s | student xent: sklearn / ws2s | C weak, student (sklearn)")
    for seed_result, p in zip(results["seeds"], preds):
        seed = seed_result["seed"]
        test = p["test_ids"]
        strong = strong_ids[seed]
        weak = sorted(set(labels) - set(test) - set(strong))
        y = lambda s: np.array([labels[i] for i in s])
        rows = lambda s: [row[i] for i in s]
        xw_train, xw_strong, xw_test = standardise(
            xw_all[rows(weak)], xw_all[rows(strong)], xw_all[rows(test)]
        )
        cv = StratifiedKFold(5, shuffle=True, random_state=seed)
        weak_model = LogisticRegressionCV(
            Cs=GRID, cv=cv, scoring="neg_log_loss", tol=1e-8, max_iter=10000
        ).fit(xw_train, y(weak))
        weak_acc = np.mean(weak_model.predict(xw_test) == y(test))
        p1 = weak_model.predict_proba(xw_strong)[:, 1]
        xs_train, xs_test = standardise(xs_all[rows(strong)], xs_all[rows(test)])
        student, c = soft_fit(xs_train, p1, seed)
        student_acc = np.mean(student.predict(xs_test) == y(test))
        ours_weak = seed_result["weak"][weak_index]["accuracy"]
        name = f"xent[{args.weak_name}]"
        ours_student = next(m for m in seed_result["methods"] if m["method"] == name)["test"]["accuracy"]
        print(
            f"{seed} | {weak_acc:.3f} / {ours_weak:.3f} | {student_acc:.3f} / {ours_student:.3f} | "
            f"{weak_model.C_[0]:.1e}, {c:.1e}"
        )


if __name__ == "__main__":
    main()
