#!/usr/bin/env python3
"""Fits the table of src/ops/int8/gelu.rs: Phi(x) (the standard normal CDF) on [-6.5, 0] in 8
intervals of 0.8125, each a degree-6 polynomial in u in [0, 1) (the position inside its
interval), by weighted least squares (weights 1 / Phi: relative error) on 400 Chebyshev nodes,
in f64; the coefficients are then rounded to f32. Prints the Rust table and the largest error
of the f32 evaluation (Horner with fused multiply-adds, as the kernels do) against erfc in f64.
Needs numpy:  python3 scripts/fit-gelu-table.py"""
from math import erfc, sqrt

import numpy as np

LO, N, DEG = -6.5, 8, 6
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
    if x < LO:
        p = np.float32(0.0)
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
