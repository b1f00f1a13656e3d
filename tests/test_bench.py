"""`fastgrpo bench` on CPU: the grid, the recipe config per framework, the statistics, the table and chart on
synthetic results, and one real tiny cell per framework in its own worker process (TRL's only when trl imports)."""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest

from fastgrpo import bench, bench_report, bench_server


def _args(*argv: str):
    return bench.build_parser().parse_args(list(argv))


def _inputs(tmp_path) -> list[str]:
    """--model and --data that pass check_inputs (a folder with a config.json, one NuminaMath-schema row)."""
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text(json.dumps({"problem": "1+1?", "solution": "2", "messages": []}) + "\n")
    return ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl")]


def test_parse_grid_default_and_order():
    cells = bench.parse_grid(_args())
    assert len(cells) == 3 * 3 * 4  # G x L x {fastgrpo, trl} x {colocate, novllm}
    assert [bench.cell_key(c) for c in cells[:4]] == ["fastgrpo-colocate-G4-L256", "fastgrpo-novllm-G4-L256",
                                                      "trl-colocate-G4-L256", "trl-novllm-G4-L256"]
    assert {c["steps"] for c in cells} == {12} and {c["completions_per_step"] for c in cells} == {128}


def test_parse_grid_async_vllm_alone_and_errors():
    cells = bench.parse_grid(_args("--modes", "colocate,async,novllm", "--num-generations", "8",
                                   "--max-completion-length", "512", "--vllm-alone", "--extra", '{"seed": 1}'))
    keys = [bench.cell_key(c) for c in cells]
    assert keys == ["fastgrpo-colocate-G8-L512", "fastgrpo-async-G8-L512", "fastgrpo-novllm-G8-L512",
                    "trl-colocate-G8-L512", "trl-novllm-G8-L512", "vllm-alone-G8-L512"]  # TRL has no async
    assert all(c["extra"] == {"seed": 1} for c in cells)
    only = bench.parse_grid(_args("--only", "trl-colocate,vllm-alone,fastgrpo-async", "--num-generations", "8,16",
                                  "--max-completion-length", "512"))
    assert [bench.cell_key(c) for c in only] == ["trl-colocate-G8-L512", "vllm-alone-G8-L512", "fastgrpo-async-G8-L512",
                                                 "trl-colocate-G16-L512", "vllm-alone-G16-L512", "fastgrpo-async-G16-L512"]
    bracket = bench.parse_grid(_args("--only", "vllm-alone,fastgrpo-async,vllm-alone", "--num-generations", "8",
                                     "--max-completion-length", "512"))
    assert [bench.cell_key(c) for c in bracket] == ["vllm-alone-G8-L512", "fastgrpo-async-G8-L512", "vllm-alone-G8-L512"]
    assert bracket[0] is not bracket[2]
    turns = bench.parse_grid(_args("--only", "vllm-alone,fastgrpo-async,vllm-alone,fastgrpo-async,vllm-alone",
                                   "--num-generations", "8", "--max-completion-length", "512"))
    assert [c["framework"] for c in turns] == ["vllm", "fastgrpo", "vllm", "fastgrpo", "vllm"]
    for bad in (["--only", "trl-async"], ["--only", "fastgrpo"], ["--frameworks", "verl"], ["--modes", "sync"], ["--num-generations", "3"],
                ["--per-device-batch", "6"], ["--only", "fastgrpo-async,fastgrpo-asyn"], ["--only", ","]):
        with pytest.raises(ValueError):
            bench.parse_grid(_args(*bad))


