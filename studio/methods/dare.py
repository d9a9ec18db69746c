"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario"): Drop And REscale, then Task Arithmetic."""

from __future__ import annotations

import torch
from torch import Tensor

from ..pool import LayerTasks, key_seed
from ..registry import register
from ..schema import Param
from ._sparsify import generalized_task_arithmetic, random_drop


@register(
    "dare",
    params=(
        Param("p", float, 0.8, low=0.0, high=0.99, ui_step=0.01,
              help="Drop rate: each task-vector entry is zeroed with probability p, survivors are scaled by 1/(1-p).",
              paper="DARE Sec. 3 (Yu et al. 2024); p=0.8 keeps 20% as TIES does (project issue)"),
        Param("ties_consensus", bool, False,
              help="DARE-TIES as mergekit's dare_ties: after drop-and-rescale, keep only entries agreeing with the "
                   "elected sign (dis-sum, no magnitude trim; an entry whose values cancel exactly elects +1).",
              paper="mergekit 'dare_ties' (sign consensus, no normalisation). DARE Sec. 4 combines DARE with TIES; "
                    "its official code (MergeLM) and FusionBench also run TIES's magnitude trim after the drop, "
                    "which this option does not"),
        Param("alpha", float, 0.3, low=0.0, high=5.0, post_scale=True, ui_step=0.05,
              help="Scaling coefficient lambda applied to the merged task vector.",
              paper="Task Arithmetic scaling, 0.3 as in FusionBench DARE for ViT-B/32"),
    ),
    paper="Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch "
          "(Yu et al., ICML 2024), Sec. 3",
    summary="Randomly drop task-vector entries (rate p), rescale the rest by 1/(1-p), then sum (Task Arithmetic).",
    scope="all",
    vector_rule="sum",
    uses_seed=True,
)
def dare(layer: LayerTasks, p: float, ties_consensus: bool, seed: int) -> Tensor:
    """``sum_i m_i * Delta_i / (1 - p)``, ``m_i ~ Bernoulli(1 - p)`` i.i.d. per entry (the engine applies ``alpha``).

    Each task's mask is drawn from a ``torch.Generator`` of its own on the layer's device, seeded with
    ``key_seed(seed, name)`` (the engine derives ``seed`` from the merge seed and the key, for tied weights the first
    of the tied keys, so that they merge equal: :meth:`~studio.pool.TaskPool.tied_key`; ``name`` is the expert's),
    so a seed fixes the merge, and a task's mask depends on neither the experts' order nor which other experts are
    merged: reordering them gives the same merge, up to the sum's rounding (tested with every method). CPU and CUDA
    generators give different (equally valid) draws. (Before 0.2.2 the tasks drew from one stream in expert order.)
    With ``ties_consensus`` the drop-and-rescaled task vectors go through the TIES sign election and a disjoint sum
    (mergekit's ``dare_ties``, whose +1 this takes for an entry whose values cancel exactly; the per-tensor majority
    taken before put 0.85 % of a bf16-stored tensor's entries at the other sign, a helper's audit; the official DARE
    code's TIES variant, MergeLM ``mask_apply_method="ties_merging"``, also trims by magnitude and takes the
    disjoint mean), otherwise they are summed. With ``p = 0`` this is Task Arithmetic.

    Example:
        >>> from studio.pool import TaskPool
        >>> experts = {"a": {"w": torch.ones(4)}, "b": {"w": 2 * torch.ones(4)}}
        >>> layer = TaskPool({"w": torch.zeros(4)}, experts).layer("w")
        >>> dare(layer, p=0.0, ties_consensus=False, seed=0).tolist()
        [3.0, 3.0, 3.0, 3.0]
        >>> out = dare(layer, p=0.5, ties_consensus=False, seed=0)
        >>> set(out.tolist()) <= {0.0, 2.0, 4.0, 6.0}
        True
    """
    generators = [torch.Generator(device=layer.device).manual_seed(key_seed(seed, name)) for name in layer.names]
    if ties_consensus or layer.device.type != "cpu":
        def drop_each(d: Tensor) -> Tensor:
            out = torch.empty_like(d)
            for i, generator in enumerate(generators):
                out[i] = random_drop(d[i], p, generator)
            return out

        return generalized_task_arithmetic(layer.deltas, drop_each, consensus=ties_consensus, aggregate="sum",
                                           zero_sign="positive")
    # Task by task and a cache-sized piece at a time (no [T, *shape] stack and temporaries: the draws, the
    # mask and the sum stay in the core's cache; 58-66 ms against 84-86 ms for eight 3072 x 768 task matrices
    # on one core; with two workers the merge takes as long either way, bound by the generator, see
    # docs/PERFORMANCE.md). The CPU generator fills tensors serially, so task i's pieces drawn one after another
    # from its generator are exactly random_drop's one draw over its whole task vector (tested).
    out = torch.empty(layer.shape, device=layer.device, dtype=torch.float32).reshape(-1)
    keep = None
    for i, start, stop, x in layer.task_chunks():
        if keep is None:
            keep = torch.empty_like(x)
        term = keep[:stop - start].uniform_(generator=generators[i])   # = random_drop(x, p, generator), in a buffer
        torch.ge(term, p, out=term)
        term.mul_(x).div_(1.0 - p)
        if i == 0:
            out[start:stop].copy_(term)
        else:
            out[start:stop].add_(term)
    return out.reshape(layer.shape)
