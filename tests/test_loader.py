"""Every way a checkpoint can be broken gives one clear CheckpointError naming the file (and tensor)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusionserve.models.config import load_config
from fusionserve.models.decoder import Decoder
from fusionserve.models.errors import CheckpointError
from fusionserve.models.loader import load_weights
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pristine"), arch="llama")


@pytest.fixture
def ckpt(pristine, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(pristine, dst)
    return dst


def rewrite(ckpt, edit):
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight") as err:
        load_weights(ckpt, progress=False)
    assert err.value.tensor == "model.layers.1.mlp.up_proj.weight"


def test_wrong_shape(ckpt):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)

    rewrite(ckpt, shrink)
    with pytest.raises(CheckpointError, match=r"wrong shape \(8, 64\).*k_proj") as err:
        load_weights(ckpt, progress=False)
    assert err.value.file.endswith("model.safetensors")


def test_unknown_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPTBigCodeForCausalLM"], "gpt_bigcode"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unsupported architecture.*GPTBigCode.*config\.json"):
        load_config(ckpt)


def test_unsupported_rope_scaling(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported rope scaling 'yarn'"):
        load_config(ckpt)


def test_corrupt_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 16 + data[16:200])
    with pytest.raises(CheckpointError, match=r"corrupt or unreadable safetensors.*model\.safetensors"):
        load_weights(ckpt, progress=False)


def test_truncated_file(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_weights(ckpt, progress=False)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing config\.json"):
        Decoder.from_pretrained(ckpt, progress=False)


def test_garbage_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable config"):
        load_config(ckpt)


def test_incomplete_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_config(ckpt)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_weights(ckpt, progress=False)


def test_missing_shard(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "sharded", max_shard_size="100KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard is missing.*{shard.name}"):
        load_weights(path, progress=False)


def test_gains_are_folded_once_in_fp32(pristine):
    _, w = load_weights(pristine, progress=False)
    raw = load_file(pristine / "model.safetensors")
    gain = raw["model.layers.0.input_layernorm.weight"]
    q = raw["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(w.layers[0].w_qkv[: q.shape[0]], q * gain[None, :])
    assert torch.allclose(w.lm_head, raw["lm_head.weight"] * raw["model.norm.weight"][None, :])
