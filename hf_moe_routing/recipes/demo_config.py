"""What the demo runs with: its sizes (``quick`` / ``default``), its settings and its Ada-K budget."""

from __future__ import annotations

import dataclasses
import os

DEFAULT_OUTPUT = "hf-moe-routing-demo"


#: The demo's Ada-K budget: mean routed experts per token as a share of the model's top-k.
ADAK_BUDGET = 0.75


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How much work each step does."""

    num_texts: int  # synthetic texts (8 sentences each)
    seq_len: int
    hidden_size: int
    num_layers: int
    expert_intermediate: int
    pretrain_steps: int
    batch_size: int
    bip_batches: int  # calibration batches for BIP's q
    warmup_steps: int  # Ada-K warm-start steps (when the start is not exact)
    ppo_steps: int  # Ada-K PPO rollouts
    eval_rows: int  # held-out sequences


#: ``--size`` presets: "default" is the README's demo (a few minutes on 2 CPU cores), "quick" a smoke test.
SIZES: dict[str, DemoSize] = {
    "default": DemoSize(2400, 64, 96, 3, 128, 400, 16, 20, 60, 600, 96),
    "quick": DemoSize(120, 32, 32, 2, 32, 8, 8, 2, 2, 2, 8),
}


@dataclasses.dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the ``hf-moe-routing demo`` options)."""

    output_dir: str | os.PathLike | None = None  # None: a new folder in the working directory
    overwrite: bool = False
    model: str | None = None  # Hub id or local folder of a MoE causal LM (with dataset=)
    dataset: str | None = None  # Hub dataset id, local file/folder, or a local corpus name
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    size: str = "default"
    seq_len: int | None = None  # default: the size's (synthetic) or 256 (Hub)
    k_penalty: float = 0.03  # Ada-K's initial lambda (adapted to the budget ADAK_BUDGET * top-k)
    seed: int = 0
    plot: bool = True
    progress: bool = True
    device_map: str | None = None  # from_pretrained's device_map for model= (default: "auto" on GPUs)

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}.")
        if (self.model is None) != (self.dataset is None):
            raise ValueError(
                "Pass both --model and --dataset to run the demo on a Hub model, or neither for the offline demo."
            )
        if self.seq_len is not None and self.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8, got {self.seq_len}.")
