"""Synthetic shards, shard pattern checks (local, pipe:, http) and raw reading with skip counts."""

import http.server
import threading
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from helpers.fake_hub import FakeHub

from reflectionflow.data.sources import ShardSourceError, check_shards, expand_shards, read_shard
from reflectionflow.data.synthetic import cached_synthetic_shards, write_synthetic_shards
from reflectionflow.data.transforms import decode_pair

BROKEN = {"corrupt_jpeg": 2, "missing_key": 2, "empty_member": 1, "truncated_tar": 1}


def _read_all(paths) -> tuple[list, Counter]:
    skipped = Counter()
    return [raw for path in paths for raw in read_shard(str(path), skipped)], skipped


def test_synthetic_shards_are_deterministic_real_jpeg_pairs(tmp_path):
    first = write_synthetic_shards(tmp_path / "a", 2, 10, image_size=32, seed=3)
    second = write_synthetic_shards(tmp_path / "b", 2, 10, image_size=32, seed=3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    other = write_synthetic_shards(tmp_path / "c", 2, 10, image_size=32, seed=4)
    assert first[0].read_bytes() != other[0].read_bytes()

    samples, skipped = _read_all(first)
    assert len(samples) == 20 and sum(skipped.values()) == 0
    assert {s.subset for s in samples} == {"general", "length", "rule", "editing"}
    for raw in samples:
        good, bad = decode_pair(raw.members["good_image.jpg"], raw.members["bad_image.jpg"], 32, 32, None)
        assert good.shape == bad.shape == (32, 32, 3)
        changed = (np.abs(good.astype(int) - bad.astype(int)).max(axis=-1) > 40).mean()
        assert changed > 0.01  # the flawed image visibly differs
        assert raw.members["reflection.txt"] and raw.members["prompt.txt"]


def test_broken_samples_are_skipped_and_counted_per_reason(tmp_path):
    paths = write_synthetic_shards(tmp_path, 3, 5, image_size=32, broken=BROKEN)
    assert len(paths) == 4  # the truncated shard comes last
    samples, skipped = _read_all(paths)
    # JPEG corruption only shows when decoding: the raw reader passes those samples on.
    assert sorted(s.key for s in samples if "broken" in s.key) == [
        "0000-broken-corrupt_jpeg-000",
        "0001-broken-corrupt_jpeg-001",
    ]
    assert len(samples) == 15 + 2
    assert skipped == Counter({"missing_key": 2, "empty_member": 1, "truncated_tar": 1})


def test_unreadable_shards_are_counted_not_raised(tmp_path):
    skipped = Counter()
    assert list(read_shard(str(tmp_path / "gone.tar"), skipped)) == []
    assert list(read_shard("pipe:exit 3", skipped)) == []
    assert skipped == Counter({"unreadable_shard": 1, "truncated_tar": 1})


def test_pipe_sources_read_like_local_files(tmp_path):
    [path] = write_synthetic_shards(tmp_path, 1, 4, image_size=16)
    local, _ = _read_all([path])
    piped, _ = _read_all([f"pipe:cat {path}"])
    assert [s.members for s in piped] == [s.members for s in local]


def test_check_shards_expands_braces_and_globs(tmp_path):
    paths = write_synthetic_shards(tmp_path, 3, 1, image_size=16)
    assert check_shards(str(tmp_path / "genref_{0000..0002}.tar")) == [str(p) for p in paths]
    assert check_shards(str(tmp_path / "*.tar")) == [str(p) for p in paths]
    assert check_shards([str(paths[2]), str(paths[0])]) == [str(paths[2]), str(paths[0])]
    assert expand_shards(f"{paths[0]}::{paths[1]}") == [str(paths[0]), str(paths[1])]


def test_check_shards_names_what_cannot_be_used(tmp_path):
    write_synthetic_shards(tmp_path, 1, 1, image_size=16)
    with pytest.raises(ShardSourceError, match="matches no files"):
        check_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ShardSourceError, match=r"1 of 2 shards .*genref_0001\.tar"):
        check_shards(str(tmp_path / "genref_{0000..0001}.tar"))
    with pytest.raises(ShardSourceError, match="pipe:exit 7"):
        check_shards("pipe:exit 7")
    with pytest.raises(ShardSourceError, match="not a tar"):
        check_shards(f"pipe:echo hello; cat {tmp_path / 'genref_0000.tar'}")
    assert check_shards(f"pipe:cat {tmp_path / 'genref_0000.tar'}")


@pytest.fixture
def http_root(tmp_path):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    )
    server.RequestHandlerClass.log_message = lambda *args: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_shards_are_checked_and_read(http_root):
    root, url = http_root
    write_synthetic_shards(root, 2, 3, image_size=16)
    assert check_shards(f"{url}/genref_{{0000..0001}}.tar") == [
        f"{url}/genref_0000.tar",
        f"{url}/genref_0001.tar",
    ]
    samples, skipped = _read_all([f"{url}/genref_0001.tar"])
    assert len(samples) == 3 and sum(skipped.values()) == 0
    with pytest.raises(ShardSourceError, match="missing.tar"):
        check_shards(f"{url}/missing.tar")


def test_cached_synthetic_shards_are_written_once(tmp_path):
    pattern = cached_synthetic_shards(
        "train", num_shards=2, samples_per_shard=3, image_size=16, root=tmp_path
    )
    urls = check_shards(pattern)
    stamps = [p.stat().st_mtime_ns for p in map(Path, urls)]
    assert (
        cached_synthetic_shards("train", num_shards=2, samples_per_shard=3, image_size=16, root=tmp_path)
        == pattern
    )
    assert [p.stat().st_mtime_ns for p in map(Path, urls)] == stamps
    assert (
        cached_synthetic_shards("train", num_shards=2, samples_per_shard=4, image_size=16, root=tmp_path)
        != pattern
    )


def test_hub_shards_stream_through_huggingface_hub_with_the_token_from_hf_token(tmp_path, monkeypatch):
    paths = write_synthetic_shards(tmp_path, 2, 3, image_size=16)
    token = "hf_test_5e2c91d0-never-in-a-log"
    with FakeHub() as hub:
        for path in paths:
            hub.add_file("datasets", "org/genref", path.name, path.read_bytes(), token=token)
        hub.use_in_process(monkeypatch)
        pattern = "hf://datasets/org/genref/genref_{0000..0001}.tar"
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(ShardSourceError, match=r"genref_0000\.tar.*a gated or private dataset needs HF_TOKEN"):
            check_shards(pattern)
        monkeypatch.setenv("HF_TOKEN", token)
        urls = check_shards(pattern)
        assert urls == ["hf://datasets/org/genref/genref_0000.tar", "hf://datasets/org/genref/genref_0001.tar"]
        samples, skipped = _read_all(urls)
        local, _ = _read_all(paths)
        assert [s.members for s in samples] == [s.members for s in local] and not skipped
        downloads = [r for r in hub.requests if "/resolve/" in r.path]
        assert downloads and all(r.authorization == f"Bearer {token}" for r in downloads)
        with pytest.raises(ShardSourceError, match="missing.tar") as error:
            check_shards("hf://datasets/org/genref/missing.tar")
        assert token not in str(error.value)


def test_genref_config_streams_from_the_hub(compose_config):
    cfg = compose_config("train", "data=genref")
    assert cfg.data.shards == "hf://datasets/diffusion-cot/GenRef-wds/genref_{0..207}.tar"
    assert cfg.data.val_shards == "hf://datasets/diffusion-cot/GenRef-wds/genref_208.tar"
    assert len(expand_shards(cfg.data.shards)) == 208
