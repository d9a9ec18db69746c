"""The benchmark command runs end to end (small real open_clip shapes) for any task count, and prints its table."""

from __future__ import annotations

import os
import re

import pytest
import torch

from studio import bench
from studio.schema import StudioError


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
    assert "svc.alpha=0.1" in rows["task_arithmetic+svc"]   # a calibration's change: twice its automatic 1/T
    for line in rows.values():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert len(cells) == 11
        assert 0 < float(cells[1]) < 60
        assert cells[8] == cells[9] == "-"                           # no --peer
        assert cells[10] == "-" or 0 <= float(cells[10]) <= 100       # CPU steal %, where /proc/stat reports it
    # the page faults of each reported structural change, for the rows that have one
    faults = next(x for x in out.splitlines() if x.startswith("# pages faulted in during the reported structural"))
    found = {name: (float(pages), float(system_s)) for name, pages, system_s in
             re.findall(r"([a-z_+]+) ([0-9.]+) thousand \(([0-9.]+) s\)", faults.split("): ", 1)[1])}
    assert set(found) == {"ties", "tsv_m", "iso_cts", "task_arithmetic+svc"}, faults


def test_bench_times_the_evaluation_of_a_merged_minisuite_model(capsys):
    import torch

    threads = torch.get_num_threads()
    try:   # --threads holds for --evaluate too (it returned before setting them: an audit)
        torch.set_num_threads(2)
        bench.main(["--evaluate", "--device", "cpu", "--repeat", "1", "--methods", "tsv_m", "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
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
    with pytest.raises(SystemExit, match=r"x 100000 experts do not fit .* in bfloat16 .*; give fewer --tasks, "
                                         r"or --experts-dir to merge them from files"):
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


@pytest.mark.parametrize("args,message", [
    (["--methods", "nosuch", "ties+nope"], r"--methods: unknown row\(s\) 'nosuch', 'ties\+nope'; a row is a method "
                                           r"\(align_merge_b, .*\), or method\+calibration \(align_merge_b, svc\)"),
    (["--device", "mps"], r"--device must be cpu, cuda, cuda:N or all, got 'mps'"),
    (["--threads", "-1"], r"--threads must be 0 \(torch's default\) or a number of threads, got -1"),
    (["--suite", "x"], r"--suite is read only with --evaluate"),
    # an audit of the bench: the merge table's options were ignored by --evaluate, and a bare --methods ran every row
    (["--evaluate", "--peer"], r"--evaluate times the evaluation of one merged model on a suite \(.*\); --model, "
                               r"--tasks, --peer are read only by the merge table"),
    (["--methods"], r"argument --methods: expected at least one argument"),
])
def test_bad_options_are_refused_before_anything_runs(capsys, args, message):
    """They printed an empty table and exited 0 (--methods, --device), or ended in a traceback (--threads)."""
    with pytest.raises(SystemExit) as exit_:
        bench.main([*args, "--model", "MiniCLIP-ViT", "--tasks", "2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_cuda_without_a_gpu_and_an_unknown_model_are_named(capsys):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.main(["--device", "cuda", "--model", "MiniCLIP-ViT"])
        assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:   # a usage error, exit code 2, as argparse's own
        bench.main(["--model", "Nope", "--device", "cpu"])
    assert exit_.value.code == 2 and re.search(r"error: --model: unknown open_clip model 'Nope'; e\.g\. ViT-B-32",
                                               capsys.readouterr().err)
    with pytest.raises(SystemExit, match=r"--evaluate: suite source '.*nowhere' is neither an existing folder"):
        bench.main(["--evaluate", "--device", "cpu", "--suite", "/nowhere"])


def test_rows_come_in_the_order_given_and_any_calibration_composes(capsys):
    bench.main(["--model", "MiniCLIP-ViT", "--tasks", "2", "--device", "cpu", "--no-warm-up",
                "--methods", "tsv_m", "ties+svc", "task_arithmetic", "tsv_m"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert rows == ["tsv_m", "ties+svc", "task_arithmetic"], out
    assert "2 experts (float32)" in out and re.search(r"(\b1 merge worker|\b([02-9]|\d\d+) merge workers);", out), out
    assert re.search(r"## device: cpu \(.+, with(out)? AVX-512\)", out), out


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


def test_experts_on_disk_are_the_same_draws_in_shards_read_from_their_files(tmp_path):
    """``--experts-dir``: the pool is written as Hugging Face sharded checkpoints, one pending shard per expert at a
    time, and read back through ``studio.io`` (memory-mapped): the same tensors as the in-memory pool."""
    import torch

    from studio import io

    shapes = bench.clip_visual_shapes("MiniCLIP-ViT")
    base, experts, wrote = bench.synthetic_pool_on_disk(tmp_path, shapes, 3, shard_bytes=200_000)
    assert wrote is not None
    files = io.checkpoint_files(tmp_path / "task01")
    assert len(files) > 2 and all(f.name.startswith("model-") for f, _ in files)
    assert (tmp_path / "task01" / io.SHARD_INDEX).is_file() and len(io.checkpoint_files(tmp_path / "base")) == 1
    same_base, same = bench.synthetic_pool(shapes, 3)
    assert list(experts) == ["task00", "task01", "task02"] and all(list(e) == list(shapes) for e in experts.values())
    assert all(torch.equal(base[k], same_base[k]) for k in shapes)
    assert all(torch.equal(experts[n][k], same[n][k]) for n in same for k in shapes)
    # the safetensors files themselves back the tensors (safetensors maps them): nothing was copied to the heap
    key = max(shapes, key=lambda k: torch.Size(shapes[k]).numel())
    maps = open("/proc/self/maps").read()
    address = experts["task02"][key].data_ptr()
    mapped = [line for line in maps.splitlines()
              if int(line.split()[0].split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16)]
    assert mapped and str(tmp_path / "task02") in mapped[0]


def test_an_experts_folder_is_reused_rewritten_or_refused(tmp_path):
    """Only a folder this bench marked as its own (its manifest, written before anything else) is ever emptied: a
    folder of a user's own ``task01``, without the manifest, is refused untouched."""
    import json

    shapes = {"visual.w": (6, 4), "visual.b": (6,)}
    folder = tmp_path / "pool"
    bench.synthetic_pool_on_disk(folder, shapes, 3)
    stamp = (folder / "task02" / "model.safetensors").stat().st_mtime_ns
    assert bench.synthetic_pool_on_disk(folder, shapes, 3)[2] is None                 # the same pool: reused
    assert (folder / "task02" / "model.safetensors").stat().st_mtime_ns == stamp
    _, experts, wrote = bench.synthetic_pool_on_disk(folder, shapes, 2)             # another pool: rewritten
    assert wrote is not None and sorted(p.name for p in folder.iterdir()) == [
        "base", bench.POOL_MANIFEST, "task00", "task01"]
    manifest = folder / bench.POOL_MANIFEST
    assert bench.synthetic_pool_on_disk(folder, shapes, 2, shard_bytes=64)[2] is not None   # other shards: rewritten
    unfinished = json.loads(manifest.read_text())
    assert unfinished.pop("complete") is True
    manifest.write_text(json.dumps({**unfinished, "complete": False}))               # interrupted: rewritten
    assert bench.synthetic_pool_on_disk(folder, shapes, 2, shard_bytes=64)[2] is not None
    (folder / "notes.txt").write_text("mine")                                      # not ours: refused, untouched
    with pytest.raises(StudioError, match=r"holds files this bench did not write \(notes.txt\); give an empty"):
        bench.synthetic_pool_on_disk(folder, shapes, 5)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "task01").is_dir()

    mine = tmp_path / "mine"                                  # a user's folder named like ours, without the manifest
    (mine / "task01").mkdir(parents=True)
    (mine / "task01" / "finetuned.safetensors").write_bytes(b"weights")
    (mine / "base").symlink_to(tmp_path / "pool" / "base")
    with pytest.raises(StudioError, match=r"holds files this bench did not write \(base\)"):
        bench.synthetic_pool_on_disk(mine, shapes, 2)
    (mine / "base").unlink()
    with pytest.raises(StudioError, match=r"holds files this bench did not write \(task01\).*with its "
                                          r"synthetic-pool.json"):
        bench.synthetic_pool_on_disk(mine, shapes, 2)
    assert (mine / "task01" / "finetuned.safetensors").read_bytes() == b"weights"
    with pytest.raises(StudioError, match=r"is a file; give a folder"):
        bench.synthetic_pool_on_disk(mine / "task01" / "finetuned.safetensors", shapes, 2)


def test_the_bench_merges_experts_from_a_folder_and_says_what_it_read(tmp_path, capsys):
    bench.main(["--model", "MiniCLIP-ViT", "--tasks", "3", "--device", "cpu", "--methods", "tsv_m", "ties",
                "--experts-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"3 experts (float32); written to {tmp_path} as safetensors checkpoints in " in out
    assert re.search(r"# read from storage during the reported cold merges .*: tsv_m [0-9.]+ GiB; ties [0-9.]+ GiB",
                     out)
    bench.main(["--model", "MiniCLIP-ViT", "--tasks", "3", "--device", "cpu", "--methods", "tsv_m",
                "--experts-dir", str(tmp_path)])
    assert f"reused from {tmp_path} as safetensors checkpoints, merged from their memory-mapped files" in \
        capsys.readouterr().out
    # a reused pool whose file was damaged since: named, with what to do
    shard = tmp_path / "task01" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=rf"--experts-dir: {re.escape(str(tmp_path))} holds a damaged pool \(.*"
                                         r"task01/model.safetensors: not a readable safetensors file .*\); empty the "
                                         r"folder to write it again"):
        bench.main(["--model", "MiniCLIP-ViT", "--tasks", "3", "--device", "cpu", "--experts-dir", str(tmp_path)])
    # a pool larger than the file system: refused before anything is written
    with pytest.raises(SystemExit, match=r"take [0-9.]+ GiB in float32, and the file system of .*huge has [0-9.]+ "
                                         r"GiB free; give a folder on a larger file system, fewer --tasks or "
                                         r"--dtype bfloat16"):
        bench.main(["--model", "ViT-L-14", "--tasks", "100000", "--device", "cpu", "--experts-dir",
                    str(tmp_path / "huge")])
    assert not (tmp_path / "huge").exists()


def test_a_pool_write_that_fails_midway_says_why_and_is_written_again(tmp_path, monkeypatch):
    """A write that fails (here the third file: no space left) leaves the folder marked unfinished, never reused;
    the next call writes it again."""
    import errno
    import json

    import torch

    from studio import io

    shapes = {"visual.w": (6, 4), "visual.b": (6,)}
    save = io.save_state_dict
    calls = []

    def failing(path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise io.CheckpointError(f"cannot write {path}: {os.strerror(errno.ENOSPC)}")
        return save(path, *a, **k)

    monkeypatch.setattr(io, "save_state_dict", failing)
    with pytest.raises(StudioError, match=rf"writing the pool to {re.escape(str(tmp_path))} failed: cannot write "
                                          r".*task01/model.safetensors: No space left on device; free space or give "
                                          r"another folder"):
        bench.synthetic_pool_on_disk(tmp_path, shapes, 3)
    assert json.loads((tmp_path / bench.POOL_MANIFEST).read_text())["complete"] is False
    monkeypatch.setattr(io, "save_state_dict", save)
    base, experts, wrote = bench.synthetic_pool_on_disk(tmp_path, shapes, 3)
    assert wrote is not None and json.loads((tmp_path / bench.POOL_MANIFEST).read_text())["complete"] is True
    _, same = bench.synthetic_pool(shapes, 3)
    assert all(torch.equal(experts[n][k], v) for n, e in same.items() for k, v in e.items())


def test_reference_rows_report_their_difference_to_the_reference_merge(capsys):
    """--reference times the official-code-style loops and, in the same run, compares their merges with ours."""
    bench.main(["--model", "MiniCLIP-ViT", "--tasks", "3", "--device", "cpu", "--no-warm-up", "--reference",
                "--methods", "tsv_m", "iso_c", "breadcrumbs", "ties"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("# largest difference to the reference's merge"))
    found = dict(re.findall(r"(\w+) ([0-9.]+e[-+]\d+)", line.split("):", 1)[1]))
    assert set(found) == {"tsv_m", "iso_c", "breadcrumbs"}, line   # ties has no reference
    assert all(float(v) < 1e-3 for v in found.values()), line


def test_reference_difference_is_measured_against_the_unscaled_merge():
    base = {"w": torch.full((3,), 0.5)}
    ref = {"w": torch.tensor([1.0, -2.0, 4.0])}
    merged = {"w": base["w"] + 1.3 * ref["w"]}   # iso_c's default alpha is 1.3
    assert bench.reference_difference(merged, base, "iso_c", ref) < 1e-7
    merged["w"][2] += 1.3 * 0.4   # 0.4 off on the largest entry, 4: 10%
    assert bench.reference_difference(merged, base, "iso_c", ref) == pytest.approx(0.1, rel=1e-5)
