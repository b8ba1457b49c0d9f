"""Training throughput and memory of the real train app, one configuration per subprocess.

    python benchmarks/train.py [--steps 12] [--threads 2]

Configurations (synthetic GenRef shards, CPU, fp32):
  tiny          experiment=tiny (tiny FLUX, 64 px target / 32 px condition, LoRA r16, batch 2)
  small         a "small" FLUX (hidden 256, 2 double + 4 single blocks), 256 px target / 128 px condition
                (256 target + 64 condition tokens), LoRA r32, batch 2, union attention (the paper's)
  small-causal  the same with causal attention
  small-ckpt    the same as small with gradient checkpointing
Prints samples/s (after 3 warm-up steps) and the peak resident memory the run added, then ratios against
the `small` baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 3

CONFIGS = {
    "tiny": [],
    "small": ["data.target_size=256", "data.condition_size=128", "data.shards.image_size=256",
              "data.val_shards.image_size=256", "model.lora_rank=32"],
}
CONFIGS["small-causal"] = [*CONFIGS["small"], "model.attention=causal"]
CONFIGS["small-ckpt"] = [*CONFIGS["small"], "model.gradient_checkpointing=true"]


def small_pipeline(path: Path) -> Path:
    """The tiny FLUX pipeline with a larger transformer (hidden 256, 2 double + 4 single blocks)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from reflectionflow.models.tiny import tiny_flux_components

    if (path / "model_index.json").is_file():
        return path
    components = tiny_flux_components(seed=0)
    components["transformer"] = FluxTransformer2DModel(
        in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 24, 24),
    )
    FluxPipeline(**components).save_pretrained(path)
    return path


def worker(name: str, steps: int, cache: Path) -> dict:
    """Run the train app in this process and measure it."""
    import lightning as L

    from reflectionflow.config import compose
    from reflectionflow.train import train

    class Clock(L.Callback):
        def __init__(self):
            self.marks = []

        def on_train_batch_end(self, trainer, *args):
            self.marks.append(time.perf_counter())

    overrides = ["experiment=tiny", f"trainer.max_steps={steps + WARMUP}", "logger=none", "callbacks.validation=null",
                 "callbacks.lora=null", "callbacks.checkpoint=null", "callbacks.lr_monitor=null", "+trainer.enable_checkpointing=false",
                 "callbacks.progress_bar=null", "+trainer.enable_progress_bar=false", *CONFIGS[name]]
    if name.startswith("small"):
        overrides.append(f"model.path={small_pipeline(cache / 'small-flux')}")
    clock = Clock()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose("train", [*overrides, f"paths.run_dir={run_dir}", "callbacks.validation_metrics=null"])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        train(cfg, extra_callbacks=[clock])
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = clock.marks[-1] - clock.marks[WARMUP - 1]
    return {"samples_per_sec": steps * cfg.data.batch_size / seconds, "peak_added_mb": (peak - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = Path(os.environ.setdefault("REFLECTIONFLOW_CACHE", str(Path.home() / ".cache" / "reflectionflow")))
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.steps, cache)))
        return
    results = {}
    for name in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:13s} {r['samples_per_sec']:7.2f} samples/s   peak memory added {r['peak_added_mb']:7.0f} MB")
    base = results["small"]
    print(f"small-causal vs small: throughput {results['small-causal']['samples_per_sec'] / base['samples_per_sec']:.2f}x")
    print(f"small-ckpt vs small: throughput {results['small-ckpt']['samples_per_sec'] / base['samples_per_sec']:.2f}x, "
          f"peak memory {results['small-ckpt']['peak_added_mb'] / max(base['peak_added_mb'], 1):.2f}x")


if __name__ == "__main__":
    main()
