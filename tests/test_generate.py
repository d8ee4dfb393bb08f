"""lowbit.generate and `lowbit generate` on a tiny random Llama (head_dim 64, so the quantized KV cache takes it)
with a byte-level tokenizer built offline: greedy output equals model.generate's, streamed pieces concatenate to
the text, EOS stops, the 2/4-bit KV cache (exact while the window holds everything; smaller than fp16 once tokens
are quantized), quantized weights, sampling seeds, chat templates, bad arguments, and the CLI end to end."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import lowbit.nn.kv_cache as kv_cache  # noqa: E402
from lowbit.cli import main  # noqa: E402
from lowbit.generate import GenerationResult, generate  # noqa: E402
from lowbit.io import save_quantized  # noqa: E402
from lowbit.models import quantize_model  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog"  # 43 byte tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: one token per UTF-8 byte, vocab 256, no special tokens."""
    from tokenizers import decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def tiny_llama(seed: int = 0):
    """Random Llama, vocab 256, head_dim 64 (one the KV kernels support), no EOS; initializer_range 0.1 so that
    greedy decoding does not just repeat one token."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                      max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def reference(model, tokenizer, prompt, new):
    """model.generate's greedy new token ids."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_equals_model_generate_and_stream_concatenates(model, tokenizer):
    pieces = []
    r = generate(model, tokenizer, PROMPT, max_new_tokens=30, stream=pieces.append)
    ref = reference(model, tokenizer, PROMPT, 30)
    assert isinstance(r, GenerationResult)
    assert r.token_ids == ref and r.text == tokenizer.decode(ref, skip_special_tokens=True)
    assert len(set(ref)) > 5  # the model does not just repeat a token
    assert "".join(pieces) == r.text and len(pieces) > 1
    assert r.prompt_tokens == 43 and r.new_tokens == 30 and not r.stopped_at_eos
    assert r.prompt_text == PROMPT
    assert r.prefill_seconds > 0 and r.seconds > 0 and r.tokens_per_second == pytest.approx(29 / r.seconds)
    assert r.kv_bits is None and r.kv_cache_nbytes is None and r.kv_cache_fp16_nbytes is None
    json.dumps(r.as_dict())
    assert r.summary().startswith("-- 30 tokens: ") and "prefill 43 tokens" in r.summary()


def test_stream_holds_back_incomplete_utf8(tokenizer):
    """Multi-byte characters arrive byte by byte: no piece carries a replacement character."""

    class Fake:  # a "model" emitting the bytes of a fixed text, through the real streamer
        generation_config = transformers.GenerationConfig()
        config = None

        def __init__(self, ids):
            self.ids = ids

        def parameters(self):
            yield torch.zeros(1)

        def generate(self, input_ids, streamer, max_new_tokens, **kwargs):
            streamer.put(input_ids)
            for t in self.ids[:max_new_tokens]:
                streamer.put(torch.tensor([t]))
            streamer.end()
            return torch.cat([input_ids, torch.tensor([self.ids[:max_new_tokens]])], 1)

    text = "naïve → 日本語 ok"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode())
    pieces = []
    r = generate(Fake(ids), tokenizer, "x", max_new_tokens=len(ids), stream=pieces.append)
    assert r.text == text and "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert {"ï", "→", "日", "本", "語"} <= set(pieces)  # each emitted as soon as its last byte came


def test_eos_stops_generation(tokenizer):
    model = tiny_llama()
    ref = reference(model, tokenizer, PROMPT, 10)
    eos = ref[3]
    model.generation_config.eos_token_id = eos
    r = generate(model, tokenizer, PROMPT, max_new_tokens=10)
    stop = ref.index(eos)
    assert r.token_ids == ref[:stop + 1] and r.new_tokens == stop + 1 < 10 and r.stopped_at_eos


