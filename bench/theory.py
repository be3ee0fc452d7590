"""Benchmark of gradwatch.theory.jacobian (a script, not a test).

    python bench/theory.py [--quick] [--json FILE] [--full-exact]

1. Exact-path overhead: ``singular_values(f, x)`` against a direct
   ``torch.linalg.svdvals(torch.func.jacrev(g)(x))`` on the same function and input,
   paired (alternating) repeats, medians. Target: ratio <= 1.1.
2. Large case: 8 conv layers (16 channels, 3x3, padding 1, tanh, PyTorch's default
   init) on one 3 x 64 x 64 input, so J is 65,536 x 12,288 (3 GiB in float32).
   Iterative top-10 against a long-run reference (block 40, tol 1e-8), and the
   Hutchinson var/mean^2 against 2048 probes (or, with --full-exact, both against the
   full SVD). The exact path's cost is measured on one chunk of its jvp columns and
   extrapolated (or, with --full-exact, measured whole). Target: >= 20x faster, top-10
   within 1 %, var/mean^2 within 5 %.

Other processes on a shared machine distort every timing here; the load average before
and after each part is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradwatch.theory._linops import JacobianOperator  # noqa: E402
from gradwatch.theory.jacobian import singular_values, spectrum_stats  # noqa: E402


def tanh_mlp(width: int, depth: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers).eval()


def conv_stack(in_channels: int = 3, channels: int = 16, depth: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(depth):
        layers += [nn.Conv2d(c, channels, 3, padding=1), nn.Tanh()]
        c = channels
    return nn.Sequential(*layers).eval()


def direct_exact(f, x: torch.Tensor) -> torch.Tensor:
    """What a user would write by hand: jacrev on the flattened map, then svdvals."""

    def g(v: torch.Tensor) -> torch.Tensor:
        return f(v.reshape(x.shape)).reshape(-1)

    with torch.no_grad():
        return torch.linalg.svdvals(torch.func.jacrev(g)(x.reshape(-1)))


def paired_medians(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds per call of a() and b(), alternating so that load drifts hit both
    alike. Fast calls are timed in groups lasting about 0.2 s, so the timer's own
    resolution and one-off hiccups matter less."""
    a(), b()  # warm-up
    start = time.perf_counter()
    a()
    inner = max(1, int(0.2 / max(time.perf_counter() - start, 1e-6)))
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - start) / inner)
    return statistics.median(ta), statistics.median(tb)


def bench_exact_overhead(quick: bool) -> list[dict]:
    cases = [
        ("tanh MLP 16 x 256", tanh_mlp(256, 16), torch.randn(1, 256)),
        ("conv 2 x 8ch on 3x16x16", conv_stack(3, 8, 2), torch.randn(1, 3, 16, 16)),
    ]
    if not quick:
        cases.insert(0, ("tanh MLP 64 x 1024", tanh_mlp(1024, 64), torch.randn(1, 1024)))
    rows = []
    for name, f, x in cases:
        ours, direct = paired_medians(
            lambda f=f, x=x: singular_values(f, x, method="exact"),
            lambda f=f, x=x: direct_exact(f, x),
            5 if quick else 11,
        )
        rows.append({"case": name, "ours_s": ours, "direct_s": direct, "ratio": ours / direct})
    return rows


