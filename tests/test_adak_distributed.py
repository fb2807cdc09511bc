"""Data-parallel Ada-K training: two CPU processes (gloo) through accelerate keep identical allocators."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from hf_moe_routing.testing import tiny_model

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from hf_moe_routing import patch_model
    from hf_moe_routing.methods.adak import AdaKConfig, adak_layers
    from hf_moe_routing.training.adak import AdaKTrainer, AdaKTrainingConfig

    # a forked child inherits the single-process accelerate state of earlier tests in this pytest process
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == WORLD
    model = patch_model(tiny_model("qwen2_moe", seed=0), AdaKConfig())
    torch.manual_seed(rank)  # different allocator init and k samples per process: DDP must sync them
    for layer in adak_layers(model).values():
        torch.nn.init.normal_(layer.allocator.weight, std=0.1)
    initial = {i: layer.allocator.weight.detach().clone() for i, layer in adak_layers(model).items()}
    data = [
        {"input_ids": torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(i))}
        for i in range(16)
    ]
    config = AdaKTrainingConfig(
        output_dir=os.path.join(out_dir, "run"),
        warmup="p-warm",
        warmup_steps=2,
        max_steps=3,
        batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        k_penalty=0.05,
        calibration_batches=1,
        logging_steps=1,
        progress_bar=False,
    )
    trainer = AdaKTrainer(model, config, data, accelerator=accelerator)
    trainer.train()
    weights = {str(i): layer.allocator.weight.tolist() for i, layer in adak_layers(model).items()}
    moved = max(float((adak_layers(model)[i].allocator.weight - w).abs().max()) for i, w in initial.items())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"weights": weights, "moved": moved, "log": trainer.state.log_history}, f)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_training_keeps_allocators_identical(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert results[0]["weights"] == results[1]["weights"]  # bit-identical after DDP steps
    assert results[0]["moved"] > 1e-4  # and they did train
    ppo = [e for e in results[0]["log"] if "clip_fraction" in e]
    assert len(ppo) == 3 and ppo[-1]["tokens"] > 0
    # statistics are averaged over processes, so every rank logs the same numbers
    assert [e.get("reward") for e in results[0]["log"]] == [e.get("reward") for e in results[1]["log"]]
    checkpoint = tmp_path / "run" / "checkpoint-5"
    assert (checkpoint / "rng_state_0.safetensors").is_file() and (
        checkpoint / "rng_state_1.safetensors"
    ).is_file()
