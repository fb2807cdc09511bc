"""Ada-K training with the frozen model sharded by FSDP2 over two CPU processes (gloo).

Two processes with batch 2 train exactly what one process with batch 4 trains on the same rows (the
allocators end equal up to float rounding), every base parameter stays a sharded, unchanged DTensor,
the ranks stay identical, and an evaluation whose rows do not split evenly still finishes.
"""

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


def _rows() -> list[dict]:
    """16 rows of 12 tokens; some end in padding or unlabelled tokens, so ranks hold different token counts."""
    rows = []
    for i in range(16):
        ids = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(i))
        mask = torch.ones(12, dtype=torch.long)
        labels = ids.clone()
        if i % 3 == 0:
            mask[9:] = 0
            labels[9:] = -100
        if i % 4 == 1:
            labels[6:] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _config(out_dir: str, batch_size: int, fsdp: bool):
    from hf_moe_routing.training.adak import AdaKTrainingConfig

    return AdaKTrainingConfig(
        output_dir=os.path.join(out_dir, "fsdp" if fsdp else "single"),
        warmup="p-warm",
        warmup_steps=2,
        max_steps=3,
        batch_size=batch_size,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        target_experts=1.6,
        k_penalty_learning_rate=0.1,
        calibration_batches=1,
        logging_steps=1,
        progress_bar=False,
        log_level="warning",
        mixed_precision="no",
        fsdp=fsdp,
        seed=3,
    )


def _train(out_dir: str, batch_size: int, fsdp: bool, accelerator=None):
    from hf_moe_routing.training.adak import AdaKTrainer

    model = tiny_model("qwen2_moe", seed=0)
    trainer = AdaKTrainer(
        model, _config(out_dir, batch_size, fsdp), _rows(), _rows()[:5], accelerator=accelerator
    )
    trainer.train()
    return model, trainer


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
    from torch.distributed.tensor import DTensor

    from hf_moe_routing.methods.adak import adak_layers

    # a forked child inherits the single-process accelerate state of earlier tests in this pytest process
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model, trainer = _train(out_dir, 2, True, accelerator)
    allocators = {id(p) for layer in adak_layers(model).values() for p in layer.allocator.parameters()}
    base = [(n, p) for n, p in model.named_parameters() if id(p) not in allocators]
    fresh = dict(tiny_model("qwen2_moe", seed=0).named_parameters())
    unchanged = all(torch.equal(p.full_tensor(), fresh[n]) for n, p in base)  # collective: every rank
    result = {
        "weights": {
            f"{i}.{n}": p.tolist()
            for i, layer in adak_layers(model).items()
            for n, p in layer.allocator.named_parameters()
        },
        "all_dtensor": all(isinstance(p, DTensor) for _, p in base),
        "allocators_plain": not any(
            isinstance(p, DTensor) for p in model.parameters() if id(p) in allocators
        ),
        "unchanged": unchanged,
        "eval": trainer.evaluate(),
        "log": trainer.state.log_history,
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_fsdp_over_two_processes_equals_one_process_on_the_same_rows(tmp_path):
    torch.set_num_threads(1)
    from hf_moe_routing.hub import load_routing_adapter
    from hf_moe_routing.methods.adak import adak_layers
    from hf_moe_routing.training.adak import AdaKTrainer

    untrained = AdaKTrainer(
        tiny_model("qwen2_moe", seed=0), _config(str(tmp_path / "init"), 4, False), _rows()
    )
    initial = {
        f"{i}.{n}": p.detach().clone()
        for i, layer in untrained.layers.items()
        for n, p in layer.allocator.named_parameters()
    }
    single, trainer = _train(str(tmp_path), 4, False)
    reference = {
        f"{i}.{n}": p.detach()
        for i, layer in adak_layers(single).items()
        for n, p in layer.allocator.named_parameters()
    }
    reference_eval = trainer.evaluate()
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # every rank applies the same summed gradients
    moved = max(float((torch.tensor(ranks[0]["weights"][k]) - v).abs().max()) for k, v in initial.items())
    for key, value in reference.items():
        torch.testing.assert_close(torch.tensor(ranks[0]["weights"][key]), value, atol=1e-5, rtol=0)
    assert all(r["all_dtensor"] and r["allocators_plain"] and r["unchanged"] for r in ranks)
    assert moved > 1e-3  # and they did train
    # the same evaluation (5 rows over 2 ranks: one rank runs a padding forward) on both ranks and as one process
    assert ranks[0]["eval"] == ranks[1]["eval"]
    assert ranks[0]["eval"]["eval_tokens"] == reference_eval["eval_tokens"]
    assert ranks[0]["eval"]["eval_nll"] == pytest.approx(reference_eval["eval_nll"], abs=1e-5)
    ppo = [e for e in ranks[0]["log"] if e.get("phase") == "ppo"]
    assert len(ppo) == 3 and any(e.get("phase") == "budget" for e in ranks[0]["log"])
    # rank 0 saved the adapter; it holds the trained allocators
    adapter = load_routing_adapter(tiny_model("qwen2_moe", seed=0), tmp_path / "fsdp")
    for i, layer in adak_layers(adapter).items():
        for n, p in layer.allocator.named_parameters():
            assert p.tolist() == ranks[0]["weights"][f"{i}.{n}"]
    checkpoint = sorted((tmp_path / "fsdp").glob("checkpoint-*"))[-1]
    assert {"rng_state_0.safetensors", "rng_state_1.safetensors"} <= {p.name for p in checkpoint.iterdir()}
