"""One writer per output folder; what --overwrite removes; what a failed command leaves behind."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from hf_moe_routing import AdaKTrainer, AdaKTrainingConfig
from hf_moe_routing.cli.main import main
from hf_moe_routing.hub import load_routing_adapter
from hf_moe_routing.hub.output_dir import LOCK_NAME, OWNER_NAME, OutputDirBusyError, output_dir_lock
from hf_moe_routing.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    "OMP_NUM_THREADS": "1",
}
#: a second writer that has imported everything and waits for a line on stdin before running the command
WAITING_WRITER = (
    "import sys, torch, transformers\n"
    "from hf_moe_routing.cli.main import main\n"
    "import hf_moe_routing.cli.fit, hf_moe_routing.recipes.fitting\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("model"), "qwen2_moe", lines=400)


def _data(model_dir, *extra):
    return ["--dataset", str(model_dir / "text.txt"), "--seq-len", "16", "--quiet", *extra]


def test_two_processes_writing_one_folder_one_is_refused_at_once_the_other_completes(model_dir, tmp_path):
    out = tmp_path / "adapter"
    argv = ["fit", str(model_dir), "--routing", "bip", "--output-dir", str(out)]
    argv += _data(model_dir, "--max-steps", "100", "--batch-size", "4", "--eval-batches", "4")
    second = subprocess.Popen(
        [sys.executable, "-c", WAITING_WRITER, *argv],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert second.stdout.readline().strip() == "ready"
    first = subprocess.Popen(
        [sys.executable, "-m", "hf_moe_routing.cli.main", *argv],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (out / OWNER_NAME).is_file():  # the first writer holds the lock
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    refused_out, refused_err = second.communicate("go\n", timeout=300)
    refused_in = time.monotonic() - started
    done_out, done_err = first.communicate(timeout=600)

    assert first.returncode == 0, done_err
    assert second.returncode == 2, refused_err
    lines = refused_err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), refused_err
    assert str(out) in lines[0] and f"PID {first.pid}" in lines[0] and "Traceback" not in refused_err
    assert refused_in < 30  # at once, not after the first writer finished
    assert "routing adapter saved to" in done_out
    model = load_routing_adapter(AutoModelForCausalLM.from_pretrained(model_dir), out)  # complete
    assert model is not None
    assert not (out / OWNER_NAME).exists()  # the holder's record goes with the lock


def test_the_lock_names_the_holder_and_is_re_entrant_in_one_process(tmp_path):
    folder = tmp_path / "a" / "b"
    with output_dir_lock(folder) as locked:
        assert locked == folder and (folder / LOCK_NAME).is_file()
        owner = json.loads((folder / OWNER_NAME).read_text())
        assert owner["pid"] == os.getpid()
        with output_dir_lock(folder):  # the CLI locks, then the trainer: same process, no refusal
            pass
        code = (
            "import sys\n"
            "from hf_moe_routing.hub.output_dir import output_dir_lock\n"
            "with output_dir_lock(sys.argv[1]):\n    pass\n"
        )
        other = subprocess.run(
            [sys.executable, "-c", code, str(folder)], env=ENV, capture_output=True, text=True, timeout=300
        )
        assert other.returncode != 0 and "OutputDirBusyError" in other.stderr
        assert f"PID {os.getpid()}" in other.stderr and str(folder) in other.stderr
    assert not (tmp_path / "a").exists()  # created here, nothing written: removed again
    with pytest.raises(FileExistsError):
        (tmp_path / "file").write_text("x")
        with output_dir_lock(tmp_path / "file"):
            pass
    assert issubclass(OutputDirBusyError, OSError)  # the CLI prints it as one error: line


def test_a_failed_command_leaves_no_empty_output_folder(model_dir, tmp_path, capsys):
    out = tmp_path / "new" / "adapter"
    argv = ["fit", str(model_dir), "--routing", "bip", "--output-dir", str(out)]
    assert main([*argv, "--dataset", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "new").exists()
    train = ["train", str(model_dir), "--output-dir", str(out), "--dataset", str(tmp_path / "missing.txt")]
    assert main([*train, "--quiet"]) == 2
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main([*argv[:-1], str(kept), "--dataset", str(tmp_path / "missing.txt"), "--quiet"]) == 2
    assert kept.is_dir()  # a folder that was there before stays


def _our_checkpoint_folder(model_dir, tmp_path):
    """A train run's folder: checkpoints of ours, a log, an adapter."""
    run = tmp_path / "run"
    common = [str(model_dir), *_data(model_dir), "--batch-size", "4", "--calibration-batches", "1"]
    common += ["--warmup", "random", "--save-steps", "1", "--save-total-limit", "3"]
    assert main(["train", *common, "--output-dir", str(run), "--max-steps", "2"]) == 0
    assert (run / "checkpoint-1").is_dir() and (run / "checkpoint-2").is_dir()
    foreign = run / "checkpoint-7"  # a transformers Trainer checkpoint beside ours
    foreign.mkdir()
    (foreign / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    (foreign / "adapter_model.safetensors").write_text("lora")
    (run / "notes.txt").write_text("mine")
    return run, foreign


def test_fit_overwrite_into_a_train_folder_removes_our_checkpoints_only(model_dir, tmp_path, capsys):
    run, foreign = _our_checkpoint_folder(model_dir, tmp_path)
    argv = ["fit", str(model_dir), "--routing", "bip", "--output-dir", str(run)]
    argv += _data(model_dir, "--max-steps", "2", "--batch-size", "4", "--eval-batches", "1")
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err  # the train's adapter is there
    assert main([*argv, "--overwrite"]) == 0
    left = sorted(p.name for p in run.iterdir() if p.name not in (LOCK_NAME,))
    assert left == [
        "README.md",
        "checkpoint-7",
        "notes.txt",
        "routing_adapter.safetensors",
        "routing_config.json",
    ]
    assert (foreign / "adapter_model.safetensors").read_text() == "lora"
    config = json.loads((run / "routing_config.json").read_text())
    assert config["routing"]["routing_type"] == "bip"


def test_adak_trainer_refuses_a_previous_run_unless_overwrite_output_dir(model_dir, tmp_path, monkeypatch):
    from hf_moe_routing.training.adak import checkpoint as ckpt

    run, foreign = _our_checkpoint_folder(model_dir, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [list(range(4, 20))] * 16
    settings = dict(output_dir=str(run), warmup="random", max_steps=1, batch_size=4, progress_bar=False)
    settings.update(log_level="warning", save_steps=0, calibration_batches=1)
    trainer = AdaKTrainer(model, AdaKTrainingConfig(**settings), rows)
    with pytest.raises(FileExistsError, match=r"overwrite_output_dir=True"):
        trainer.train()
    assert (run / "checkpoint-2").is_dir()  # nothing was touched

    written = []
    real = ckpt.write_file
    monkeypatch.setattr(ckpt, "write_file", lambda path, data: written.append(path) or real(path, data))
    trainer = AdaKTrainer(model, AdaKTrainingConfig(**settings, overwrite_output_dir=True), rows)
    trainer.train()
    names = {p.name for p in run.iterdir()}
    assert "checkpoint-2" not in names and {"checkpoint-1", "checkpoint-7", "notes.txt"} <= names
    assert (foreign / "adapter_model.safetensors").read_text() == "lora"  # not ours: kept
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {e["step"] for e in log} == {1}  # the old run's log lines are gone
    temp = {p.parent.name for p in written if p.parent.name.startswith(".tmp-")}
    assert temp and all(re.fullmatch(rf"\.tmp-checkpoint-1-{os.getpid()}-[0-9a-f]+", n) for n in temp)
    trainer.train()  # the same trainer again continues in its own folder


def test_a_failed_demo_leaves_no_output_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no-such-model")
    assert main(["demo", "--model", missing, "--dataset", "x.txt", "--output-dir", "new/run", "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["demo", "--model", missing, "--dataset", "x.txt", "--quiet"]) == 2  # the default folder
    assert list(tmp_path.iterdir()) == []


def test_adak_trainer_save_adapter_refuses_a_folder_another_process_writes(model_dir, tmp_path):
    folder = tmp_path / "adapter"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom hf_moe_routing.hub.output_dir import output_dir_lock\n"
            "with output_dir_lock(sys.argv[1]):\n    print('locked', flush=True)\n    sys.stdin.readline()\n",
            str(folder),
        ],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        settings = dict(output_dir=str(tmp_path / "run"), warmup="random", batch_size=4, progress_bar=False)
        trainer = AdaKTrainer(model, AdaKTrainingConfig(**settings, log_level="warning"), [[4, 5, 6, 7]] * 4)
        with pytest.raises(OutputDirBusyError, match=rf"PID {holder.pid}"):
            trainer.save_adapter(folder)
        assert not (folder / "routing_adapter.safetensors").exists()
    finally:
        holder.communicate("\n", timeout=60)
    trainer.save_adapter(folder)  # released: saved, and loads
    load_routing_adapter(AutoModelForCausalLM.from_pretrained(model_dir), folder)