def test_recipe_config_per_framework():
    for g in (4, 8, 16):
        cell = bench.parse_grid(_args("--num-generations", str(g), "--max-completion-length", "256"))[0]
        c = bench.recipe_config(cell, "fastgrpo", cuda=True)
        assert c["per_device_train_batch_size"] * c["gradient_accumulation_steps"] == 128
        assert (c["num_generations"], c["max_completion_length"], c["max_prompt_length"]) == (g, 256, 512)
        assert c["use_vllm"] and c["vllm_gpu_memory_utilization"] == 0.3 and c["bf16"] and not c["async_generation"]
    cell = dict(bench.parse_grid(_args("--modes", "async"))[0], extra={"learning_rate": 3e-5})
    c = bench.recipe_config(cell, "fastgrpo", cuda=False)
    assert c["async_generation"] and c["use_vllm"] and c["learning_rate"] == 3e-5 and c["bf16"] is False
    trl = bench.recipe_config(dict(cell, mode="novllm"), "trl", cuda=True)
    assert "max_prompt_length" not in trl and "async_generation" not in trl and not trl["use_vllm"]
    assert (trl["save_strategy"], trl["report_to"], trl["logging_steps"]) == ("no", "none", 1)


def test_server_modes_grid_config_and_commands():
    only = bench.parse_grid(_args("--only", "fastgrpo-server,trl-server,fastgrpo-server-async,trl-server-async",
                                  "--num-generations", "8", "--max-completion-length", "512"))
    assert [c["mode"] for c in only] == ["server", "server", "server-async", "server-async"]
    cell = dict(only[2], server_port=8123, group_port=51999)
    c = bench.recipe_config(cell, "fastgrpo", cuda=True)
    assert (c["vllm_mode"], c["async_generation"], c["vllm_server_port"], c["vllm_group_port"]) == ("server", True, 8123, 51999)
    trl = bench.recipe_config(dict(only[1], server_port=8124, group_port=52000), "trl", cuda=True)
    assert (trl["vllm_mode"], trl["vllm_server_host"], trl["vllm_server_port"]) == ("server", "127.0.0.1", 8124)
    assert bench.recipe_config(only[0], "fastgrpo", cuda=True)["async_generation"] is False
    # each framework's own launcher, same memory and context length
    ours = bench_server.server_command("fastgrpo", "/m", 8123, 0.9, 1024)
    theirs = bench_server.server_command("trl", "/m", 8124, 0.9, 1024)
    assert ours[1:4] == ["-m", "fastgrpo.cli", "vllm-serve"] and theirs[1:3] == ["-m", "trl.scripts.vllm_serve"]
    flags = ["--model", "/m", "--host", "127.0.0.1", "--port", "{}", "--gpu-memory-utilization", "0.9",
             "--max-model-len", "1024"]
    assert ours[4:] == [f.format(8123) for f in flags] and theirs[3:] == [f.format(8124) for f in flags]


def test_server_that_dies_fails_the_cell_with_its_log(tmp_path):
    """No vLLM on this machine: the launched server exits at once and the cell says so (with the log's tail) instead
    of waiting for the start-up timeout."""
    spec = {"framework": "fastgrpo", "model": str(tmp_path / "no-model"), "out_dir": str(tmp_path), "server_gpus": ""}
    with pytest.raises(RuntimeError, match="exited with code"):
        with bench_server.serving(spec, 1024):
            pass
    assert (tmp_path / "server.log").exists()


def test_step_stats_leaves_out_the_first_step():
    s = bench.step_stats([30.0, 2.0, 4.0, 3.0], [0.0, 100.0, 100.0, 100.0], completions_per_step=8)
    assert s["s_per_step"] == 3.0 and s["steps_timed"] == 3 and s["it_per_s"] == pytest.approx(1 / 3)
    assert s["gen_tok_per_s"] == pytest.approx(300 / 9) and s["completions_per_s"] == pytest.approx(24 / 9)
    assert bench.step_stats([5.0], [10.0], 8)["s_per_step"] == 5.0 and bench.step_stats([], [], 8) == {}


