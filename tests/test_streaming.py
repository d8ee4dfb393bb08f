"""Block-by-block quantization from safetensors shards (lowbit.streaming): the same result as quantizing the loaded
model, each block's weights read only when its turn comes, bad checkpoint directories refused."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowbit import streaming  # noqa: E402
from lowbit.io import CheckpointError, load_quantized, save_quantized  # noqa: E402
from lowbit.models import quantize_model  # noqa: E402
from lowbit.nn import QuantLinear  # noqa: E402
from lowbit.streaming import quantize_pretrained  # noqa: E402
from test_models import calibration, tiny_llama  # noqa: E402


@pytest.fixture
def sharded(tmp_path):
    path = tmp_path / "fp"
    tiny_llama().save_pretrained(str(path), max_shard_size="60KB")
    assert (path / streaming.INDEX_NAME).is_file() and len(list(path.glob("*.safetensors"))) > 2
    return path


@pytest.mark.parametrize("method,bits", [("gptq", 4), ("quip", 2), ("vq", 2)])
def test_streamed_equals_in_memory(sharded, method, bits):
    ids = calibration()
    options = {"entries": 256} if method == "vq" else {}
    reference = tiny_llama()
    quantize_model(reference, method, bits, 32, calibration=ids, progress=False, **options)
    streamed, losses = quantize_pretrained(sharded, method, bits, 32, calibration=ids, progress=False, **options)
    assert len(losses) == 14
    ref_layers = {n: m for n, m in reference.named_modules() if isinstance(m, QuantLinear)}
    got_layers = {n: m for n, m in streamed.named_modules() if isinstance(m, QuantLinear)}
    assert ref_layers.keys() == got_layers.keys() and len(got_layers) == 14
    for name, layer in ref_layers.items():
        for t, value in layer.weight.tensors.items():
            assert torch.equal(got_layers[name].weight.tensors[t], value), (name, t)
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert streamed.lowbit_quantization["method"] == method


def test_blocks_are_read_one_at_a_time(sharded, monkeypatch, tmp_path):
    reads = []
    original = streaming.ShardedTensors.read

    def read(self, keys):
        reads.append(sorted({k.split(".")[2] for k in keys if k.startswith("model.layers.")}))
        return original(self, keys)

    quantized_when_read = []
    original_load = streaming._load_exactly

    def load(module, tensors, what, may_miss=lambda key: False):
        quantized_when_read.append((what, sum(isinstance(m, QuantLinear) for m in module.modules())))
        return original_load(module, tensors, what, may_miss)

    monkeypatch.setattr(streaming.ShardedTensors, "read", read)
    monkeypatch.setattr(streaming, "_load_exactly", load)
    model, _ = quantize_pretrained(sharded, "rtn", 4, 32, calibration=calibration(), progress=False)
    assert reads == [[], ["0"], ["1"]]  # first everything outside the blocks, then block by block
    assert [w for w, _ in quantized_when_read] == ["LlamaForCausalLM", "block 0", "block 1"]
    save_quantized(model, tmp_path / "q")
    ids = calibration(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "q")(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_single_file_checkpoint(tmp_path):
    path = tmp_path / "one"
    tiny_llama().save_pretrained(str(path))
    assert not (path / streaming.INDEX_NAME).exists()
    model, _ = quantize_pretrained(path, "rtn", 4, 32, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14


def test_bad_directories_are_refused(sharded, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        quantize_pretrained(tmp_path, "rtn", 4, 32, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((sharded / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no .safetensors file"):
        quantize_pretrained(empty, "rtn", 4, 32, progress=False)
    index = json.loads((sharded / streaming.INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (sharded / shard).rename(tmp_path / "moved.safetensors")
    with pytest.raises(CheckpointError, match=f"shard {shard} is missing"):
        quantize_pretrained(sharded, "rtn", 4, 32, progress=False)
    (tmp_path / "moved.safetensors").rename(sharded / shard)
    other = tmp_path / "other"
    config = transformers.LlamaConfig(**{**tiny_llama().config.to_dict(), "intermediate_size": 128})
    transformers.LlamaForCausalLM(config).save_pretrained(str(other))
    (other / "config.json").write_text((sharded / "config.json").read_text())
    with pytest.raises(CheckpointError, match="does not fit block 0: .*size mismatch"):
        quantize_pretrained(other, "rtn", 4, 32, progress=False)


def test_cli_quantize_streams_a_model_directory_and_its_head(sharded, tmp_path, capsys):
    from lowbit import cli
    from test_generate import byte_tokenizer
    byte_tokenizer().save_pretrained(str(sharded))
    cli.main(["quantize", "--model", str(sharded), "--method", "gptq", "--bits", "4", "--group-size", "32",
              "--n-samples", "4", "--seq-len", "32", "--lm-head-bits", "4", "--out", str(tmp_path / "q")])
    assert "block by block from the shards" in capsys.readouterr().out
    loaded = load_quantized(tmp_path / "q")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 15  # 2 blocks x 7 linears + the head
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lowbit_quantization["lm_head_bits"] == 4