@pytest.mark.parametrize("bits", [2, 4])
def test_kv_window_holding_everything_is_exact(model, tokenizer, bits, monkeypatch):
    calls = []
    kernel = kv_cache.quantized_attention_decode
    monkeypatch.setattr(kv_cache, "quantized_attention_decode", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    r = generate(model, tokenizer, PROMPT, max_new_tokens=12, kv_bits=bits, kv_residual=128)
    assert r.token_ids == reference(model, tokenizer, PROMPT, 12)
    assert len(calls) == 2 * 11  # the fused decode kernel: 2 layers x 11 decode steps
    assert r.kv_bits == bits and r.kv_cache_nbytes > 0 and r.kv_cache_fp16_nbytes > 0
    assert "KV cache" in r.summary()
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("bits", [2, 4])
def test_kv_quantized_tokens_take_fewer_bytes(model, tokenizer, bits):
    r = generate(model, tokenizer, PROMPT, max_new_tokens=30, kv_bits=bits, kv_residual=0, kv_group=32)
    assert r.new_tokens == 30
    cached = 43 + 29  # the last token is never fed back
    assert r.kv_cache_fp16_nbytes == 2 * 2 * 1 * cached * 64 * 2  # layers x (K, V) x heads x tokens x dim x 2 B
    # per layer: 64 tokens quantized (codes; fp16 scale and zero per channel per 32 tokens for keys, per 32
    # channels per token for values) and 8 in the window (fp32, the model's dtype)
    per_token = 2 * (64 * bits // 8) + 2 * 64 * 2 // 32 + 2 * 2 * 2
    assert r.kv_cache_nbytes == 2 * (64 * per_token + 8 * 64 * 4 * 2)
    assert r.kv_cache_nbytes < r.kv_cache_fp16_nbytes
    assert f"KV cache {bits}-bit" in r.summary()


def test_quantized_weights_generate(tokenizer):
    model = tiny_llama()
    quantize_model(model, "rtn", 4, 32, progress=False)
    r = generate(model, tokenizer, PROMPT, max_new_tokens=8)
    assert r.token_ids == reference(model, tokenizer, PROMPT, 8) and r.new_tokens == 8
    r2 = generate(model, tokenizer, PROMPT, max_new_tokens=8, kv_bits=4)
    assert r2.token_ids == r.token_ids


def test_sampling_is_seeded(model, tokenizer):
    state = torch.random.get_rng_state()
    a = generate(model, tokenizer, PROMPT, 12, do_sample=True, temperature=1.5, seed=1)
    b = generate(model, tokenizer, PROMPT, 12, do_sample=True, temperature=1.5, seed=1)
    c = generate(model, tokenizer, PROMPT, 12, do_sample=True, temperature=1.5, top_p=0.9, top_k=20, seed=2)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone


def test_chat_template(model):
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="chat template"):
        generate(model, tok, "hi", 2, chat=True)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    r = generate(model, tok, "hi", 3, chat=True)
    assert r.prompt_text == "<user>hi\n<assistant>" and r.prompt_tokens == len(r.prompt_text)
    assert r.token_ids == reference(model, tok, r.prompt_text, 3)


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(kv_bits=3), "kv_bits"), (dict(kv_bits=True), "kv_bits"), (dict(kv_residual=-1), "kv_residual"),
    (dict(kv_group=48), "kv_group"), (dict(kv_rotate=1), "kv_rotate"), (dict(do_sample="yes"), "do_sample"),
    (dict(temperature=0.0), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_p=0), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(seed=None), "seed"), (dict(stream="print"), "stream"),
    (dict(chat=None), "chat"), (dict(prompt=b"bytes"), "prompt"), (dict(prompt=""), "prompt"),
])
def test_bad_arguments(model, tokenizer, kwargs, name):
    args = dict(prompt=PROMPT, max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=name) as info:
        generate(model, tokenizer, **args)
    if name != "prompt":
        assert repr(kwargs[name]) in str(info.value)


def test_kv_bits_refuses_an_unsupported_head_dim(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(ValueError, match="head_dim is one of .* this model's is 16"):
        generate(model, tokenizer, PROMPT, 2, kv_bits=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    model = tiny_llama()
    quantize_model(model, "rtn", 4, 32, progress=False)
    path = save_quantized(model, tmp_path_factory.mktemp("gen") / "ckpt")
    tokenizer.save_pretrained(str(path))
    return path, reference(model, tokenizer, PROMPT, 5)


def test_cli_json(checkpoint, capsys):
    path, ref = checkpoint
    main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == ref and out["new_tokens"] == 5 and out["prompt_tokens"] == 43
    assert out["text"] == byte_tokenizer().decode(ref) and out["kv_bits"] is None
    main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "5", "--kv-bits", "2",
          "--kv-residual", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["kv_bits"] == 2 and out["new_tokens"] == 5 and 0 < out["kv_cache_nbytes"]
    main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "5", "--float-activations",
          "--json"])
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 5
    import resource
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 50 * 2**20 < out["peak_memory_bytes"] <= own_peak * 1.01  # this process's peak, torch imported


def test_cli_human_output(checkpoint, capsys):
    path, ref = checkpoint
    main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "5", "--kv-bits", "4"])
    captured = capsys.readouterr()
    assert captured.out == PROMPT + byte_tokenizer().decode(ref) + "\n"
    assert captured.err.startswith("-- 5 tokens: ") and "tokens/s" in captured.err
    assert "prefill 43 tokens" in captured.err and "KV cache 4-bit: " in captured.err and "fp16: " in captured.err
    assert captured.err.rstrip().endswith("MiB") and "peak memory " in captured.err


def test_cli_errors(checkpoint, capsys):
    path, _ = checkpoint
    with pytest.raises(SystemExit, match="max_new_tokens must be an int >= 1, got 0"):
        main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "0"])
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(path), "--prompt", PROMPT, "--kv-bits", "3"])
    assert "invalid choice" in capsys.readouterr().err