def test_two_runs_of_vllm_alone_are_pooled_and_both_shown():
    """vLLM alone before and after a cell (host drift): s/step is the median over both runs' timed calls."""
    before = {"key": "vllm-alone-G8-L512", "framework": "vllm", "mode": "alone", "G": 8, "L": 512, "steps": 3,
              "completions_per_step": 128, "error": None,
              **bench.step_stats([2.6, 1.8, 2.1, 1.9], [65536.0] * 4, 128)}
    after = {**before, **bench.step_stats([2.3, 2.7, 2.6, 2.2], [65536.0] * 4, 128), "cell_wall_s": 40.0}
    p = bench.pooled(before, after)
    assert p["s_per_step"] == pytest.approx(statistics.median([1.8, 2.1, 1.9, 2.7, 2.6, 2.2]))  # 2.15
    assert p["steps_timed"] == 6 and p["it_per_s"] == pytest.approx(1 / 2.15)
    assert p["gen_tok_per_s"] == pytest.approx(6 * 65536 / (1.8 + 2.1 + 1.9 + 2.7 + 2.6 + 2.2))
    assert p["completions_per_s"] == pytest.approx(6 * 128 / 13.3)
    assert [r["s_per_step"] for r in p["runs"]] == [1.9, 2.6] and p["cell_wall_s"] == 40.0
    failed = {**after, "s_per_step": None, "step_walls": [], "error": "timeout after 90 s"}
    assert bench.pooled(before, failed) is before and bench.pooled(failed, after) is after  # a failed run adds nothing
    row = next(ln for ln in bench_report.summarize([p]).splitlines() if ln.startswith("| vllm"))
    assert "2.15" in row and "runs around the other cells, in order: 1.90, 2.60 s" in row
    third = {**before, **bench.step_stats([2.0, 3.1, 3.0, 2.9], [65536.0] * 4, 128)}  # alone, x, alone, y, alone
    p3 = bench.pooled(p, third)
    assert [r["s_per_step"] for r in p3["runs"]] == [1.9, 2.6, 3.0] and p3["steps_timed"] == 9
    assert p3["s_per_step"] == pytest.approx(statistics.median([1.8, 2.1, 1.9, 2.7, 2.6, 2.2, 3.1, 3.0, 2.9]))
    assert p3["gen_tok_per_s"] == pytest.approx(9 * 65536 / (13.3 + 9.0))


def test_a_command_pools_its_own_two_runs_of_vllm_alone_only(tmp_path, monkeypatch):
    """main(): the second vllm-alone run of one command is pooled with the first; a result left in --out by an
    earlier command is replaced, not pooled (another moment of the host)."""
    walls = iter([[2.6, 1.8, 2.1, 1.9], [9.0, 3.0, 3.0, 3.0], [2.3, 2.7, 2.6, 2.2], [5.0, 1.0, 1.0, 1.0]])

    def cell(spec, timeout):  # the GPU cell stands in for vLLM; main()'s bookkeeping is what is tested
        return {**{k: spec[k] for k in bench.CELL_KEYS}, "key": bench.cell_key(spec), "error": None,
                "completions_per_step": 128, "cell_wall_s": 1.0, **bench.step_stats(next(walls), [65536.0] * 4, 128)}

    monkeypatch.setattr(bench, "run_cell", cell)
    common = [*_inputs(tmp_path), "--num-generations", "8", "--max-completion-length", "512", "--out", str(tmp_path / "out")]
    assert bench.main(["--only", "vllm-alone,fastgrpo-async,vllm-alone", *common]) == 0
    rows = {r["key"]: r for r in bench_report._load([tmp_path / "out" / "results.jsonl"])}
    assert rows["vllm-alone-G8-L512"]["s_per_step"] == pytest.approx(2.15)
    assert [r["s_per_step"] for r in rows["vllm-alone-G8-L512"]["runs"]] == [1.9, 2.6]
    assert rows["fastgrpo-async-G8-L512"]["s_per_step"] == 3.0
    bench.main(["--only", "vllm-alone", *common])
    rows = {r["key"]: r for r in bench_report._load([tmp_path / "out" / "results.jsonl"])}
    assert rows["vllm-alone-G8-L512"]["s_per_step"] == 1.0 and "runs" not in rows["vllm-alone-G8-L512"]