def bench_large(quick: bool, full_exact: bool) -> dict:
    f = conv_stack()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    op = JacobianOperator(f, x)
    k, probes = 10, 64
    singular_values(f, x, k=2, block_size=4, max_iters=2)  # warm-up of the vmapped passes

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    top, t_top = timed(lambda: singular_values(f, x, k=k))
    stats, t_stats = timed(lambda: spectrum_stats(f, x, probes=probes))

    # Exact path cost: the first chunk of its jvp columns, extrapolated to all n, plus
    # svdvals of an (m/s) x (n/s) Gaussian matrix scaled by s^3 (LAPACK's values-only
    # SVD of a tall m x n matrix costs O(m n^2) flops).
    chunk = op.chunk_size
    basis = torch.zeros(chunk, op.n)
    basis[:, :chunk] = torch.eye(chunk)
    _, t_chunk = timed(lambda: op.jvp(basis))
    t_form = t_chunk * op.n / chunk
    shrink = 8 if quick else 4
    small = torch.randn(op.m // shrink, op.n // shrink)
    _, t_small_svd = timed(lambda: torch.linalg.svdvals(small))
    t_svd = t_small_svd * shrink**3
    out: dict = {
        "jacobian_shape": [op.m, op.n],
        "jacobian_gib": op.nbytes / 2**30,
        "k": k,
        "iterative_top_k_s": t_top,
        "iterative_iterations": top.iterations,
        "iterative_converged": top.converged,
        "hutchinson_probes": probes,
        "hutchinson_s": t_stats,
        "exact_chunk": chunk,
        "exact_chunk_s": t_chunk,
        "exact_form_estimate_s": t_form,
        "svd_estimate_from": [op.m // shrink, op.n // shrink],
        "svd_estimate_s": t_svd,
        "exact_estimate_s": t_form + t_svd,
        "iterative_matvecs": top.products,
        "top_k": top.values.tolist(),
        "normalized_variance": stats.normalized_variance,
        "normalized_variance_se": stats.normalized_variance_se,
    }
    if full_exact:
        s, t_exact = timed(lambda: singular_values(f, x, method="exact"))
        out["exact_s"] = t_exact
        ref_top = s.values[:k]
        lam = s.values.double() ** 2
        ref_nv = float((lam**2).mean() / lam.mean() ** 2 - 1)
        out["reference"] = "full SVD of the formed Jacobian"
        out["exact_time_kind"] = "measured"
        exact_cost = t_exact
    else:
        ref = singular_values(f, x, k=k, block_size=4 * k, tol=1e-8, max_iters=400, seed=7)
        long = spectrum_stats(f, x, probes=256 if quick else 2048, seed=7)
        ref_top, ref_nv = ref.values, long.normalized_variance
        out["reference"] = (
            f"block Krylov, block {4 * k}, tol 1e-8 ({ref.iterations} steps); "
            f"Hutchinson with {long.probes} probes (se {long.normalized_variance_se:.3g})"
        )
        out["exact_time_kind"] = (
            f"estimated: one chunk of {chunk} jvp columns x {op.n / chunk:.1f}, plus "
            f"svdvals of a {op.m // shrink} x {op.n // shrink} matrix x {shrink**3}"
        )
        exact_cost = t_form + t_svd
    rel = (top.values.double() - ref_top.double()).abs() / ref_top.double()
    out |= {
        "reference_top_k": ref_top.tolist(),
        "top_k_max_rel_error": float(rel.max()),
        "reference_normalized_variance": ref_nv,
        "normalized_variance_rel_error": abs(stats.normalized_variance - ref_nv) / abs(ref_nv),
        "speedup_top_k": exact_cost / t_top,
        "speedup_top_k_and_stats": exact_cost / (t_top + t_stats),
        "speedup_top_k_vs_forming_j_only": t_form / t_top,
    }
    return out


def environment() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
            platform.processor(),
        )
    except OSError:
        model = platform.processor()
    return {
        "cpu": model,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller cases, fewer repeats")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument(
        "--full-exact",
        action="store_true",
        help="run the exact path on the large case too (minutes, about 10 GB of RAM)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"environment": environment(), "load_average": [os.getloadavg()[0]]}
    results["exact_overhead"] = bench_exact_overhead(args.quick)
    results["load_average"].append(os.getloadavg()[0])
    print(f"{'exact path vs direct jacrev+svdvals':<40}{'ours s':>10}{'direct s':>10}{'ratio':>8}")
    for row in results["exact_overhead"]:
        print(
            f"{row['case']:<40}{row['ours_s']:>10.3f}{row['direct_s']:>10.3f}{row['ratio']:>8.3f}"
        )
    large = results["large_case"] = bench_large(args.quick, args.full_exact)
    results["load_average"].append(os.getloadavg()[0])
    m, n = large["jacobian_shape"]
    exact_s = large.get("exact_s", large["exact_estimate_s"])
    lines = [
        "",
        f"large case: J is {m} x {n} ({large['jacobian_gib']:.1f} GiB)",
        f"  iterative top-{large['k']}: {large['iterative_top_k_s']:.2f} s, "
        f"{large['iterative_iterations']} steps, {large['iterative_matvecs']} products with J^T J",
        f"    max rel. error vs reference: {large['top_k_max_rel_error']:.1e}",
        f"  var/mean^2: {large['normalized_variance']:.4g} +- {large['normalized_variance_se']:.2g}"
        f" ({large['hutchinson_probes']} probes, {large['hutchinson_s']:.2f} s);"
        f" reference {large['reference_normalized_variance']:.4g};"
        f" rel. error {large['normalized_variance_rel_error']:.2%}",
        f"  exact path: {exact_s:.0f} s ({large['exact_time_kind']})",
        f"    of which forming J: {large['exact_form_estimate_s']:.0f} s",
        f"  speedup: top-k {large['speedup_top_k']:.0f}x;"
        f" top-k + stats {large['speedup_top_k_and_stats']:.0f}x;"
        f" top-k against forming J alone {large['speedup_top_k_vs_forming_j_only']:.1f}x",
        f"  reference: {large['reference']}",
        f"  load average (1 min) before/between/after: {results['load_average']}",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
