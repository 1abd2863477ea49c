"""Step logging: one fixed-format line per logged step, the same record in metrics.jsonl, and wandb.

Only rank 0 writes. wandb runs offline unless ``logging.wandb_mode`` says otherwise.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from card_megatron.config import LoggingConfig

# Dense bf16 peak of common accelerators (NVIDIA's data sheets), for MFU (model FLOPs utilisation).
# The first key found in the device name wins: "H100 PCIe" before "H100", "A100" before "A10".
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of the named device (``torch.cuda.get_device_name()``), None if unknown."""
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


def model_flops_per_token(num_params: int, num_layers: int, hidden: int, seq_length: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention scores (PaLM appendix B)."""
    return 6.0 * num_params + 12.0 * num_layers * hidden * seq_length


class MetricsWriter:
    """Writes records to ``{run_dir}/metrics.jsonl`` (appending across restarts) and wandb."""

    def __init__(self, run_dir: str, cfg: LoggingConfig, enabled: bool, run_config: dict):
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb = None
        if enabled and cfg.wandb:
            os.environ.setdefault("WANDB_MODE", cfg.wandb_mode)
            os.environ.setdefault("WANDB_DIR", run_dir)
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project,
                name=cfg.wandb_name or os.path.basename(os.path.abspath(run_dir)),
                config=run_config,
                mode=cfg.wandb_mode,
                dir=run_dir,
                resume="allow",
                id=_wandb_id(run_dir),
            )

    def write(self, record: dict[str, Any], filename: str = "metrics.jsonl") -> None:
        """Appends one record (training steps to metrics.jsonl, evaluations to eval.jsonl)."""
        if not self.enabled:
            return
        with open(os.path.join(self.run_dir, filename), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: str) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    path = os.path.join(run_dir, "wandb_id.txt")
    if os.path.exists(path):
        return open(path).read().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(run_id)
    return run_id


def format_step(record: dict[str, Any]) -> str:
    """The one-line step summary."""
    parts = [f"step {record['step']:>7d}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.3e}"]
    if record.get("grad_norm") is not None:
        parts.append(f"grad_norm {record['grad_norm']:.3f}")
    parts.append(f"tokens/s {record['tokens_per_sec']:,.0f}")
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    parts.append(f"mem {record['memory_gb']:.2f}GB")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    return " | ".join(parts)
