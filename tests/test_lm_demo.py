"""The language-model demo (examples/lm.py) end to end at its toy size, through the command line."""

import json
import math

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from alig_fused.cli import load_example, main  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

if load_example("lm") is None:
    pytest.skip("examples/lm.py is not beside the package (not a checkout)", allow_module_level=True)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_out")
    assert main(["demo", "lm", "--size", "toy", "--quiet", "--out", str(out)]) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_files_are_written(lm_run):
    out, results = lm_run
    for name in load_example("lm").PLOT_FILES:
        content = (out / name).read_bytes()
        assert len(content) > 1000 and content.startswith(PNG_SIGNATURE), name
    summary = (out / "summary.md").read_text()
    assert "| ALI-G (FusedALIG)" in summary and "| AdamW" in summary and "Steps skipped" in summary


def test_every_optimizer_learned(lm_run):
    """Each optimizer's picked run ends below its initial validation loss; every sweep ran its values."""
    _, results = lm_run
    expected = {"alig", "adamw", "sgd"} | ({"momo"} if results["fused_momo_available"] else set())
    assert set(results["sweeps"]) == expected
    for key, sweep in results["sweeps"].items():
        assert [run["value"] for run in sweep["runs"]] == sweep["values"] and len(sweep["values"]) == 3
        best = sweep["runs"][sweep["best"]]
        assert best["final_val_bpb"] == min(run["final_val_bpb"] for run in sweep["runs"] if run["final_val_bpb"] is not None)
        assert best["val_bpb"][-1] < best["initial_val_bpb"], key
        assert best["final_val_bpb"] < best["initial_val_bpb"], key
        assert math.isfinite(best["test_bpb"]) and best["tokens_per_s"] > 0


def test_alig_diagnostics(lm_run):
    """The recorded step size is min(max_lr, uncapped Polyak step); the matrices stay in the ball."""
    _, results = lm_run
    sweep = results["sweeps"]["alig"]
    for run in sweep["runs"]:
        assert run["skipped_steps"] == 0
        assert len(run["step_size"]) == len(run["polyak_step"]) == run["steps"]
        for step_size, polyak in zip(run["step_size"], run["polyak_step"]):
            assert step_size == pytest.approx(min(run["value"], polyak), rel=1e-4)
        assert max(run["matrix_norm"]) <= run["max_norm"] * (1 + 1e-5)


def test_cli_without_cuda_fails_cleanly(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the message given when there is no GPU")
    assert main(["demo", "lm", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
