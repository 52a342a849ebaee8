"""The benchmark harness runs (its timings are never asserted: only that it measures)."""

import json

import numpy as np
import pytest

import fastbn
from fastbn import bench
from fastbn.__main__ import main


def test_run_measures_every_op_and_floor():
    ops = list(bench.OPS) + ["train+relu", "eval:nhwc", "eval:fp16"]
    records = bench.run(shapes=[(4, 3, 8, 8), (64, 5)], ops=ops, threads=(1,), against=("numpy",),
                        budget=0.002)
    assert len(records) == 2 * len(ops)
    for r in records:
        assert r["times"]["fastbn"] > 0 and r["floor_s"] > 0
        assert r["passes"] == bench.passes(r["op"])
        if bench.split_op(r["op"])[1] is None:
            assert r["times"]["numpy"] > 0
    assert any(r["dtype"] == "float16" for r in records)
    text = bench.table(records, ("numpy",))
    assert "floor" in text and "vs numpy" in text


def test_floors_count_the_passes_a_fused_operation_needs():
    # eval reads x and writes y; the training forward reads x once more only from cache; the
    # backward adds reads of x and dy and a write of dx.
    assert bench.OPS == {"eval": 2, "train": 2, "train+backward": 5}
    assert bench.passes("train+backward:nhwc") == 5


def test_suite_covers_flat_small_and_batch_one_shapes():
    shapes = bench.SHAPES
    assert any(len(s) == 2 for s in shapes) and any(len(s) == 3 for s in shapes)  # (N, C), (N, C, L)
    assert any(len(s) == 4 and s[2:] == (1, 1) for s in shapes)                   # 1x1 planes
    assert any(s[0] == 1 for s in shapes)                                         # batch 1
    assert any(np.prod(s) * 4 <= 16 * 1024 for s in shapes)                       # small
    assert set(bench.QUICK_SHAPES) <= set(shapes)


def test_one_value_per_channel_is_timed_in_eval_only():
    records = bench.run(shapes=[(1, 6, 1, 1), (5, 4, 3)], ops=list(bench.OPS), threads=(1,),
                        against=("numpy",), budget=0.002)
    assert [(tuple(r["shape"]), r["op"]) for r in records] == (
        [((1, 6, 1, 1), "eval")] + [((5, 4, 3), op) for op in bench.OPS])


def test_peers_get_the_module_of_the_input_dimensions():
    torch = pytest.importorskip("torch")
    import fastbn
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    saved = fastbn.get_num_threads(), torch.get_num_threads()
    try:
        for op in bench.OPS:  # (N, C, L) data: BatchNorm1d in both
            bench.fastbn_case(op, x, x, 1)()
            bench.torch_case(op, x, x, 1)()
        assert torch.get_num_threads() == 1 and fastbn.get_num_threads() == 1
    finally:
        fastbn.set_num_threads(saved[0])
        torch.set_num_threads(saved[1])


def test_cli_bench_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--threads", "1", "--against", "numpy", "--shapes", "2,3,4,4",
                 "--ops", "eval,train", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fastbn" in out and "(2, 3, 4, 4)" in out
    data = json.loads(path.read_text())
    assert {r["op"] for r in data["records"]} == {"eval", "train"}


