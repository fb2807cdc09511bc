"""Small promises of the command line: --seed, --quiet for lm-eval, held-out evaluation, readable plots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_moe_routing.cli.main import main
from hf_moe_routing.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model"), "qwen2_moe", lines=60)


def _data(model_dir, *extra):
    return ["--dataset", str(model_dir / "text.txt"), "--seq-len", "16", "--quiet", *extra]


def _evaluate(model_dir, tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    argv = ["evaluate", str(model_dir), "--routing", "adak", *_data(model_dir, "--json", str(out), *extra)]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_evaluate_seed_makes_an_untrained_adak_reproducible(model_dir, tmp_path):
    first = _evaluate(model_dir, tmp_path, "a", "--seed", "3")
    again = _evaluate(model_dir, tmp_path, "b", "--seed", "3")
    other = _evaluate(model_dir, tmp_path, "c", "--seed", "4")
    keys = ("perplexity", "mean_activated")
    assert [first[k] for k in keys] == [again[k] for k in keys]
    assert [first[k] for k in keys] != [other[k] for k in keys]  # the seed does reach the allocators


def test_train_eval_batches_without_eval_dataset_holds_out_the_end_of_the_dataset(
    model_dir, tmp_path, capsys
):
    out = tmp_path / "adak"
    argv = ["train", str(model_dir), *_data(model_dir), "--output-dir", str(out), "--batch-size", "4"]
    argv += ["--warmup", "random", "--max-steps", "1", "--calibration-batches", "1", "--eval-batches", "2"]
    assert main(argv) == 0
    assert "held-out perplexity" in capsys.readouterr().out  # it evaluated something
    results = json.loads((out / "routing_config.json").read_text())["results"]
    (name,) = results  # documented in --eval-batches' help
    assert name.endswith("(held-out end)") and str(model_dir / "text.txt") in name
    assert results[name]["eval_ppl"] > 0


def test_quiet_silences_lm_evals_own_bars_and_log_lines(model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from hf_moe_routing.data import data_dir

    try:
        data = data_dir()
    except FileNotFoundError as error:
        pytest.skip(f"shared data folder missing: {error}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    argv = ["evaluate", str(model_dir), "--routing", "topk:top_k=1", *_data(model_dir)]
    argv += ["--tasks", "blimp_local_anaphor_gender_agreement", "--limit", "4", "--data-dir", str(data)]
    done = subprocess.run(
        [sys.executable, "-m", "hf_moe_routing.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "blimp_local_anaphor_gender_agreement" in done.stdout
    assert done.stderr == ""  # no "Running loglikelihood requests" bar, no lm-eval warnings


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("layers", [2, 12])
def test_the_evaluation_plot_keeps_long_routing_names_apart_from_titles_and_bars(tmp_path, layers):
    from hf_moe_routing.recipes.plots import _pyplot, evaluation_figure, plot_evaluation

    name = "dynamic_skip(beta=0.05, tau=0.3, renormalize=True, layers=[0, 1, 2, 3], calibrate_to_budget=True)"
    per_layer = {i: 1.0 + 0.1 * i for i in range(layers)}
    results = {
        "routing": name,
        "activated_per_layer": per_layer,
        "top_k": 2,
        "mean_activated": 1.5,
        "max_vio_per_layer": per_layer,
        "topk": {"max_vio_per_layer": {i: 2 * v for i, v in per_layer.items()}},
        "avg_max_vio": 0.7,
        "perplexity": 12.3,
    }
    fig = evaluation_figure(results)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    title = fig._suptitle.get_window_extent(renderer)
    (legend,) = fig.legends
    legend_box = legend.get_window_extent(renderer)
    axes = [ax.get_tightbbox(renderer) for ax in fig.axes]  # each panel with its own title and labels
    for box in (title, legend_box, *axes):
        assert (
            page.x0 - 1 <= box.x0
            and box.x1 <= page.x1 + 1
            and page.y0 - 1 <= box.y0
            and box.y1 <= page.y1 + 1
        )
    for box in axes:
        assert not _overlap(title, box) and not _overlap(legend_box, box)
    assert not _overlap(title, legend_box) and not _overlap(axes[0], axes[1])
    assert all(len(line) < 100 for line in fig._suptitle.get_text().splitlines())  # wrapped
    _pyplot().close(fig)
    assert plot_evaluation(results, tmp_path / "p.png").stat().st_size > 0
