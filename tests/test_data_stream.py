"""The GenRef stream through GenRefDataModule: mixing, splitting, drops, faults, shapes, replayable resume."""

import itertools
import struct
import zlib
from collections import Counter

import pytest
import torch

import reflectionflow.data.stream as stream_module
from reflectionflow.data.datamodule import GenRefDataModule
from reflectionflow.data.synthetic import GENREF_SUBSETS, write_synthetic_shards
from reflectionflow.data.transforms import t5_text

RATIOS = {"general": [0.1, 0.4], "length": [0.2, 0.3], "rule": [0.3, 0.3], "editing": [0.4, 0.0]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    paths = write_synthetic_shards(tmp_path_factory.mktemp("genref"), 8, 40, image_size=16, seed=1)
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def broken_shards(tmp_path_factory):
    broken = {"corrupt_jpeg": 4, "missing_key": 2, "empty_member": 2, "truncated_tar": 1}
    paths = write_synthetic_shards(
        tmp_path_factory.mktemp("broken"), 2, 12, image_size=16, broken=broken, seed=2
    )
    return [str(p) for p in paths]


def _datamodule(shards, setup=True, **overrides) -> GenRefDataModule:
    options = dict(
        batch_size=8,
        num_workers=0,
        target_size=16,
        condition_size=16,
        shuffle_buffer=16,
        queue_size=16,
        rank=0,
        world_size=1,
        accumulate_grad_batches=1,
    )
    options.update(overrides)
    datamodule = GenRefDataModule(shards, **options)
    if setup:
        datamodule.setup("fit")
    return datamodule


def _batches(datamodule, count=None) -> list[dict]:
    """Batches as the trainer takes them (through the hooks Lightning calls around the device transfer)."""
    taken = []
    for batch in itertools.islice(datamodule.train_dataloader(), count):
        batch = datamodule.on_before_batch_transfer(batch, 0)
        taken.append(datamodule.on_after_batch_transfer(batch, 0))
    return taken


def _proportions(batches) -> dict[str, float]:
    counts = Counter(s for b in batches for s in b["subset"])
    total = sum(counts.values())
    return {name: counts[name] / total for name in GENREF_SUBSETS}


def test_realized_subset_proportions_follow_the_schedule_at_two_steps(shards):
    common = dict(split_ratios=RATIOS, training_stages=[0, 1], num_workers=2, batch_size=16)
    # Step 0 for all batches: accumulate over more batches than are taken.
    at_start = _datamodule(shards, accumulate_grad_batches=10**6, **common)
    batches = _batches(at_start, 125)
    assert {b["meta"]["step"] for b in batches} == {0}
    assert _proportions(batches) == pytest.approx({k: v[0] for k, v in RATIOS.items()}, abs=0.03)
    # Every batch after the first is past the last stage.
    later = _datamodule(shards, accumulate_grad_batches=1, **common)
    batches = _batches(later, 126)[1:]
    assert min(b["meta"]["step"] for b in batches) == 1
    assert _proportions(batches) == pytest.approx({k: v[1] for k, v in RATIOS.items()}, abs=0.03)
    assert sum(len(b["subset"]) for b in batches) == 2000


def test_batches_come_round_robin_from_workers_with_their_global_step(shards):
    datamodule = _datamodule(
        shards,
        split_ratios=RATIOS,
        training_stages=[0, 6],
        num_workers=2,
        accumulate_grad_batches=3,
        batch_size=2,
    )
    metas = [b["meta"] for b in _batches(datamodule, 7)]
    assert [m["batch_index"] for m in metas] == list(range(7))
    assert [m["stream"] for m in metas] == [0, 1, 0, 1, 0, 1, 0]
    assert [m["step"] for m in metas] == [0, 0, 0, 1, 1, 1, 2]
    assert datamodule.batches_consumed == 7


def test_only_yielded_samples_are_decoded(shards, monkeypatch):
    decoded = []
    original = stream_module.decode_pair
    monkeypatch.setattr(stream_module, "decode_pair", lambda *a, **k: decoded.append(1) or original(*a, **k))
    ratios = {"general": [1.0], "editing": [0.0], "rule": [0.0], "length": [0.0]}
    batches = _batches(_datamodule(shards, split_ratios=ratios), 10)
    assert {s for b in batches for s in b["subset"]} == {"general"}
    assert len(decoded) == 80  # the other subsets, three quarters of what was read, were never decoded


def test_a_subset_without_samples_is_renormalised_away_with_a_warning(shards):
    ratios = {"general": [0.5], "typo": [0.5]}
    with pytest.warns(UserWarning, match="'typo' has weight"):
        batches = _batches(_datamodule(shards, split_ratios=ratios), 5)
    assert {s for b in batches for s in b["subset"]} == {"general"}


def test_no_duplicates_across_two_workers_and_two_ranks(shards):
    keys = []
    for rank in range(2):
        datamodule = _datamodule(shards, resampled=False, num_workers=2, rank=rank, world_size=2)
        keys += [key for batch in _batches(datamodule) for key in batch["key"]]
    assert len(keys) == len(set(keys)) == 8 * 40


def test_finite_epochs_are_deterministic_for_a_seed(shards):
    def epoch(seed):
        datamodule = _datamodule(shards, resampled=False, num_workers=2, seed=seed)
        return [key for batch in _batches(datamodule) for key in batch["key"]]

    assert epoch(0) == epoch(0)
    assert epoch(0) != epoch(1)


def test_drop_rates_and_no_image_drop_on_editing(shards):
    batches = _batches(
        _datamodule(shards, batch_size=50, drop_text=0.1, drop_image=0.1, drop_reflection=0.2), 40
    )
    rows = [
        (
            b["prompt"][i],
            b["reflection"][i],
            b["t5_text"][i],
            b["subset"][i],
            bool((b["condition"][i] == -1).all()),
        )
        for b in batches
        for i in range(len(b["prompt"]))
    ]
    assert len(rows) == 2000
    text_dropped = [t5 == "" for _, _, t5, _, _ in rows]
    assert sum(text_dropped) / len(rows) == pytest.approx(0.1, abs=0.02)
    droppable = [black for _, _, _, subset, black in rows if subset != "editing"]
    assert sum(droppable) / len(droppable) == pytest.approx(0.1, abs=0.02)
    assert not any(black for _, _, _, subset, black in rows if subset == "editing")
    # Among samples with text and image kept, the reflection is dropped 20% of the time.
    kept = [(p, r, t5) for p, r, t5, _, black in rows if t5 and not black]
    assert sum(t5 == p for p, _, t5 in kept) / len(kept) == pytest.approx(0.2, abs=0.03)
    assert all(t5 in (p, t5_text(p, r)) for p, r, t5 in kept)
    # Image drop also drops the reflection from the T5 text.
    assert all(t5 in ("", p) for p, _, t5, _, black in rows if black)


def test_broken_samples_are_skipped_and_counted_and_every_good_sample_yielded(broken_shards):
    datamodule = _datamodule(broken_shards, resampled=False, num_workers=2, batch_size=5)
    keys = [key for batch in _batches(datamodule) for key in batch["key"]]
    assert sorted(keys) == [f"{shard:04d}-{i:06d}" for shard in range(2) for i in range(12)]
    assert datamodule.skipped_counts() == {
        "corrupt_jpeg": 4,
        "oversized_image": 0,
        "missing_key": 2,
        "empty_member": 2,
        "truncated_tar": 1,
        "unreadable_shard": 0,
    }


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming `width` x `height` RGB in its header, with (almost) no pixel data: PIL reads the size
    from the header, so nothing of that size is allocated here."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_an_image_claiming_too_many_pixels_is_skipped_undecoded_and_counted(tmp_path, monkeypatch):
    import webdataset as wds

    from reflectionflow.data.sources import read_shard

    [good] = write_synthetic_shards(tmp_path / "good", 1, 3, image_size=16, seed=3)
    shard = tmp_path / "bomb.tar"
    with wds.TarWriter(str(shard), mtime=0) as writer:
        for i, raw in enumerate(read_shard(str(good), Counter())):
            members = {**raw.members, "good_image.jpg": png_header(13000, 13000)} if i == 1 else raw.members
            writer.write({"__key__": raw.key, **members})
    decoded = []
    decode = stream_module.decode_pair
    monkeypatch.setattr(stream_module, "decode_pair", lambda *a, **k: decoded.append(a[0]) or decode(*a, **k))

    datamodule = _datamodule([str(shard)], resampled=False, batch_size=3)
    keys = [key for batch in _batches(datamodule) for key in batch["key"]]
    assert keys == ["0000-000000", "0000-000002"]
    skipped = datamodule.skipped_counts()
    assert skipped["oversized_image"] == 1 and skipped["corrupt_jpeg"] == 0
    assert len(decoded) == 2 and all(not data.startswith(b"\x89PNG") for data in decoded)  # never decoded


def test_shapes_and_ranges_for_condition_64_target_128(tmp_path):
    paths = write_synthetic_shards(tmp_path, 1, 6, image_size=96)  # upscaled; some good images are wide
    [batch] = _batches(
        _datamodule([str(p) for p in paths], batch_size=6, target_size=128, condition_size=64), 1
    )
    assert batch["image"].shape == (6, 3, 128, 128) and batch["image"].dtype == torch.float32
    assert batch["condition"].shape == (6, 3, 64, 64) and batch["condition"].dtype == torch.float32
    for name in ("image", "condition"):
        assert batch[name].min() >= -1 and batch[name].max() <= 1
        assert batch[name].max() - batch[name].min() > 1  # real content, not a constant
    for name in ("prompt", "t5_text", "reflection", "subset", "key"):
        assert len(batch[name]) == 6 and all(isinstance(v, str) for v in batch[name])


def _assert_same_batches(expected, actual):
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual, strict=True):
        assert a["key"] == b["key"] and a["t5_text"] == b["t5_text"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["condition"], b["condition"])
        # `corrupt` lists ids first found in the batch; after a resume some are already known (not decoded).
        assert {**a["meta"], "corrupt": None} == {**b["meta"], "corrupt": None}


