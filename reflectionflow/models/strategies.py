"""Training strategies beyond Lightning's named ones."""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as pure FSDP2: every process of every node in one sharding group.

    The parent's `data_parallel_size="auto"` means one group per node (it expects tensor parallelism inside
    a node); the corrector shards only, so the data-parallel size is the world size. The module applies
    `fully_shard` in `configure_model` (see `reflectionflow.models.module.shard_transformer`).
    """

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs):
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
