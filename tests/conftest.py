"""Test set-up: hypothesis profiles, the Triton interpreter on CPU machines, the ``gpu`` marker, a
private autotune cache."""
import json
import os
import tempfile

import torch

# The suite neither reads nor writes the user's autotune cache (dsgraph/autotune.py).
os.environ["DSGRAPH_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsgraph-test-cache-")

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter; set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Shards: N processes with THOROUGH_EXAMPLES=10000/N and distinct --hypothesis-seed values cover the
# 10,000 examples in parallel (each shard explores from its own seed).
settings.register_profile("thorough", max_examples=int(os.environ.get("THOROUGH_EXAMPLES", 10_000)), deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine (see README, GPU tests)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _write_checkpoint(path, tensors: dict, config: dict, n_shards: int = 2) -> None:
    """A checkpoint directory written the way released ones are: ``n_shards`` safetensors shards
    (keys dealt round-robin), ``model.safetensors.index.json`` and ``config.json``."""
    os.makedirs(path, exist_ok=True)
    keys = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        shard = {k: tensors[k] for k in keys[i::n_shards]}
        save_file(shard, os.path.join(path, name))
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture
def write_checkpoint():
    return _write_checkpoint


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: compiled frames of the same model code would otherwise pile
    up across tests until Dynamo's recompile limit sends a frame to plain eager, unrewritten."""
    torch._dynamo.reset()
    yield
