"""The digits demo (examples/digits.py) end to end at a tiny size, through its API and the command line."""

import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from alig_fused.cli import load_example, main  # noqa: E402

digits = load_example("digits")
if digits is None:
    pytest.skip("examples/digits.py is not beside the package (not a checkout)", allow_module_level=True)
PLOT_FILES, run_demo = digits.PLOT_FILES, digits.run_demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    return run_demo(epochs=3, quiet=True, out=str(out))


def test_alig_training_loss_falls(demo_results):
    alig = demo_results["runs"]["alig"]
    assert alig["final_train_loss"] < 0.5 * alig["initial_train_loss"]
    assert alig["test_accuracy"] > 0.8
    assert alig["skipped_steps"] == 0
    assert alig["backend"] in ("torch", "cpp", "triton")
    assert demo_results["alig_backend"] == alig["backend"]


def test_every_optimizer_ran(demo_results):
    assert set(demo_results["runs"]) == {"alig", "sgd", "adam"}
    for run in demo_results["runs"].values():
        assert len(run["epoch_train_loss"]) == 3 + 1  # epoch 0 is before training
        assert len(run["step_loss"]) == run["steps"] == len(run["step_param_norm"]) > 0
    assert demo_results["runs"]["sgd"]["skipped_steps"] is None


def test_recorded_step_size_is_alig_step(demo_results):
    """group["step_size"] as collected by the demo is min(max_lr, loss / (||g||^2 + eps))."""
    alig, config = demo_results["runs"]["alig"], demo_results["config"]
    step_size = torch.tensor(alig["step_size"], dtype=torch.float64)
    polyak_step = torch.tensor(alig["polyak_step"], dtype=torch.float64)
    assert len(step_size) == alig["steps"]
    assert len(set(alig["step_size"])) > 1  # a clone per step, not one tensor seen N times
    torch.testing.assert_close(step_size, polyak_step.clamp(max=config["alig_max_lr"]), rtol=1e-4, atol=0)


def test_alig_stays_in_its_ball(demo_results):
    max_norm = demo_results["config"]["alig_max_norm"]
    assert max(demo_results["runs"]["alig"]["step_param_norm"]) <= max_norm * (1 + 1e-5)


def test_files_are_written(demo_results):
    files = demo_results["files"]
    assert set(PLOT_FILES) <= set(files)
    for name in PLOT_FILES:
        with open(files[name], "rb") as f:
            content = f.read()
        assert len(content) > 1000, name
        assert content.startswith(PNG_SIGNATURE), name
    with open(files["summary.md"]) as f:
        summary = f.read()
    assert "| ALI-G (FusedALIG)" in summary and "Steps skipped" in summary
    with open(files["results.json"]) as f:
        saved = json.load(f)
    assert saved["runs"]["alig"]["final_train_loss"] == demo_results["runs"]["alig"]["final_train_loss"]


def test_cli_demo(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--quiet", "--out", str(tmp_path), "--backend", "torch"]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["epochs"] == 1 and saved["runs"]["alig"]["backend"] == "torch"
    assert f"{saved['runs']['alig']['final_train_loss']:.2e}" in capsys.readouterr().out  # the summary table
    assert (tmp_path / "alig_step_size.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_cli_demo_without_cuda(tmp_path, capsys):
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_cli_rejects_unknown_backend(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--backend", "cuda-graphs"])
    assert exit_info.value.code == 2


def test_cli_demo_outside_a_clone_says_where_the_demo_is(tmp_path, monkeypatch, capsys):
    import alig_fused.cli as cli

    monkeypatch.setattr(cli, "EXAMPLES_DIR", str(tmp_path))  # an installed package: no examples/ beside it
    assert main(["demo", "--epochs", "1"]) == 2
    assert "python -m examples.digits" in capsys.readouterr().err
    assert main(["demo", "lm"]) == 2
    assert "python -m examples.lm" in capsys.readouterr().err
