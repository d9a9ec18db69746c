"""Slow, obviously-correct references for TSV-M, TSV-C, Iso-C, Iso-CTS and Model Breadcrumbs, used by the tests (parity)
and the benchmark (speed ratio).

Each function follows the official code's loops line by line (rewritten, not copied) on a list of task vectors
(``tau_i = theta_i - theta_pre`` state dicts), in the task vectors' dtype (float64 in the tests; float32, as the
official code runs, in the benchmark) and with the exact LAPACK SVD:

* TSV-M: ``compute_and_sum_svd_mem_reduction`` (github.com/AntoAndGar/task_singular_vectors, src/utils/TSVM_utils.py):
  zero-padded ``sum_u [m, r]``, ``sum_s [r]``, ``sum_v [r, n]`` with task ``i`` in slots ``i*k:(i+1)*k``,
  ``k = int(r * 1/T)``; merged = ``u_u @ v_u @ diag(sum_s) @ u_v @ v_v`` of the SVDs of ``sum_u`` and ``sum_v``;
  non-matrix tensors (and ``text_projection``) are averaged with the running mean.
* TSV-C: ``compress_tv``: ``u[:, :k], s[:k], v[:k]`` per 2-D tensor (``text_projection`` included: the official
  exclusion is commented out), other tensors kept.
* Iso-C / Iso-CTS: ``iso_c`` / ``iso_cts`` (github.com/danielm1405/iso-merging, src/utils/iso.py): SVD of the SUM;
  Iso-CTS with the task-specific block first, the common block after it, SVD-based orthogonalisation and the mean
  of all ``r`` singular values.
* Model Breadcrumbs: ``TaskVectorMiddleKeep`` (github.com/rezazzr/breadcrumbs, src/task_vectors.py): per tensor,
  ``topk`` along the last dimension removes the largest magnitudes, a second ``topk`` keeps the largest of the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor

TaskVectors = list[dict[str, Tensor]]


def _is_matrix(key: str, t: Tensor) -> bool:
    return t.dim() == 2 and "text_projection" not in key


def _running_mean(vectors: list[Tensor]) -> Tensor:
    out = vectors[0].clone()
    for i, v in enumerate(vectors[1:], start=2):
        out += (v - out) / i
    return out


def tsv_m_reference(task_vectors: TaskVectors, rank_fraction: float | None = None) -> dict[str, Tensor]:
    """Official TSV-M loop (unscaled merged task vector)."""
    T = len(task_vectors)
    sv_reduction = 1 / T if rank_fraction is None else rank_fraction
    out: dict[str, Tensor] = {}
    for key in task_vectors[0]:
        vecs = [tv[key] for tv in task_vectors]
        if not _is_matrix(key, vecs[0]):
            out[key] = _running_mean(vecs)
            continue
        sum_u = sum_s = sum_v = None
        for i, vec in enumerate(vecs):
            u, s, v = torch.linalg.svd(vec, full_matrices=False)
            if i == 0:
                sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
            k = int(s.shape[0] * sv_reduction)
            sum_u[:, i * k:(i + 1) * k] = u[:, :k]
            sum_s[i * k:(i + 1) * k] = s[:k]
            sum_v[i * k:(i + 1) * k, :] = v[:k, :]
        u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
        u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
        out[key] = torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))
    return out


def tsv_c_reference(task_vectors: TaskVectors, rank_fraction: float | None = None) -> list[dict[str, Tensor]]:
    """Official ``compress_tv`` followed by reconstruction ``u diag(s) v`` (dense approximate task vectors)."""
    sv_reduction = 1 / len(task_vectors) if rank_fraction is None else rank_fraction
    out = []
    for tv in task_vectors:
        rec = {}
        for key, layer in tv.items():
            if layer.dim() == 2:
                u, s, v = torch.linalg.svd(layer, full_matrices=False)
                k = int(s.shape[0] * sv_reduction)
                rec[key] = u[:, :k] @ torch.diag(s[:k]) @ v[:k, :]
            else:
                rec[key] = layer
        out.append(rec)
    return out


def iso_c_reference(task_vectors: TaskVectors) -> dict[str, Tensor]:
    """Official Iso-C loop (unscaled)."""
    out: dict[str, Tensor] = {}
    for key in task_vectors[0]:
        tvs = [tv[key] for tv in task_vectors]
        out[key] = sum(tvs) / len(tvs)
        if _is_matrix(key, tvs[0]):
            out[key] = out[key] * len(tvs)
            U, S, V = torch.linalg.svd(out[key], full_matrices=False)
            S_mean = torch.ones_like(S) * S.mean()
            out[key] = torch.linalg.multi_dot((U, torch.diag(S_mean), V))
    return out


def iso_cts_dims_reference(r: int, T: int, common_space_fraction: float) -> tuple[int, int]:
    """The official size computation, verbatim in structure."""
    common_space_index_s = int(r * common_space_fraction)
    _task_specific_total_space_index_s = round((r - common_space_index_s) / T) * T
    common_space_index_s = r - _task_specific_total_space_index_s
    n_dims_per_task = int((r - common_space_index_s) / T)
    return common_space_index_s, n_dims_per_task


def iso_cts_reference(task_vectors: TaskVectors, common_space_fraction: float = 0.8) -> dict[str, Tensor]:
    """Official Iso-CTS loop (unscaled)."""
    T = len(task_vectors)
    out: dict[str, Tensor] = {}
    for key in task_vectors[0]:
        vecs = [tv[key] for tv in task_vectors]
        if not _is_matrix(key, vecs[0]):
            out[key] = _running_mean(vecs)
            continue
        r = min(vecs[0].shape)
        common, n_dims_per_task = iso_cts_dims_reference(r, T, common_space_fraction)
        combined_w = sum(vecs)
        u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
        common_u, common_s, common_v = u[:, :common], s[:common], v[:common, :]
        comb_u = comb_s = comb_v = None
        for i, w in enumerate(vecs):
            w_ts = w - common_u @ common_u.T @ w
            u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
            if i == 0:
                comb_u, comb_s, comb_v = torch.zeros_like(u_ts), torch.zeros_like(s_ts), torch.zeros_like(v_ts)
            comb_u[:, i * n_dims_per_task:(i + 1) * n_dims_per_task] = u_ts[:, :n_dims_per_task]
            comb_s[i * n_dims_per_task:(i + 1) * n_dims_per_task] = s_ts[:n_dims_per_task]
            comb_v[i * n_dims_per_task:(i + 1) * n_dims_per_task, :] = v_ts[:n_dims_per_task, :]
        lo = T * n_dims_per_task
        comb_u[:, lo:lo + common] = common_u
        comb_s[lo:lo + common] = common_s
        comb_v[lo:lo + common, :] = common_v
        uu, _, vu = torch.linalg.svd(comb_u, full_matrices=False)
        uv, _, vv = torch.linalg.svd(comb_v, full_matrices=False)
        comb_u, comb_v = uu @ vu, uv @ vv
        comb_s = torch.ones_like(comb_s) * comb_s.mean()
        out[key] = torch.linalg.multi_dot((comb_u, torch.diag(comb_s), comb_v))
    return out


def breadcrumbs_reference(task_vectors: TaskVectors, top_k_keep: float = 0.14, top_k_remove: float = 0.01,
                          *, ties_by_position: bool = False) -> dict[str, Tensor]:
    """Official Model Breadcrumbs loop (``TaskVectorMiddleKeep``, ``remove_first=True``, rezazzr/breadcrumbs
    src/task_vectors.py) followed by the sum of the masked task vectors (unscaled; ``apply_to`` adds
    ``alpha * sum``). Per tensor, along its last dimension: zero the ``int(d * top_k_remove)`` largest magnitudes
    with ``topk``, then keep the ``int(d * top_k_keep)`` largest of what is left; 0-d tensors are left as they are.
    Studio's ``beta = top_k_remove``, ``gamma = 1 - top_k_keep - top_k_remove``.

    ``topk`` orders exact ties arbitrarily, so parity with it needs tie-free magnitudes. Float32 task vectors of
    float32 checkpoints have ties (``expert - base`` is a multiple of the base's spacing: 2 of 768 entries of a row
    share a magnitude in the bench's experts, and a tie falls on a cut in some rows). ``ties_by_position=True``
    takes the ``n`` largest by a stable ascending sort instead (magnitude, then position: of equal magnitudes the
    later ones rank higher), the order :func:`studio.methods._sparsify.row_band_mask` ranks by, so that parity
    holds on any input. Only the rows where a run of equal magnitudes straddles a cut are sorted (elsewhere
    ``topk``'s set is the same), so the loop keeps the official code's speed.

    Example:
        >>> tv = [{"w": torch.tensor([[3.0, 1.0, 3.0, 2.0]])}]
        >>> breadcrumbs_reference(tv, top_k_keep=0.5, top_k_remove=0.25, ties_by_position=True)["w"].tolist()
        [[3.0, 0.0, 0.0, 2.0]]
    """
    def mask_top(x: Tensor, fraction: float, keep: bool) -> Tensor:
        if x.dim() == 0:
            return x
        a, d = x.abs(), x.shape[-1]
        n = int(d * fraction)
        if not (ties_by_position and 0 < n < d):
            _, idx = torch.topk(a, n)
        else:   # topk's set is the stable order's unless a run of equal magnitudes straddles the cut
            rows = a.reshape(-1, d)
            top, idx = torch.topk(rows, n + 1)
            idx = idx[:, :n].contiguous()
            tied = (top[:, n - 1] == top[:, n]).nonzero().flatten()
            if tied.numel():
                idx[tied] = torch.sort(rows[tied], dim=-1, stable=True).indices[:, d - n:]
            idx = idx.reshape(*x.shape[:-1], n)
        mask = (torch.zeros_like if keep else torch.ones_like)(x)
        mask.scatter_(x.dim() - 1, idx, 1.0 if keep else 0.0)
        return mask * x

    out: dict[str, Tensor] = {}
    for tv in task_vectors:
        for key, x in tv.items():
            masked = mask_top(mask_top(x, top_k_remove, keep=False), top_k_keep, keep=True)
            out[key] = masked if key not in out else out[key] + masked
    return out


def task_vectors_of(base: dict[str, Tensor], experts: dict[str, dict[str, Tensor]],
                    dtype: torch.dtype = torch.float64) -> TaskVectors:
    """``[theta_i - theta_pre]`` for the floating tensors, in expert order."""
    return [{k: sd[k].to(dtype) - base[k].to(dtype) for k in base if base[k].is_floating_point()}
            for sd in experts.values()]


def _on(device: "torch.device | str | None", experts: dict[str, dict[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    if device is None:
        return experts
    return {n: {k: v.to(device) for k, v in sd.items()} for n, sd in experts.items()}


# Slow, obviously-correct references timed by ``python -m studio.bench --reference`` (same experts, same run):
# name -> fn(base, experts, device) returning the unscaled merged task vector, as the official loops compute it
# (Breadcrumbs' exact ties ranked by position, as studio.merge ranks them: the loop's topk leaves them unordered).
REFERENCES = {
    "tsv_m": lambda base, experts, device=None: tsv_m_reference(
        task_vectors_of(_on(device, {"_": base})["_"], _on(device, experts), torch.float32)),
    "iso_c": lambda base, experts, device=None: iso_c_reference(
        task_vectors_of(_on(device, {"_": base})["_"], _on(device, experts), torch.float32)),
    "iso_cts": lambda base, experts, device=None: iso_cts_reference(
        task_vectors_of(_on(device, {"_": base})["_"], _on(device, experts), torch.float32)),
    "breadcrumbs": lambda base, experts, device=None: breadcrumbs_reference(
        task_vectors_of(_on(device, {"_": base})["_"], _on(device, experts), torch.float32), ties_by_position=True),
}