def _r(framework, mode, s, **kw):
    return {"framework": framework, "mode": mode, "G": 8, "L": 512, "steps": 12, "key": f"{framework}-{mode}",
            "s_per_step": s, "it_per_s": 1 / s if s else None, "gen_tok_per_s": 65536 / s if s else None,
            "device": "NVIDIA H100 80GB HBM3", "completions_per_step": 128, "error": None, **kw}


SYNTHETIC = [
    _r("trl", "colocate", 10.8, config={"gradient_checkpointing": True}, gpu_peak_used_gib=30.1),
    _r("fastgrpo", "colocate", 2.7, split={"gen": 1.5, "train": 1.0, "other": 0.2, "overlapped": False},
       gpu_peak_used_gib=25.0, torch_peak_reserved_gib=20.5),
    _r("fastgrpo", "async", 2.16, split={"gen": 1.5, "train": 1.0, "other": 0.1, "overlapped": True}),
    _r("trl", "novllm", 23.0),
    _r("fastgrpo", "novllm", None, error="CUDA out of memory | tried 2 GiB"),
    _r("vllm", "alone", 1.35),
]


def test_summarize_ratios_failures_and_notes():
    table = bench_report.summarize(SYNTHETIC)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines() if line.startswith("| ")}
    assert list(rows)[1:] == [("fastgrpo", "colocate"), ("fastgrpo", "async"), ("fastgrpo", "novllm"),
                              ("trl", "colocate"), ("trl", "novllm"), ("vllm", "alone")]  # header first
    cells = [c.strip() for c in rows[("fastgrpo", "colocate")].split("|")[1:-1]]
    assert cells[4:] == ["2.70", "0.370", "24,273", "25.0 (20.5)", "1.5 / 1.0 / 0.2", "0.25", "2.00", ""]
    async_cells = [c.strip() for c in rows[("fastgrpo", "async")].split("|")[1:-1]]
    assert async_cells[8] == "1.5‖ / 1.0 / 0.1" and async_cells[9] == "0.20"  # against TRL colocate
    assert "FAILED: CUDA out of memory / tried 2 GiB" in rows[("fastgrpo", "novllm")]
    assert "gradient_checkpointing on (TRL default)" in rows[("trl", "colocate")]
    trl_cells = [c.strip() for c in rows[("trl", "colocate")].split("|")[1:-1]]
    assert trl_cells[9] == "1.00" and trl_cells[10] == "8.00"
    assert "NVIDIA H100" in table


def test_write_outputs_and_report_merge(tmp_path):
    bench_report.write_outputs(tmp_path / "a", SYNTHETIC[:3])
    bench_report.write_outputs(tmp_path / "b", SYNTHETIC[3:])
    assert (tmp_path / "a" / "chart.png").stat().st_size > 10_000
    assert bench.main(["--report", str(tmp_path / "a" / "results.jsonl"), str(tmp_path / "b" / "results.jsonl"),
                       "--out", str(tmp_path / "m")]) == 0
    assert len((tmp_path / "m" / "results.jsonl").read_text().splitlines()) == len(SYNTHETIC)
    assert "| vllm | alone |" in (tmp_path / "m" / "table.md").read_text()


def test_report_merge_takes_reruns_but_never_a_failure_over_a_measurement(tmp_path):
    first = [_r("vllm", "alone", None, error="not run: --budget used up"), _r("trl", "novllm", 23.0),
             _r("fastgrpo", "colocate", 2.7)]
    rerun = [_r("vllm", "alone", 1.35), _r("trl", "novllm", None, error="timeout"), _r("fastgrpo", "colocate", 2.5)]
    bench_report.write_outputs(tmp_path / "a", first)
    bench_report.write_outputs(tmp_path / "b", rerun)
    merged = {r["key"]: r for r in bench_report._load([tmp_path / "a" / "results.jsonl",
                                                       tmp_path / "b" / "results.jsonl"])}
    assert len(merged) == 3
    assert merged["vllm-alone"]["s_per_step"] == 1.35  # the rerun filled a cell the first run left out
    assert merged["trl-novllm"]["s_per_step"] == 23.0  # a failed rerun keeps the measured cell
    assert merged["fastgrpo-colocate"]["s_per_step"] == 2.5  # a measured rerun replaces the earlier one


