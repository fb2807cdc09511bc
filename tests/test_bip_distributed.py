"""Under torch.distributed every rank solves the global batch: same q as one process on all tokens."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_moe_routing import BIPConfig, get_patch_state, patch_model, routing_layers
from hf_moe_routing.testing import tiny_model

SIZES = (20, 33)  # tokens per rank (different on purpose)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    model = tiny_model("mixtral")
    patch_model(model, BIPConfig(update="before", num_iters=3))
    model.train()
    return model, routing_layers(model)[0], model.model.layers[0].mlp.gate


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    hidden = torch.randn(SIZES[rank], 64, generator=g)
    mask = torch.rand(SIZES[rank], generator=g) > 0.25  # some padding on every rank
    return hidden, mask


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, layer, gate = _setup()
        context = get_patch_state(model).context
        hidden, mask = _inputs(rank)
        context.token_mask = mask
        with torch.no_grad():
            _, _, index = layer(gate, hidden)
        q_global = layer.q.clone()
        # a rank with only padding still takes part; the solve then sees the other rank's tokens
        layer.q.zero_()
        context.token_mask = torch.zeros_like(mask) if rank == 1 else mask
        with torch.no_grad():
            layer(gate, hidden)
        torch.save({"q": q_global, "index": index, "q_one_rank": layer.q.clone()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_solve_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    model, layer, gate = _setup()
    inputs = [_inputs(r) for r in range(2)]
    with torch.no_grad():
        real = torch.cat([h[m] for h, m in inputs])
        layer(gate, real)  # one process, all real tokens of both ranks
    expected_q = layer.q.clone()
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["q"], expected_q, atol=1e-6, rtol=0)
        hidden, _ = inputs[rank]
        with torch.no_grad():
            spec = layer.spec
            logits = spec.logits(gate, hidden)
            scores = spec.scores(logits)
            expected_index = spec.topk(spec.choice(logits, scores, -result["q"]), 2)
        assert torch.equal(result["index"], expected_index)

    layer.q.zero_()
    with torch.no_grad():
        layer(gate, inputs[0][0][inputs[0][1]])
    for result in results:
        torch.testing.assert_close(result["q_one_rank"], layer.q, atol=1e-6, rtol=0)