def _resumed(shards, state, **options) -> GenRefDataModule:
    """A fresh datamodule restored from `state` the way Lightning does it (load_state_dict, then setup)."""
    datamodule = _datamodule(shards, setup=False, **options)
    datamodule.load_state_dict(state)
    datamodule.setup("fit")
    return datamodule


def _skips_after(batches) -> dict[str, int]:
    latest = {batch["meta"]["stream"]: batch["meta"]["skipped"] for batch in batches}
    return {
        reason: sum(counts[reason] for counts in latest.values()) for reason in next(iter(latest.values()))
    }


def test_resume_with_two_workers_continues_the_exact_stream(broken_shards):
    options = dict(split_ratios=RATIOS, training_stages=[0, 6], num_workers=2, batch_size=3)
    reference = _batches(_datamodule(broken_shards, **options), 14)
    assert sum(len(b["meta"]["corrupt"]) for b in reference[:7]) > 0  # corrupt JPEGs met before the stop

    stopped = _datamodule(broken_shards, **options)
    _batches(stopped, 7)  # odd: the resumed iterator's worker 0 serves stream 1
    state = stopped.state_dict()
    assert state["batches_consumed"] == 7 and state["known_corrupt"]

    resumed = _resumed(broken_shards, state, **options)
    _assert_same_batches(reference[7:], _batches(resumed, 7))
    assert resumed.skipped_counts() == _skips_after(reference)