def test_cli_bench_runs_float64(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--threads", "1", "--against", "numpy", "--shapes", "2,3,4,4",
                 "--ops", "train,eval:fp16", "--dtype", "float64", "--json", str(path)]) == 0
    assert "dtype: float64" in capsys.readouterr().out
    dtypes = {r["op"]: r["dtype"] for r in json.loads(path.read_text())["records"]}
    assert dtypes == {"train": "float64", "eval:fp16": "float16"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cli_bench_runs_half_data_against_torch_on_the_same_dtype(dtype, tmp_path, capsys):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    against = "torch" if bench.peer_version("torch") else "numpy"
    path = tmp_path / "bench.json"
    assert main(["bench", "--threads", "1", "--against", against, "--shapes", "4,3,8,8;64,5",
                 "--ops", "eval,train,train+backward", "--dtype", dtype, "--json", str(path)]) == 0
    assert f"dtype: {dtype}" in capsys.readouterr().out
    records = json.loads(path.read_text())["records"]
    assert {r["dtype"] for r in records} == {dtype} and len(records) == 6
    for r in records:
        assert r["times"]["fastbn"] > 0 and r["bytes"] == 2 * int(np.prod(r["shape"]))
        assert "numpy" not in r["times"]  # plain numpy is timed on float32/float64 only
        if against == "torch":
            assert r["times"]["torch"] > 0


@pytest.mark.parametrize("argv", [["bench", "--threads", "0"], ["bench", "--against", "tensorflow"],
                                  ["bench", "--ops", "fly"], ["bench", "--shapes", "2,x"],
                                  ["bench", "--dtype", "int8"], ["bench", "--budget", "0"],
                                  ["bench", "--budget", "soon"]])
def test_cli_bench_rejects_bad_options(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_numpy_baseline_is_correct():
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float64)
    y, _, _ = bench.numpy_case("train", x, x, 1)()
    np.testing.assert_allclose(y.mean(axis=(0, 2)), 0, atol=1e-12)


def test_every_ratio_carries_its_rounds_and_noise_is_not_printed_as_a_result(monkeypatch):
    records = bench.run(shapes=[(4, 3, 8, 8)], ops=["eval"], threads=(1,), against=("numpy",),
                        budget=0.002)
    (record,) = records
    assert set(record["spreads"]) == {"fastbn", "numpy"} and set(record["ratio_spreads"]) == {"numpy"}
    assert set(record["ratios"]) == {"numpy"} and record["ratios"]["numpy"] > 0
    assert all(s >= 0 for s in record["spreads"].values())
    # the interquartile spread: one round out of line moves it little, a range would double
    assert bench.spread([1.0, 1.0, 1.0]) == 0 and bench.spread([1.0, 2.0, 1.5]) == pytest.approx(1 / 3)
    assert bench.spread([1.0] * 14 + [3.0]) == 0
    record["noisy"] = []
    assert "noisy" not in bench.table(records, ("numpy",)).split("\n")[2]
    record["noisy"] = ["numpy"]
    text = bench.table(records, ("numpy",))
    assert text.split("\n")[2].rstrip().endswith("noisy")
    assert "noisy: 1 of 1 ratios" in text and "numpy runs on one" in text


def test_rounds_alternate_their_order_and_the_speedup_is_the_median_of_their_ratios(monkeypatch):
    # Each round runs every implementation once, the order reversed every other round.
    calls = []
    clock = {"now": 0.0}
    cost = {"fastbn": 1.0, "peer": 2.0}

    def timed(name):
        def fn():
            calls.append(name)
            # the first round's two calls (after two warm-up calls each) are three times slower
            clock["now"] += cost[name] * (3.0 if len(calls) in (5, 6) else 1.0)
        return fn

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])
    rounds = bench.round_times({"fastbn": timed("fastbn"), "peer": timed("peer")}, budget=1e-9,
                               rounds=4, min_repeats=1)
    assert calls[4:] == ["fastbn", "peer", "peer", "fastbn", "fastbn", "peer", "peer", "fastbn"]
    assert rounds["fastbn"] == [3.0, 1.0, 1.0, 1.0] and rounds["peer"] == [6.0, 2.0, 2.0, 2.0]

    # The speed-up printed is the median of the per-round ratios, which differs here from the
    # ratio of the median times (a slow spell that falls on both blocks of a round moves the
    # times, not the ratio): fastbn [1, 2, 3] and numpy [3, 4, 3] give ratios [3, 2, 1],
    # median 2, where the medians' ratio is 3 / 2.
    monkeypatch.undo()
    fake = {"fastbn": [1.0, 2.0, 3.0], "numpy": [3.0, 4.0, 3.0], "(copy)": [1.0] * 3,
            "(stream copy)": [1.0] * 3}
    monkeypatch.setattr(bench, "round_times", lambda fns, budget, min_repeats=3: {
        name: fake[name] for name in fns})
    (record,) = bench.run(shapes=[(4, 3, 8, 8)], ops=["eval"], threads=(1,), against=("numpy",),
                          budget=0.002)
    assert record["times"] == {"fastbn": 2.0, "numpy": 3.0}
    assert record["ratios"] == {"numpy": 2.0} and bench.speedup(record, "numpy") == 2.0
    assert record["ratio_spreads"]["numpy"] == pytest.approx(0.5)  # (2.5 - 1.5) / 2
    assert record["noisy"] == ["numpy"]
    fake["numpy"] = [2.0, 4.0, 6.0]  # the same ratio in every round: not noisy
    (record,) = bench.run(shapes=[(4, 3, 8, 8)], ops=["eval"], threads=(1,), against=("numpy",),
                          budget=0.002)
    assert record["ratios"] == {"numpy": 2.0} and record["noisy"] == []
    assert bench.format_row(record, ["numpy"]).rstrip().endswith("2.00x")
    # records from before the per-round ratios were kept: the ratio of the median times
    assert bench.speedup(dict(times={"fastbn": 1.0, "peer": 4.0}), "peer") == 4.0


