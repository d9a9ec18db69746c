"""CUDA smoke test of the paths the CUDA parity tests do not reach: every diagnostics metric (one with CPU weights),
the per-layer curves and SAR_avg, TSV-C compression and MiniSuite evaluation, each on CUDA against the same call on
the CPU. Prints one line per check with the largest difference; exits non-zero if one fails or differs by more than
1e-3 (relative to the CPU value's largest entry). Part of tools/device_check.sh; without CUDA it says so and exits 0.
"""

from __future__ import annotations

import sys
import time

import torch

import studio
from studio import diagnostics as D
from studio.evaluate import evaluate


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    finite = torch.isfinite(b)
    if not bool((torch.isfinite(a) == finite).all()):
        return float("inf")
    return float((a - b)[finite].abs().max() / b[finite].abs().max().clamp_min(1e-12)) if bool(finite.any()) else 0.0


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA: nothing to check")
        return 0
    suite = studio.default_suite()
    names = list(suite.experts)[:4]
    experts = {n: suite.experts[n] for n in names}
    pools = {dev: studio.get_pool(suite.base, experts, device=dev) for dev in ("cpu", "cuda")}
    key = next(k for k in suite.base if k.endswith("mlp.c_fc.weight"))
    merged = {dev: studio.merge(suite.base, experts, "ties", device=dev) for dev in ("cpu", "cuda")}
    worst, failed = 0.0, []

    def check(what: str, fn) -> None:
        nonlocal worst
        t0 = time.perf_counter()
        try:
            cpu, cuda = fn("cpu"), fn("cuda")
            err = max(rel(a, b) for a, b in zip(cuda, cpu)) if isinstance(cpu, tuple) else rel(cuda, cpu)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"FAIL {what}: {type(exc).__name__}: {exc}")
            failed.append(what)
            return
        worst = max(worst, err)
        print(f"{'ok  ' if err <= 1e-3 else 'DIFF'} {what}: max rel diff {err:.2e} ({time.perf_counter() - t0:.2f} s)")
        if err > 1e-3:
            failed.append(what)

    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])   # on the CPU on purpose
    for metric in D.METRICS:
        check(f"interference {metric}", lambda dev, m=metric: D.interference_matrix(pools[dev], key, m, merged[dev]))
    check("interference cosine, CPU weights",
          lambda dev: D.interference_matrix(pools[dev], key, "cosine", weights=weights))
    check("layer_curves", lambda dev: torch.tensor([v for name, vals in D.layer_curves(pools[dev], merged[dev]).items()
                                                    if name not in ("key", "block") for v in vals]))
    check("sar_avg", lambda dev: D.sar_avg(pools[dev], merged[dev]))
    check("compress", lambda dev: studio.compress(suite.base, experts, device=dev).task_vector(names[0])[key])
    check("evaluate", lambda dev: torch.tensor(list(evaluate(suite, merged["cpu"], device=dev).accuracy.values())))
    print(f"worst {worst:.2e}; {len(failed)} failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
