"""Training strategies beyond Lightning's named ones, and what the module asks of a strategy."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy, Strategy


def shards_parameters(strategy: Strategy) -> bool:
    """Whether each rank's optimizer sees only a shard of the trainable parameters (FSDP, DeepSpeed ZeRO),
    so statistics over all parameters (Prodigy's step size) need a reduction over ranks."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return int(strategy.config.get("zero_optimization", {}).get("stage", 0)) > 0
    return isinstance(strategy, ModelParallelStrategy | FSDPStrategy)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as pure FSDP2: every process of every node in one sharding group,
    and checkpoints that gather only what trains.

    The parent's `data_parallel_size="auto"` means one group per node (it expects tensor parallelism inside
    a node); the corrector shards only, so the data-parallel size is the world size. The module applies
    `fully_shard` in `configure_model` (see `reflectionflow.models.module.shard_transformer`).

    The parent gathers the whole model state (the frozen 12B FLUX weights included) to rank 0's CPU on
    every save before the module keeps the LoRA; here the frozen parameters are dropped before gathering,
    so a checkpoint gathers and holds the trainable parameters and their optimizer state only.
    """

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs):
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=not self._save_distributed_checkpoint, cpu_offload=True,
                                   ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)
