"""GenRefDataModule under a real Lightning Trainer: global-step schedule, checkpointed position, exact resume;
and the shipped data configs."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from reflectionflow.data.datamodule import GenRefDataModule
from reflectionflow.data.sources import ShardSourceError
from reflectionflow.data.synthetic import write_synthetic_shards


class Probe(L.LightningModule):
    """A one-layer model whose loss depends on every pixel and text of the batch."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(7, 1)
        self.records = []

    def training_step(self, batch, batch_idx):
        assert batch["image"].dtype == batch["condition"].dtype == torch.float32
        assert -1 <= batch["image"].min() < batch["image"].max() <= 1
        texts = torch.tensor([[len(t)] for t in batch["t5_text"]], dtype=torch.float32) / 100
        features = torch.cat(
            [batch["image"].mean(dim=(2, 3)), batch["condition"].mean(dim=(2, 3)), texts], dim=1
        )
        loss = (self.layer(features) ** 2).mean()
        self.records.append((loss.item(), batch["meta"]["step"], self.trainer.global_step))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(shards, tmp_path, max_steps, ckpt_path=None):
    torch.manual_seed(0)
    model = Probe()
    datamodule = GenRefDataModule(
        shards,
        batch_size=3,
        num_workers=2,
        target_size=16,
        condition_size=16,
        split_ratios={"general": [0.7, 0.1], "editing": [0.3, 0.9]},
        training_stages=[0, 4],
        shuffle_buffer=8,
        queue_size=8,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        accumulate_grad_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_top_k=-1)
        ],
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model.records, datamodule


def test_trainer_resume_reproduces_the_per_step_losses(tmp_path):
    shards = [str(p) for p in write_synthetic_shards(tmp_path / "shards", 2, 10, image_size=16, seed=5)]
    reference, datamodule = _fit(shards, tmp_path / "one_go", max_steps=6)
    assert len(reference) == 12  # 6 optimizer steps x 2 accumulated batches
    # Every batch was drawn with the schedule of the optimizer step it is used in.
    assert all(batch_step == global_step for _, batch_step, global_step in reference)
    assert datamodule.batches_consumed == 12

    _fit(shards, tmp_path / "stopped", max_steps=3)
    checkpoint = torch.load(tmp_path / "stopped" / "step=3.ckpt", weights_only=False)
    assert checkpoint["GenRefDataModule"]["batches_consumed"] == 6
    resumed, _ = _fit(
        shards, tmp_path / "stopped", max_steps=6, ckpt_path=tmp_path / "stopped" / "step=3.ckpt"
    )
    assert resumed == reference[6:]


def test_rank_and_world_size_come_from_the_trainer(tmp_path):
    shards = [str(p) for p in write_synthetic_shards(tmp_path, 2, 2, image_size=16)]
    datamodule = GenRefDataModule(shards, target_size=16, condition_size=16)
    datamodule.trainer = L.Trainer(accelerator="cpu", accumulate_grad_batches=4, logger=False)
    datamodule.setup("fit")
    stream = datamodule.train_dataloader().dataset
    assert (stream.rank, stream.world_size, stream.accumulate_grad_batches) == (0, 1, 4)

    mismatched = GenRefDataModule(shards, target_size=16, condition_size=16, accumulate_grad_batches=2)
    mismatched.trainer = datamodule.trainer
    with pytest.raises(ValueError, match="accumulate"):
        mismatched.setup("fit")


def test_validation_samples_are_the_first_samples_of_the_validation_shards(tmp_path):
    train = [str(p) for p in write_synthetic_shards(tmp_path / "train", 1, 4, image_size=16)]
    val = [str(p) for p in write_synthetic_shards(tmp_path / "val", 1, 5, image_size=24, seed=9)]
    datamodule = GenRefDataModule(train, val_shards=val, num_val_samples=3, target_size=32, condition_size=16)
    samples = datamodule.validation_samples()
    assert [s["key"] for s in samples] == ["0000-000000", "0000-000001", "0000-000002"]
    assert all(s["image"].size == (32, 32) and s["condition"].size == (16, 16) for s in samples)
    assert all(s["t5_text"] == f"{s['prompt']} [Reflexion] {s['reflection']}" for s in samples)


def test_synthetic_config_builds_cached_shards_and_batches(tmp_path, monkeypatch, compose_config):
    monkeypatch.setenv("REFLECTIONFLOW_CACHE", str(tmp_path))
    cfg = compose_config("train", "data=synthetic")
    datamodule = instantiate(cfg.data)
    assert str(tmp_path / "synthetic-genref") in datamodule.shards
    datamodule.check()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert (
        batch["image"].shape[-1] == cfg.data.target_size
        and batch["condition"].shape[-1] == cfg.data.condition_size
    )
    assert len(datamodule.validation_samples()) == cfg.data.num_val_samples


def test_genref_config_has_the_paper_schedule_and_checks_its_source(compose_config):
    cfg = compose_config("train", "data=genref", "data.shards=pipe:exit 1")
    datamodule = instantiate(cfg.data)
    assert (datamodule.target_size, datamodule.condition_size) == (1024, 512)
    assert datamodule.subset_weights(0) == pytest.approx(
        {"general": 0.1, "length": 0.1, "rule": 0.1, "editing": 0.7}
    )
    assert datamodule.subset_weights(5000)["editing"] == 0
    with pytest.raises(ShardSourceError, match="pipe:exit 1"):
        datamodule.check()


class RankProbe(Probe):
    """Writes what each rank trained on, since forked ranks cannot return it."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def training_step(self, batch, batch_idx):
        with open(self.out / f"rank{self.global_rank}.txt", "a") as f:
            f.write(" ".join(batch["key"]) + "|" + " ".join(batch["meta"]["corrupt"]) + "\n")
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_two_ranks_get_their_own_streams_and_share_corrupt_ids_in_the_checkpoint(tmp_path):
    broken = {"corrupt_jpeg": 6}
    shards = [str(p) for p in write_synthetic_shards(tmp_path / "shards", 2, 6, image_size=16, broken=broken)]
    datamodule = GenRefDataModule(
        shards, batch_size=4, num_workers=1, target_size=16, condition_size=16, shuffle_buffer=4, queue_size=4
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=4)],
    )
    trainer.fit(RankProbe(tmp_path), datamodule=datamodule)

    lines = {rank: (tmp_path / f"rank{rank}.txt").read_text().splitlines() for rank in range(2)}
    assert [len(lines[rank]) for rank in range(2)] == [4, 4]
    assert lines[0] != lines[1]
    corrupt = {rank: {i for line in lines[rank] for i in line.split("|")[1].split()} for rank in range(2)}
    assert corrupt[0] and corrupt[1]
    state = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)["GenRefDataModule"]
    assert set(state["known_corrupt"]) == corrupt[0] | corrupt[1]
    assert state["batches_consumed"] == 4