def test_resume_replays_without_decoding(broken_shards, monkeypatch):
    options = dict(split_ratios=RATIOS, training_stages=[0, 6], num_workers=0, batch_size=3)
    reference = _batches(_datamodule(broken_shards, **options), 10)
    stopped = _datamodule(broken_shards, **options)
    _batches(stopped, 4)

    decoded = []
    original = stream_module.decode_pair
    monkeypatch.setattr(stream_module, "decode_pair", lambda *a, **k: decoded.append(1) or original(*a, **k))
    resumed = _resumed(broken_shards, stopped.state_dict(), **options)
    _assert_same_batches(reference[4:], _batches(resumed, 6))
    # Only the samples of the 6 new batches were decoded (plus corrupt ones first met in them).
    assert len(decoded) == 6 * 3 + sum(len(b["meta"]["corrupt"]) for b in reference[4:])


def test_resume_with_another_layout_warns(shards):
    datamodule = _datamodule(shards, num_workers=2)
    _batches(datamodule, 3)
    state = datamodule.state_dict()
    other = _datamodule(shards, num_workers=1)
    with pytest.warns(UserWarning, match="num_streams"):
        other.load_state_dict(state)


def test_mixing_needs_the_resampled_stream(shards):
    with pytest.raises(ValueError, match="resampled"):
        GenRefDataModule(shards, split_ratios=RATIOS, training_stages=[0, 6], resampled=False)
