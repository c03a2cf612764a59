"""Gradient fusion: the closed-form (Cholesky) solver against Mix-of-Show's LBFGS, on SD1.5-shaped layers.

Every distinct attention-projection shape of SD1.5's UNet (self-attention 320/640/1280 square,
cross-attention K/V 768 -> 320/640/1280), 3 concepts, rank-4 LoRA updates, and input statistics from
random activations with a decaying spectrum at realistic row counts (spatial layers: the tokens of
64x64, 32x32, 16x16 latents over 4 sampled images; cross-attention K/V: 77 text tokens x 4 prompts).
Both solvers minimise the same objective (lorabench.merging.methods.fusion_objective) in float64;
the script prints each layer's times, the objective gap and the speed-up (goal: >= 50x).

    python bench/bench_fusion.py
    python bench/bench_fusion.py --max-iter 200 --dtype float32
"""

from __future__ import annotations

import argparse
import time

import torch

from lorabench.merging.methods import fuse_closed_form, fuse_lbfgs, fusion_objective, ridge_value

# (name, out, in, rows per concept)
LAYERS = [("attn1 320", 320, 320, 4 * 64 * 64), ("attn1 640", 640, 640, 4 * 32 * 32),
          ("attn1 1280", 1280, 1280, 4 * 16 * 16), ("attn2.to_k 320<-768", 320, 768, 4 * 77),
          ("attn2.to_k 640<-768", 640, 768, 4 * 77), ("attn2.to_k 1280<-768", 1280, 768, 4 * 77)]


def layer_problem(out_f, in_f, rows, concepts, rank, g, dtype):
    spectrum = torch.logspace(0, -2, in_f, dtype=torch.float64)  # activations are far from isotropic
    grams, deltas = [], []
    for _ in range(concepts):
        mix = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64))[0]
        x = torch.randn(rows, in_f, generator=g, dtype=torch.float64) * spectrum @ mix
        grams.append((x.T @ x / rows).to(dtype))
        deltas.append((torch.randn(out_f, rank, generator=g, dtype=torch.float64) @
                       torch.randn(rank, in_f, generator=g, dtype=torch.float64) * 0.01).to(dtype))
    return deltas, grams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--max-iter", type=int, default=500, help="LBFGS iterations (Mix-of-Show: hundreds)")
    ap.add_argument("--ridge", type=float, default=1e-4)
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.concepts} concepts, rank {args.rank}, "
          f"{args.dtype}, LBFGS max_iter {args.max_iter}")
    print(f"{'layer':<22} {'closed ms':>10} {'lbfgs ms':>10} {'iters':>6} {'speed-up':>9} {'obj closed':>12} "
          f"{'obj lbfgs':>12} {'rel. gap':>9}")
    tot_c = tot_l = 0.0
    worst_gap = -1.0
    for name, out_f, in_f, rows in LAYERS:
        deltas, grams = layer_problem(out_f, in_f, rows, args.concepts, args.rank, g, dtype)
        rho = ridge_value(grams, args.ridge)
        t0 = time.perf_counter()
        d_c = fuse_closed_form(deltas, grams, rho)
        t_c = time.perf_counter() - t0
        t0 = time.perf_counter()
        d_l, iters = fuse_lbfgs(deltas, grams, rho, max_iter=args.max_iter)
        t_l = time.perf_counter() - t0
        with torch.no_grad():
            f_c = float(fusion_objective(d_c, deltas, grams, rho))
            f_l = float(fusion_objective(d_l, deltas, grams, rho))
        gap = (f_c - f_l) / abs(f_l)  # <= 0: closed form at or below LBFGS
        worst_gap = max(worst_gap, gap)
        tot_c, tot_l = tot_c + t_c, tot_l + t_l
        print(f"{name:<22} {t_c * 1e3:>10.1f} {t_l * 1e3:>10.1f} {iters:>6} {t_l / t_c:>8.0f}x {f_c:>12.6g} "
              f"{f_l:>12.6g} {gap:>9.1e}")
    print(f"{'total':<22} {tot_c * 1e3:>10.1f} {tot_l * 1e3:>10.1f} {'':>6} {tot_l / tot_c:>8.0f}x")
    print(f"closed form objective <= LBFGS's (relative 1e-6) on every layer: {worst_gap <= 1e-6} "
          f"(largest (closed - lbfgs) / lbfgs = {worst_gap:.1e}); speed-up {tot_l / tot_c:.0f}x (goal >= 50x)")


if __name__ == "__main__":
    main()
