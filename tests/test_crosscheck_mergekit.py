"""Parity with a second independent implementation: mergekit 0.1.5 (Arcee AI's model-merging toolkit), for the
element-wise methods FusionBench does not cover or covers at another scope: Model Breadcrumbs, TIES ranked per tensor,
DARE-TIES (``ties_consensus``), Task Arithmetic and weight averaging, with and without per-task weights
(``pip install -e ".[crosscheck]"``; ``.ci/run`` installs it).

mergekit's public in-memory API (``mergekit.merge_methods.api.merge_tensors``) merges each tensor in float64;
``studio.merge`` runs in float32 as always. The error is ``||ours - theirs|| / ||theirs - base||`` per tensor, the
worst tensor reported, against a tolerance of 1e-6 (float32 rounding, ~1e-7 here).

Where the two differ by design the test either sets mergekit up to follow our rule or builds inputs where the rules
agree, and says so:

* TIES keeps ``int(d * k) + 1`` entries per task, as the official code (``topk_values_mask``: every magnitude ``>=``
  the ``(d - int(d k))``-th smallest); mergekit keeps ``int(d * density)``. mergekit gets the density that keeps the
  same count (``test_tolerance_tells_one_entry_apart`` shows one entry per tensor is far outside the tolerance).
* Where the surviving values of an entry sum to exactly 0, mergekit elects ``+1``; we follow the official code's
  majority of the elected signs. Magnitudes tied at a cut are ranked by position here and arbitrarily by mergekit's
  (unstable) sort. The experts below have no tied magnitudes within a task's tensor (checked) and no exact zero sum
  over all tasks (checked; sums over TIES's kept subsets cancel exactly with the same negligible chance, and the
  experts are fixed by a seed), so these rules do not come into play. MiniSuite's experts, stored in float16, have
  many of both, which is why they are not used here.
* DARE's masks come from different random streams and mergekit rescales survivors to the task's L1 norm (not by
  ``1 / (1 - p)``, the paper's rule), so only its sign-consensus part is compared, at ``p = 0``.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest
import torch

import studio
from studio import bench

from .conftest import require_or_skip_module, worst_error

try:
    from mergekit.merge_methods.api import merge_tensors
except ImportError as exc:  # pragma: no cover - depends on the environment
    require_or_skip_module(f"mergekit is not importable ({exc})", "pip install -e '.[crosscheck]'")

TOL = 1e-6
T = 8
#: Per-task weights for the weighted cases, the largest 1, so ``preferences = WEIGHTS`` scales task ``i`` by
#: ``p_i / max p = WEIGHTS[i]`` (exactly: binary fractions summing to 4), mergekit's per-model ``weight``.
WEIGHTS = [1.0, 0.25, 0.75, 0.5, 0.125, 0.375, 0.625, 0.375]

StateDict = dict[str, torch.Tensor]


def distinct_magnitude_experts(seed: int = 0) -> tuple[StateDict, dict[str, StateDict]]:
    """A zero base and ``T`` experts with the parameter shapes of the packaged MiniCLIP-ViT visual tower (open_clip's
    own architecture) whose entries, within each task's tensor, have all-distinct magnitudes: a random permutation
    of log-spaced values over two decades (adjacent ones at least 7e-5 apart relatively, far above float32's
    resolution), scaled per task, with random signs."""
    g = torch.Generator().manual_seed(seed)
    shapes = bench.clip_visual_shapes("MiniCLIP-ViT")
    base = {k: torch.zeros(s) for k, s in shapes.items()}
    experts: dict[str, StateDict] = {f"task{t}": {} for t in range(T)}
    for k, shape in shapes.items():
        n = base[k].numel()
        levels = torch.logspace(-4, -2, n, dtype=torch.float64)
        for t, name in enumerate(experts):
            mags = levels[torch.randperm(n, generator=g)] * (0.5 + torch.rand((), generator=g, dtype=torch.float64))
            signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
            experts[name][k] = (mags * signs).float().reshape(shape)
    return base, experts


@pytest.fixture(scope="module")
def pool() -> tuple[StateDict, dict[str, StateDict]]:
    base, experts = distinct_magnitude_experts()
    for k in base:   # the preconditions under which mergekit's rules and ours coincide (see the module docstring)
        stack = torch.stack([e[k] for e in experts.values()])
        for t in range(T):
            assert stack[t].abs().unique().numel() == stack[t].numel(), f"tied magnitudes in task {t}, {k}"
        assert bool((stack.sum(0) != 0).all()), f"an exact zero sum in {k}"
    return base, experts


def mergekit_merge(base: StateDict, experts: dict[str, StateDict], method: str, params: dict[str, Any],
                   per_tensor: Any = None) -> StateDict:
    """mergekit's ``method`` on every tensor in float64 (the base first); ``per_tensor(tensor)`` adds parameters
    that depend on the tensor (TIES's density)."""
    out = {}
    for k, b in base.items():
        p = dict(params)
        if per_tensor is not None:
            p.update(per_tensor(b))
        inputs = [e[k].double() for e in experts.values()]
        if method == "linear":   # no base model
            out[k] = merge_tensors(inputs, method, parameters=p)
        else:
            out[k] = merge_tensors([b.double(), *inputs], method, parameters=p, base_index=0)
    return out


def ties_density(k: float) -> Any:
    """mergekit's density that keeps the official code's ``int(d k) + 1`` entries of a ``d``-entry tensor."""
    return lambda tensor: {"density": (int(tensor.numel() * k) + 1.5) / tensor.numel()}


#: name -> (studio.merge arguments, mergekit method, its parameters, per-tensor parameters)
CASES: dict[str, tuple[dict[str, Any], str, dict[str, Any], Any]] = {
    "weight_average = linear": (dict(method="weight_average"), "linear", {"weight": 1.0}, None),
    "task_arithmetic": (dict(method="task_arithmetic", alpha=0.3), "task_arithmetic",
                        {"weight": 1.0, "lambda": 0.3}, None),
    "task_arithmetic weighted": (dict(method="task_arithmetic", alpha=0.3, preferences=WEIGHTS), "task_arithmetic",
                                 {"weight": WEIGHTS, "lambda": 0.3}, None),
    **{
        f"ties layer k={k:g} {func}": (
            dict(method="ties", k=k, topk_scope="layer", merge_func=func, alpha=0.3), "ties",
            {"weight": 1.0, "lambda": 0.3, "normalize": func == "mean"}, ties_density(k))
        for k in (0.2, 0.5) for func in ("sum", "mean")
    },
    # mergekit's normalised TIES divides by the sum of the agreeing tasks' weights; our dis-mean by their count, so
    # only the dis-sum is compared with per-task weights
    "ties layer sum weighted": (
        dict(method="ties", k=0.2, topk_scope="layer", merge_func="sum", alpha=0.3, preferences=WEIGHTS), "ties",
        {"weight": WEIGHTS, "lambda": 0.3, "normalize": False}, ties_density(0.2)),
    "dare ties_consensus p=0 = dare_ties": (dict(method="dare", p=0.0, ties_consensus=True, alpha=0.3), "dare_ties",
                                            {"weight": 1.0, "lambda": 0.3, "density": 1.0}, None),
    **{
        f"breadcrumbs layer beta={beta:g} gamma={gamma:g}": (
            dict(method="breadcrumbs", beta=beta, gamma=gamma, scope="layer", alpha=0.3), "breadcrumbs",
            {"weight": 1.0, "lambda": 0.3, "density": round(1 - beta - gamma, 9), "gamma": beta}, None)
        for beta, gamma in ((0.01, 0.85), (0.05, 0.8), (0.0, 0.5))
    },
    "breadcrumbs layer weighted": (
        dict(method="breadcrumbs", beta=0.01, gamma=0.85, scope="layer", alpha=0.3, preferences=WEIGHTS),
        "breadcrumbs", {"weight": WEIGHTS, "lambda": 0.3, "density": 0.14, "gamma": 0.01}, None),
}


def test_the_pinned_mergekit_is_the_one_imported():
    assert importlib.metadata.version("mergekit") == "0.1.5"


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_mergekit(pool, case):
    base, experts = pool
    kwargs, method, params, per_tensor = CASES[case]
    kwargs = dict(kwargs)
    ours = studio.merge(base, experts, kwargs.pop("method"), **kwargs)
    for k, b in base.items():
        assert ours[k].shape == b.shape and ours[k].dtype == b.dtype, k
    err, key = worst_error(base, ours, mergekit_merge(base, experts, method, params, per_tensor))
    assert err <= TOL, f"{case}, {key}: relative error {err:.2e} against mergekit exceeds {TOL:.0e}"


def test_tolerance_tells_one_entry_apart(pool):
    """The comparison is sharp: mergekit's own TIES count (``int(d k)``, one entry per task and tensor fewer than
    the official code's) or Breadcrumbs' top cut moved by 1 % are far outside the tolerance."""
    base, experts = pool
    ours = studio.merge(base, experts, "ties", k=0.2, topk_scope="layer", merge_func="sum", alpha=0.3)
    theirs = mergekit_merge(base, experts, "ties", {"weight": 1.0, "lambda": 0.3, "normalize": False, "density": 0.2})
    assert worst_error(base, ours, theirs)[0] > 100 * TOL

    ours = studio.merge(base, experts, "breadcrumbs", beta=0.02, gamma=0.84, scope="layer", alpha=0.3)
    theirs = mergekit_merge(base, experts, "breadcrumbs",
                            {"weight": 1.0, "lambda": 0.3, "density": 0.14, "gamma": 0.01})
    assert worst_error(base, ours, theirs)[0] > 100 * TOL


def test_exact_zero_sum_is_where_the_sign_rules_part():
    """Where the surviving values of an entry cancel exactly, mergekit elects +1; ``ties`` follows the official TIES
    code's majority of the elected signs (``elect_sign``), as its schema says, and DARE-TIES (``ties_consensus``)
    is mergekit's ``dare_ties``, +1 included (it took the tensor's majority, a third rule: a helper's audit found
    0.85 % of a bf16-stored tensor's entries at the other sign). Column 2 sums to 0 and the elected signs are
    (+1, -1, -1, -1): mergekit and DARE-TIES keep the +2, TIES the -2."""
    tasks = torch.tensor([[1.0, 2.0, 2.0, -3.0], [1.0, -3.0, -2.0, -1.0]])
    base = {"w": torch.zeros(4)}
    experts = {f"t{i}": {"w": t} for i, t in enumerate(tasks)}
    dare = studio.merge(base, experts, "dare", p=0.0, ties_consensus=True, alpha=1.0)["w"]
    ties = studio.merge(base, experts, "ties", k=1.0, topk_scope="layer", merge_func="sum", alpha=1.0)["w"]
    assert dare.tolist() == mergekit_merge(base, experts, "dare_ties", {"weight": 1.0, "density": 1.0})["w"].tolist() \
        == [2.0, -3.0, 2.0, -4.0]
    assert mergekit_merge(base, experts, "ties", {"weight": 1.0, "density": 1.0, "normalize": False})["w"].tolist() \
        == [2.0, -3.0, 2.0, -4.0]
    assert ties.tolist() == [2.0, -3.0, -2.0, -4.0]


def main() -> None:
    """Print every case's error against mergekit (``python -m tests.test_crosscheck_mergekit``, repository root)."""
    base, experts = distinct_magnitude_experts()
    print(f"mergekit {importlib.metadata.version('mergekit')}, {T} experts of MiniCLIP-ViT shapes with distinct "
          "magnitudes; worst per-tensor ||ours - mergekit|| / ||mergekit delta||")
    print("| case | studio.merge (float32) | tolerance |\n|---|---|---|")
    for case, (kwargs, method, params, per_tensor) in CASES.items():
        kwargs = dict(kwargs)
        ours = studio.merge(base, experts, kwargs.pop("method"), **kwargs)
        print(f"| {case} | {worst_error(base, ours, mergekit_merge(base, experts, method, params, per_tensor))[0]:.1e}"
              f" | {TOL:.0e} |")


if __name__ == "__main__":
    main()
