"""The benchmark command runs end to end (small real open_clip shapes) for any task count, and prints its table."""

from __future__ import annotations

import re

import pytest

from studio import bench


def test_bench_runs_every_default_row_on_a_small_model_with_many_tasks(capsys):
    # 20 tasks: the structural changes must stay valid (TSV-M's rank fraction has to stay <= 1/T).
    # --malloc default: the kept-memory policy is process-wide, so it is probed in a fresh interpreter (test_memory)
    bench.main(["--model", "MiniCLIP-ViT", "--tasks", "20", "--device", "cpu", "--threads", "2", "--repeat", "2",
                "--methods", "ties", "tsv_m", "iso_cts", "task_arithmetic+svc", "--malloc", "default"])
    out = capsys.readouterr().out
    assert "MiniCLIP-ViT visual tower" in out and "20 experts" in out and "fastest of 2 runs" in out
    assert "malloc default" in out
    warm = re.search(r"Warm-up before the table: every row's merge once on ([0-9]+) tensors", out)
    assert warm and 0 < int(warm.group(1)) < len(bench.clip_visual_shapes("MiniCLIP-ViT"))
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if re.match(r"\| [a-z_+]+ \| [0-9.]+ ", line)}
    assert set(rows) == {"ties", "tsv_m", "iso_cts", "task_arithmetic+svc"}
    assert "rank_fraction=0.04" in rows["tsv_m"]
    for line in rows.values():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert len(cells) == 11
        assert 0 < float(cells[1]) < 60
        assert cells[8] == cells[9] == "-"                           # no --peer
        assert cells[10] == "-" or 0 <= float(cells[10]) <= 100       # CPU steal %, where /proc/stat reports it


def test_bench_times_the_evaluation_of_a_merged_minisuite_model(capsys):
    bench.main(["--evaluate", "--device", "cpu", "--repeat", "1", "--methods", "tsv_m"])
    out = capsys.readouterr().out
    assert re.search(r"merge tsv_m: [0-9.]+ s", out) and "first evaluation" in out
    assert re.search(r"evaluate one merged model on 8 tasks \(2400 test images\): [0-9.]+ s; avg acc [0-9.]+", out)


def test_bench_refuses_a_pool_that_does_not_fit_before_building_it():
    """Building more experts than memory holds ended with the kernel killing the process (20 ViT-L/14 experts in
    float32 take 24 GB); the bench says so first, with the dtype that fits where one does."""
    import pytest
    import torch

    available = bench._memory_available()
    if available is None:
        pytest.skip("no MemAvailable in /proc/meminfo")
    nparams = sum(torch.Size(s).numel() for s in bench.clip_visual_shapes("ViT-B-32").values())
    merges = bench.MERGE_MODEL_COPIES * nparams * 4
    # about 1.5x memory in float32, 0.75x in bfloat16
    tasks = int(0.75 * (available - merges) / (bench.POOL_FACTOR * 2 * nparams))
    with pytest.raises(SystemExit, match=rf"ViT-B-32 x {tasks} experts do not fit .* in float32 .* --dtype bfloat16 "
                                         r"needs about [0-9.]+ GiB"):
        bench.main(["--model", "ViT-B-32", "--tasks", str(tasks), "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"x 100000 experts do not fit .* in bfloat16 .*; give fewer --tasks"):
        bench.main(["--model", "ViT-B-32", "--tasks", "100000", "--dtype", "bfloat16", "--device", "cpu"])


@pytest.mark.parametrize("flag,message", [
    ("--host-eigh-max", "--host-eigh-max must be 0 (every eigensolve on the GPU) or more, got -1"),
    ("--batched-eigh-max", "--batched-eigh-max must be 0 (no batched eigensolves) or more, got -1"),
])
def test_a_negative_eigh_limit_is_refused_before_anything_runs(capsys, flag, message):
    with pytest.raises(SystemExit) as exit_:
        bench.main([flag, "-1", "--device", "cpu"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_warm_up_merges_one_tensor_of_each_shape_and_can_be_left_out(capsys, monkeypatch):
    shapes = bench.clip_visual_shapes("MiniCLIP-ViT")
    seen = []
    merge_pool = bench.engine.merge_pool
    monkeypatch.setattr(bench.engine, "merge_pool", lambda pool, *a, **k: seen.append(pool.keys) or merge_pool(
        pool, *a, **k))
    bench.main(["--model", "MiniCLIP-ViT", "--tasks", "3", "--device", "cpu", "--methods", "tsv_m"])
    warm = seen[0]   # the warm-up's pool comes first, then the row's own (every key)
    assert sorted({tuple(shapes[k]) for k in warm}) == sorted(set(map(tuple, shapes.values())))
    assert len(warm) == len({tuple(shapes[k]) for k in warm}) and seen[1] == list(shapes)
    seen.clear()
    bench.main(["--model", "MiniCLIP-ViT", "--tasks", "3", "--device", "cpu", "--methods", "tsv_m", "--no-warm-up"])
    assert "Warm-up" not in capsys.readouterr().out.split("## device")[-1] and seen[0] == list(shapes)