def test_tiny_cells_run_in_worker_processes(tmp_path, capsys):
    """One real cell per framework (--tiny, 1 step, G=2, L=8, 4 completions/step), each in its own process."""
    frameworks = "fastgrpo,trl" if importlib.util.find_spec("trl") else "fastgrpo"
    out = tmp_path / "out"
    rc = bench.main(["--tiny", "--workdir", str(tmp_path / "work"), "--out", str(out), "--frameworks", frameworks,
                     "--modes", "novllm", "--num-generations", "2", "--max-completion-length", "8", "--steps", "1",
                     "--extra", '{"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}'])
    assert rc == 0
    results = {r["framework"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(results) == set(frameworks.split(","))
    for r in results.values():
        assert r["error"] is None, r.get("traceback") or r["error"]
        assert r["s_per_step"] > 0 and r["completions_per_step"] == 4 and r["steps_timed"] == 1
        assert r["gen_tok_per_s"] > 0 and r["split"]["gen"] is not None and r["split"]["train"] is not None
        assert r["device"] == "cpu" and r["gpu_peak_used_gib"] is None
    assert results["fastgrpo"]["config"]["max_prompt_length"] == 512
    if "trl" in results:
        assert "max_prompt_length" not in results["trl"]["config"]
        assert results["trl"]["config"]["gradient_checkpointing"] is True  # TRL's default, kept
    assert (out / "table.md").exists() and (out / "chart.png").exists()
    assert "fastgrpo | novllm | 2 | 8" in capsys.readouterr().out


def test_variants_run_as_rows_of_their_own():
    cells = bench.parse_grid(_args("--only", "vllm-alone,fastgrpo-async,fastgrpo-async@y,vllm-alone",
                                   "--variant", 'y={"async_yield": "layer"}', "--extra", '{"seed": 3}',
                                   "--num-generations", "8", "--max-completion-length", "512"))
    assert [bench.cell_key(c) for c in cells] == ["vllm-alone-G8-L512", "fastgrpo-async-G8-L512",
                                                  "fastgrpo-async-G8-L512@y", "vllm-alone-G8-L512"]
    assert cells[1]["extra"] == {"seed": 3} and cells[1]["variant"] is None
    assert cells[2]["extra"] == {"seed": 3, "async_yield": "layer"} and cells[2]["variant_fields"] == {"async_yield": "layer"}
    assert bench.recipe_config(cells[2], "fastgrpo", cuda=True)["async_yield"] == "layer"
    for bad, msg in ((["--only", "fastgrpo-async@z"], "names no variant"),
                     (["--only", "fastgrpo-async@y", "--variant", "y=[1]"], "JSON object"),
                     (["--only", "fastgrpo-async@y", "--variant", "y={"], "not JSON"),
                     (["--only", "fastgrpo-async", "--variant", "y={}", "--variant", "y={}"], "named twice"),
                     (["--only", "fastgrpo-async", "--variant", "no-equals"], "NAME=JSON"),
                     (["--modes", "async", "--variant", "y={}"], "--only")):
        with pytest.raises(ValueError, match=msg):
            bench.parse_grid(_args(*bad))


def test_variant_rows_in_the_table_against_the_plain_references():
    rows = [*SYNTHETIC, _r("fastgrpo", "async", 1.62, variant="y", variant_fields={"async_yield": "layer"},
                           key="fastgrpo-async@y")]
    table = bench_report.summarize(rows)
    lines = [ln for ln in table.splitlines() if ln.startswith("| fastgrpo | async")]
    assert len(lines) == 2 and lines[0].startswith("| fastgrpo | async |")  # the plain row first
    cells = [c.strip() for c in lines[1].split("|")[1:-1]]
    assert cells[1] == "async @y" and cells[9] == "0.15" and cells[10] == "1.20"  # 1.62 / 10.8, 1.62 / 1.35
    assert '"async_yield": "layer"' in cells[11]


def test_outputs_of_variant_rows_only(tmp_path):
    """A command that has so far run only variant cells writes its results and table (the chart shows plain rows
    only, so there is none yet); this used to end the bench run after its first cell."""
    row = _r("fastgrpo", "async", 3.18, variant="off", variant_fields={"async_yield": "off"}, key="fastgrpo-async@off")
    bench_report.write_outputs(tmp_path, [row])
    assert "async @off" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "results.jsonl").read_text())["variant"] == "off"
    assert not (tmp_path / "chart.png").exists()


