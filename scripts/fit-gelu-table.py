#!/usr/bin/env python3
"""Fits the table of src/ops/int8/gelu.rs: Phi(x) (the standard normal CDF) on [-5, 0] in 8
intervals of 0.625, each a degree-4 polynomial in u in [0, 1) (the position inside its
interval), by weighted least squares (weights 1 / Phi: relative error) on 400 Chebyshev nodes,
in f64; the coefficients are then rounded to f32. The first interval's polynomial has no
constant term: it is 0 at u = 0, where every x below -5 lands (Phi(-5) = 2.9e-7), so the
kernels need no step of their own for those. Prints the Rust table and the largest error
of the f32 evaluation (Horner with fused multiply-adds, as the kernels do) against erfc in f64.
Needs numpy:  python3 scripts/fit-gelu-table.py"""
from math import erfc, sqrt

import numpy as np

LO, N, DEG = -5.0, 8, 4
WIDTH = -LO / N


def phi(x):
    return 0.5 * erfc(-x / sqrt(2.0))


def fma32(a, b, c):
    # a * b is exact in f64 (two 24-bit significands), so one f64 rounding of the sum, then f32.
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def fit():
    k = np.arange(400)
    u = 0.5 - 0.5 * np.cos(np.pi * (k + 0.5) / len(k))
    table = []
    for i in range(N):
        y = np.array([phi(LO + WIDTH * (i + v)) for v in u])
        if i == 0:
            # No constant term: columns u^1..u^DEG, rows weighted as polyfit weights them.
            basis = np.stack([u**n for n in range(1, DEG + 1)], axis=1) / y[:, None]
            c = np.concatenate([[0.0], np.linalg.lstsq(basis, y / y, rcond=None)[0]])
        else:
            c = np.polynomial.polynomial.polyfit(u, y, DEG, w=1.0 / y)
        table.append(c.astype(np.float32))
    return table


def evaluate(x, table):
    x = np.float32(x)
    a = -abs(x)
    t = fma32(a, np.float32(1.0 / WIDTH), np.float32(-LO / WIDTH))
    t = min(max(t, np.float32(0.0)), np.float32(N) - np.float32(N * 2.0**-24))
    i = int(t)
    u = np.float32(t - np.float32(i))
    p = table[i][DEG]
    for c in table[i][DEG - 1 :: -1]:
        p = fma32(p, u, c)
    return p if x <= 0 else np.float32(1.0) - p


def main():
    table = fit()
    worst_phi = worst_gelu = 0.0
    for x in np.linspace(-10.0, 10.0, 400_001).astype(np.float32):
        p = evaluate(x, table)
        worst_phi = max(worst_phi, abs(float(p) - phi(float(x))))
        g = float(np.float32(x * p))
        worst_gelu = max(worst_gelu, abs(g - float(x) * phi(float(x))) / max(1.0, abs(float(x))))
    print(f"// largest |Phi error| {worst_phi:.3e}, |gelu error| / max(1, |x|) {worst_gelu:.3e}")
    print(f"const TABLE: [[f32; {N}]; {DEG + 1}] = [")
    for n in range(DEG + 1):
        print("    [" + ", ".join(f"{float(table[i][n])!r}" for i in range(N)) + "],")
    print("];")


if __name__ == "__main__":
    main()