def test_bench_warns_when_the_machine_is_busy(monkeypatch, capsys):
    monkeypatch.setattr(bench, "machine_load", lambda: 1.5)
    bench.main(threads=(1,), against=("numpy",), shapes=[(2, 3, 4, 4)], ops=["eval"])
    assert "WARNING: this machine is busy" in capsys.readouterr().out
    monkeypatch.setattr(bench, "machine_load", lambda: 0.0)
    bench.main(threads=(1,), against=("numpy",), shapes=[(2, 3, 4, 4)], ops=["eval"])
    assert "WARNING" not in capsys.readouterr().out


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("nbytes", [0, 1, 31, 32, 33, 4095, 300_001, 1 << 20])
def test_parallel_copy_copies_every_byte(nbytes, streaming):
    """The floors' copies, with ordinary and streaming stores, at every alignment of either
    end and on 1 to 3 threads; a build without streaming stores refuses the second."""
    from fastbn._dispatch import kernels
    if streaming and not kernels.stream_stores():
        with pytest.raises(ValueError, match="streaming"):
            kernels.parallel_copy(np.zeros(8, np.uint8), np.zeros(8, np.uint8), 1, True)
        return
    src = np.random.default_rng(nbytes).integers(0, 256, nbytes + 64, dtype=np.uint8)
    for start in (0, 1, 7, 32):
        for threads in (1, 2, 3):
            dst = np.zeros(nbytes + 64, np.uint8)
            kernels.parallel_copy(src[start:start + nbytes], dst[32 - start // 2:][:nbytes],
                                  threads, streaming)
            np.testing.assert_array_equal(dst[32 - start // 2:][:nbytes], src[start:start + nbytes])
            assert not dst[:32 - start // 2].any() and not dst[32 - start // 2 + nbytes:].any()


def test_held_floor_counts_a_streaming_copy_per_streamed_output():
    assert bench.held_floor(1.0, 0.5, 2, 0) == 1.0    # eval into ordinary stores: one copy
    assert bench.held_floor(1.0, 0.5, 2, 1) == 0.5    # ... into streaming ones: one streaming copy
    assert bench.held_floor(1.0, 0.5, 5, 1) == 2.0    # train+backward, forward streamed: 1.5 + 0.5
    assert bench.held_floor(1.0, None, 2, 1) == 1.0   # (a build without them)


def test_rows_are_held_to_the_floor_of_the_stores_fastbn_uses():
    """A float32 output at least _tuning.stream_min_bytes long (planar runs, or the rows of
    the columns layout) is written with streaming stores, and bench holds that row to the
    streaming copy; half data and the fused passes (off here, whose channels stay in cache)
    use ordinary stores."""
    from fastbn import _tuning
    from fastbn._dispatch import kernels
    try:
        _tuning.set_stream_min_bytes(0)
        _tuning.set_fusion(False)
        records = bench.run(shapes=[(2, 3, 40, 40), (64, 5)], ops=list(bench.OPS) + ["eval:fp16"],
                            threads=(1,), against=("numpy",), budget=0.002)
    finally:
        _tuning.set_stream_min_bytes(None)
        _tuning.set_fusion(True)
    streams = kernels.stream_stores()
    got = {(tuple(r["shape"]), r["op"]): r for r in records}
    for (shape, op), r in got.items():
        want = (1 if op != "eval:fp16" else 0) if streams else 0  # (both shapes' float32)
        assert r["streamed_outputs"] == want, (shape, op)
        assert r["ordinary_floor_s"] == pytest.approx(r["copy_s"] * r["passes"] / 2)
        assert (r["stream_floor_s"] is None) == (not streams)
        assert r["floor_s"] == pytest.approx(bench.held_floor(
            r["copy_s"], r["stream_copy_s"], r["passes"], r["streamed_outputs"]))
        cells = bench.floor_cells(r, r["times"]["fastbn"])
        marked = [c.endswith("*") for c in cells]
        if not r["streamed_outputs"]:
            assert marked == [True, False]
        elif op in ("eval", "train"):
            assert marked == [False, True]
        else:  # the training forward streamed, grad_input not: held to neither column
            assert marked == [False, False]
    assert "nt fl" in bench.table(records, ("numpy",))


def test_compare_builds_times_both_builds_row_by_row(capsys):
    """benchmarks/compare_builds.py loads two builds' kernels into one process and alternates
    them (here this checkout against itself); a shape with one value per channel is skipped."""
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "compare_builds", os.path.join(root, "benchmarks", "compare_builds.py"))
    compare_builds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_builds)
    compare_builds.main([root, "--after", root, "--threads", "1", "2", "--rounds", "2",
                         "--shapes", "4,3,5;1,6", "--dtypes", "float32,float16,float64"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (")]
    assert len(rows) == 3 * 2 * len(compare_builds.OPS)  # dtypes x threads x operations, (1, 6) skipped
    assert {row.split("|")[3].strip() for row in rows} == {"eval", "train", "backward",
                                                           "eval-backward"}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[0] == "(4, 3, 5)" and cells[2] in compare_builds.OPS
        assert float(cells[4]) > 0 and float(cells[5]) > 0 and float(cells[6].split()[0]) > 0
    with pytest.raises(SystemExit, match="no _kernels"):
        compare_builds.load_kernels(os.path.join(root, "tests"), "nowhere", "_kernels")


def test_fusion_grid_times_fused_and_unfused_and_restores_the_switches(capsys):
    """benchmarks/fusion_grid.py times every (dtype, channel size, segments) case and every
    tile size fused and unfused and leaves fusion, the fusion limits and the thread count as
    they were."""
    import importlib.util
    import os
    from fastbn import _tuning
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "fusion_grid", os.path.join(root, "benchmarks", "fusion_grid.py"))
    fusion_grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fusion_grid)
    threads = fastbn.get_num_threads()
    # (not a default: the grid must restore these values)
    odd = {"channel_bytes": 12345, "short_piece_bytes": 678, "short_pieces_array_bytes": 91,
           "tile_bytes": 54321, "serial_tile_bytes": 9012, "serial_tile_array_bytes": 345}
    _tuning.set_fusion_limits(odd)
    try:
        fusion_grid.main(["--threads", "1", "--total-kib", "8", "--rounds", "1",
                          "--dtypes", "float32"])
        assert _tuning.current_fusion_limits() == odd
    finally:
        _tuning.set_fusion_limits(None)
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if " KiB in " in line]
    expected = [(kib, segments) for kib in fusion_grid.KIB for segments in fusion_grid.SEGMENTS
                if kib * 1024 // (segments * 4) >= fusion_grid.MIN_RUN]
    assert len(rows) == len(expected)
    for row, (kib, segments) in zip(rows, expected):
        words = row.split()
        assert words[2] == str(kib) and words[5] == str(segments)
        assert float(words[words.index("forward") + 1]) > 0
        assert float(words[words.index("backward") + 1]) > 0
    tiles = [line for line in lines if " KiB of " in line]
    assert len(tiles) == len(fusion_grid.TILE_ROWS)
    for row, n_rows in zip(tiles, fusion_grid.TILE_ROWS):
        words = row.split()
        assert words[1] == "tile" and words[2] == str(n_rows * fusion_grid.TILE * 4 // 1024)
        assert words[5] == str(n_rows)
        assert float(words[words.index("forward") + 1]) > 0
        assert float(words[words.index("backward") + 1]) > 0
    assert _tuning.fusion_is_enabled()
    assert fastbn.get_num_threads() == threads
    # a case the kernels would not fuse even with every limit lifted is said, not timed: four
    # tiles for two threads (fewer than four a thread)
    fastbn.set_num_threads(2)
    _tuning.set_fusion_limits(fusion_grid.LIFTED)
    try:
        row = fusion_grid.unfused_over_fused(np.random.default_rng(0), np.dtype(np.float32),
                                             (1024, 1024), 1)
    finally:
        _tuning.set_fusion_limits(None)
        fastbn.set_num_threads(threads)
    assert "not fused on 2 thread(s)" in row


def test_column_loops_builds_and_measures(tmp_path):
    # benchmarks/column_loops.c (the columns layout's loops alone, in C: RESULTS.md's tables on
    # register-blocked tiles and rows four at a time) compiles without warnings for AVX2 and
    # AVX-512, and runs every loop where this CPU has AVX2.
    import os
    import platform
    import shutil
    import subprocess
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs a C compiler for x86-64")
    source = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "column_loops.c")
    if not os.path.exists(source):
        pytest.skip("benchmarks/column_loops.c is not here (the sdist ships no C)")
    for name, flags in (("avx2", ["-mavx2", "-mfma"]),
                        ("avx512", ["-mavx512f", "-mavx512vl", "-mfma"])):
        binary = tmp_path / name
        result = subprocess.run([compiler, "-O3", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
                                 *flags, "-o", str(binary), source],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    from fastbn import _cpu
    if "avx2" not in _cpu.supported_simd_levels():
        pytest.skip("this CPU lacks AVX2")
    run = subprocess.run([str(tmp_path / "avx2"), "64", "256", "4", "64"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "moments, 8-row sweeps", "moments, strips", "moments, strips + prefetch",
        "affine, one row", "affine, four rows", "copy"]
    assert all(float(line.split()[-6]) > 0 and float(line.split()[-4]) > 0 for line in lines)
    bad = subprocess.run([str(tmp_path / "avx2"), "16", "100"], capture_output=True, text=True)
    assert bad.returncode == 2 and "multiple of 256" in bad.stderr