def test_fields_a_framework_lacks_are_named_in_its_row():
    rows = [_r("trl", "colocate", 7.0, variant="y", variant_fields={"async_yield": "layer"}, key="trl-colocate@y",
               dropped_extra=["async_yield"]), _r("fastgrpo", "colocate", 2.5, dropped_extra=[])]
    lines = [ln for ln in bench_report.summarize(rows).splitlines() if ln.startswith("| ")]
    assert "not in trl's config, so not applied: async_yield" in next(ln for ln in lines if ln.startswith("| trl"))
    assert "not applied" not in next(ln for ln in lines if ln.startswith("| fastgrpo"))


def test_report_of_a_missing_or_empty_file_writes_nothing(tmp_path, capsys):
    """`--report b2/result.jsonl --out b2` (a typo) used to exit 0 and overwrite b2's results with an empty table."""
    b2 = tmp_path / "b2"
    bench_report.write_outputs(b2, SYNTHETIC)
    before = {f.name: f.read_bytes() for f in b2.iterdir()}
    with pytest.raises(SystemExit) as e:
        bench.main(["--report", str(b2 / "result.jsonl"), "--out", str(b2)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--report: no such file {b2 / 'result.jsonl'}" in err
    assert f"did you mean {b2 / 'results.jsonl'}" in err and "nothing written" in err
    assert {f.name: f.read_bytes() for f in b2.iterdir()} == before
    (tmp_path / "empty.jsonl").write_text("\n")
    for bad, msg in (([str(tmp_path / "empty.jsonl")], "--report: no result in"),
                     ([str(b2 / "results.jsonl"), str(tmp_path / "nope.jsonl")], "no such file"),  # one of two
                     ([str(b2 / "table.md")], "line 1 is not a fastgrpo bench result")):
        with pytest.raises(SystemExit) as e:
            bench.main(["--report", *bad, "--out", str(tmp_path / "new")])
        assert e.value.code == 2 and msg in capsys.readouterr().err
        assert not (tmp_path / "new").exists()


def _refuse_to_build(*a, **k):
    raise AssertionError("built inputs or started a cell before checking the flags")


def test_bad_flags_are_refused_before_anything_is_built(tmp_path, monkeypatch, capsys):
    """Each bad flag: a one-line argparse error naming it, exit 2, no model built and no cell started (they used to
    build a 1 GB model and/or start every cell, fail them all, and exit 0; some were tracebacks)."""
    monkeypatch.setattr(bench, "ensure_inputs", _refuse_to_build)
    monkeypatch.setattr(bench, "run_cell", _refuse_to_build)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "nocfg").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"text": "no problem field"}\n')
    cases = [(["--model", "/nonexistent/model"], "--model /nonexistent/model: no such folder"),
             (["--model", "nobody-xyz/not-cached-model"], "--model nobody-xyz/not-cached-model: no such folder"),
             (["--model", str(tmp_path / "nocfg")], "no config.json in that folder"),
             (["--data", "/nonexistent.jsonl"], "--data /nonexistent.jsonl: no such file"),
             (["--data", str(tmp_path / "bad.jsonl")], "fields problem and messages"),
             (["--max-completion-length", "0"], "argument --max-completion-length: 0 is out of range"),
             (["--max-completion-length", "-5"], "argument --max-completion-length: -5 is out of range"),
             (["--frameworks", "trl", "--modes", "async"], "--frameworks trl --modes async select no cell"),
             (["--per-device-batch", "0"], "argument --per-device-batch: 0 is out of range"),
             (["--num-generations", "x"], "argument --num-generations: invalid value 'x'"),
             (["--num-generations", "1"], "argument --num-generations: 1 is out of range"),
             (["--extra", "{bad"], "argument --extra: '{bad' is not a JSON object"),
             (["--extra", "[1]"], "argument --extra: '[1]' is not a JSON object"),
             (["--steps", "0"], "argument --steps"), (["--completions-per-step", "-1"], "argument --completions-per-step"),
             (["--gpu-memory-utilization", "0"], "argument --gpu-memory-utilization"),
             (["--budget", "0"], "argument --budget"), (["--timeout-per-cell", "abc"], "argument --timeout-per-cell")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            bench.main([*argv, "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("fastgrpo bench: error: ") and msg in err[-1], (argv, err)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a Hub name the cells may download: not refused
    bench.check_inputs(_args("--model", "nobody-xyz/not-cached-model"))


def test_failed_cells_keep_the_table_and_fail_the_command(tmp_path, monkeypatch, capsys):
    """A failed cell: the table still holds every cell, the exit status is 1 and the last line names the failed
    cell; a cell stopped at its time limit that kept steps is partial, not failed."""
    def cell(spec, timeout):  # main()'s bookkeeping is what is tested
        key = bench.cell_key(spec)
        row = {**{k: spec[k] for k in bench.CELL_KEYS}, "key": key, "error": None, "completions_per_step": 4,
               "cell_wall_s": 1.0, "log": f"{spec['out_dir']}/log.txt"}
        if spec["framework"] == "trl":
            return {**row, "error": "worker exited with code 1: ImportError: no trl"}
        if spec["mode"] == "colocate":
            return {**row, "error": "timeout after 60 s (after 2 of 3 steps)", "timed_out": True,
                    **bench.step_stats([3.0, 2.0], [8.0, 8.0], 4)}
        return {**row, **bench.step_stats([3.0, 2.0, 2.0], [8.0] * 3, 4)}

    monkeypatch.setattr(bench, "run_cell", cell)
    out = tmp_path / "out"
    rc = bench.main([*_inputs(tmp_path), "--num-generations", "2", "--max-completion-length", "8", "--steps", "3",
                     "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("[bench] 2 of 4 cell runs failed: trl-colocate-G2-L8 (worker exited with code 1")
    assert "trl-novllm-G2-L8 (" in last and "fastgrpo-" not in last
    table = (out / "table.md").read_text()
    assert len((out / "results.jsonl").read_text().splitlines()) == 4 and table.count("FAILED: worker exited") == 2
    assert "partial: timeout after 60 s" in table and table in captured.out


def test_vllm_rows_generated_by_transformers_say_so():
    """vLLM absent: fastgrpo generates with transformers, and a row labelled colocate must not pass for vLLM."""
    rows = [_r("fastgrpo", "colocate", 9.0, config={"generator": "HFGenerator"}),
            _r("fastgrpo", "async", 2.2, config={"generator": "VLLMColocateGenerator"}),
            _r("fastgrpo", "novllm", 9.5, config={"generator": "HFGenerator"}),
            _r("fastgrpo", "server", 3.0, config={"generator": "HFGenerator"}, device="cpu")]
    lines = {tuple(c.strip() for c in ln.split("|")[1:3]): ln for ln in bench_report.summarize(rows).splitlines()
             if ln.startswith("| fastgrpo")}
    assert "generated by transformers: vLLM unavailable, so this is not a colocate measurement" \
        in lines[("fastgrpo", "colocate")]
    assert "generated by transformers: vLLM unavailable (no CUDA GPU)" in lines[("fastgrpo", "server")]
    assert "generated by" not in lines[("fastgrpo", "async")] + lines[("fastgrpo", "novllm")]
