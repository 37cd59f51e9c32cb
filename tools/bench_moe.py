"""Micro-benchmark of the two MoE routing implementations at our sizes.

    python -m tools.bench_moe [--tokens 512 2048 8192] [--repeats 20] [--device cpu]

Times forward + backward of ``MixtureOfExperts`` with ``routing="dispatch"`` and
``routing="einsum"`` on the same weights and inputs, interleaving the two so
both see the same machine load, and prints the median times and their ratio.
``--skew`` biases the router towards one expert (an untrained router is nearly
uniform; a collapsing one is what makes dispatch's padded buffer grow).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.models.blocks import MixtureOfExperts


def benchmark_moe_routing(n_tokens: int = 2048, d_model: int = 64, d_hidden: int = 128, n_experts: int = 10,
                          top_k: int = 2, repeats: int = 20, skew: float = 0.0, device: str = "cpu") -> dict:
    """Median seconds per forward+backward for each routing, and einsum/dispatch (>1: dispatch faster)."""
    torch.manual_seed(0)
    moe = MixtureOfExperts(d_model, d_hidden, n_experts, top_k).to(device)
    with torch.no_grad():
        moe.router.weight[0] += skew  # tokens with positive feature sums lean to expert 0
    x = torch.randn(1, n_tokens, d_model, device=device) + skew
    mask = torch.ones(1, n_tokens, dtype=torch.bool, device=device)

    def step(routing):
        moe.routing = routing
        moe.zero_grad(set_to_none=True)
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out, stats, _ = moe(x, mask)
        (out.square().mean() + stats.balance_loss()).backward()
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {"dispatch": [], "einsum": []}
    for _ in range(3):  # warm-up
        step("dispatch"), step("einsum")
    for _ in range(repeats):
        for routing in times:
            times[routing].append(step(routing))
    with torch.no_grad():
        load = moe(x, mask)[1].routed
    result = {routing: statistics.median(t) for routing, t in times.items()}
    result["einsum_over_dispatch"] = result["einsum"] / result["dispatch"]
    result["busiest_expert_share"] = float(load.max()) / float(load.sum())
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skew", type=float, nargs="+", default=[0.0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(f"d_model={args.d_model} d_hidden={args.d_hidden} experts={args.experts} top_k={args.top_k} "
          f"device={args.device} threads={torch.get_num_threads()}")
    print(f"{'tokens':>7} {'skew':>5} {'busiest':>8} {'dispatch ms':>12} {'einsum ms':>10} {'einsum/dispatch':>16}")
    for skew in args.skew:
        for n_tokens in args.tokens:
            r = benchmark_moe_routing(n_tokens, args.d_model, args.d_hidden, args.experts, args.top_k,
                                      args.repeats, skew, args.device)
            print(f"{n_tokens:>7} {skew:>5} {r['busiest_expert_share']:>8.2f} {1e3 * r['dispatch']:>12.2f} "
                  f"{1e3 * r['einsum']:>10.2f} {r['einsum_over_dispatch']:>16.2f}")


if __name__ == "__main__":
    main()
