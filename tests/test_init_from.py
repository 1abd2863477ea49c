"""train.init_from: a new run from an imported model (step 0, fresh optimizer, any layout), its
refusals, and a restart that resumes the run's own checkpoints."""

import itertools
import json
import math
import os
import subprocess

import pytest
import torch

from card_megatron.config import ConfigError, load_config
from tests.distributed import REPO, clean_env, torchrun_command
from tests.test_import_hf import llama_dir
from tests.training_runs import read_export

pytest.importorskip("transformers")

RUN = [  # no model architecture keys: they come from the checkpoint
    "model.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.eval_iters=2",
    "train.log_interval=1",
    "optim.lr=1e-3",
    "optim.lr_warmup_iters=1",
    "data.split=80,20,0",
    "logging.probe_window=4",
]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(export dir, shard prefix): a random Llama imported, and Python docs tokenized with its tokenizer.json."""
    from card_megatron.data.corpus import builtin_documents
    from card_megatron.data.preprocess import PreprocessOptions, preprocess
    from card_megatron.interop.hf_import import import_hf
    from tests.test_hf_tokenizer import train_bpe

    root = tmp_path_factory.mktemp("init_from")
    docs = list(itertools.islice(builtin_documents(), 300))
    bpe = train_bpe(docs[:150], root / "bpe.json", vocab_size=300)
    src, _ = llama_dir(root / "hf", bpe, seed=4, num_key_value_heads=2)
    import_hf(src, str(root / "imported"))
    with open(root / "docs.jsonl", "w") as f:
        for d in docs[150:]:
            f.write(json.dumps({"text": d}) + "\n")
    preprocess(
        PreprocessOptions(
            inputs=[str(root / "docs.jsonl")],
            output_prefix=str(root / "docs"),
            tokenizer_model=str(root / "imported" / "tokenizer.json"),
        )
    )
    return str(root / "imported"), str(root / "docs_text_document")


def args_for(imported, run_dir, iters, *extra):
    export, prefix = imported
    return [
        *RUN,
        f"train.init_from={export}",
        f"data.data_path={prefix}",
        f"train.run_dir={run_dir}",
        f"train.train_iters={iters}",
        *extra,
    ]


def reference_nll(args) -> float:
    """Mean NLL per token of the imported model over the run's validation samples, computed here in
    one process with plain log-softmax over the whole (padded) vocabulary."""
    from card_megatron.data import build_datasets
    from card_megatron.inference.loading import load_model
    from card_megatron.tokenizers import load_tokenizer

    cfg = load_config(None, args)
    loaded = load_model(cfg.train.init_from, device="cpu")
    t = cfg.train
    n = t.eval_iters * t.global_batch_size
    datasets = build_datasets(
        cfg.data,
        cfg.model.seq_length,
        t.seed,
        {"train": t.train_iters * t.global_batch_size, "valid": n, "test": 0},
        tokenizer=load_tokenizer(cfg.data.tokenizer_model),
    )
    tokens = torch.stack([torch.as_tensor(datasets["valid"][i]["tokens"]) for i in range(n)]).long()
    with torch.no_grad():
        logits = loaded.model(tokens[:, :-1], torch.arange(tokens.shape[1] - 1).expand(n, -1)).transpose(0, 1)
        nll = -torch.log_softmax(logits.double(), -1).gather(-1, tokens[:, 1:, None])
    return float(nll.mean())


def train(nproc, args, summary=None):
    cmd = torchrun_command(
        nproc, ["-m", "card_megatron.train", *args, *(["--summary-json", summary] if summary else [])]
    )
    r = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-5000:]
    return r


def first_eval(run_dir):
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        return json.loads(f.readline())


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective,layout",
    [
        ("card", ["parallel.tensor_model_parallel_size=2", "parallel.zero_stage=1"]),
        # data parallel 2, ZeRO-1 partitions the optimizer state; layer 0 frozen
        ("arm", ["parallel.zero_stage=1", "optim.freeze_layers=1"]),
    ],
)
def test_first_validation_is_the_imported_models_perplexity(imported, tmp_path, objective, layout):
    run_dir = str(tmp_path / "run")
    args = args_for(imported, run_dir, 2, f"objective.name={objective}", *layout)
    r = train(2, args)
    assert "initialised from" in r.stderr + r.stdout
    ev = first_eval(run_dir)
    assert ev["step"] == 0
    ref = reference_nll(args)
    # rel 1e-5: TP=2 / DP=2 against one process, fp32 (measured 3.6e-9 and 1.5e-9 on nll 6.81: 2,800x margin)
    assert math.isclose(ev["val_nll"], ref, rel_tol=1e-5), (ev["val_nll"], ref)
    assert abs(ref - math.log(384)) > 0.5  # far from a uniform model: the comparison has teeth
    trained = read_export(os.path.join(run_dir, "checkpoints", "step_00000002"))["state_dict"]
    start = read_export(imported[0])["state_dict"]
    frozen = "optim.freeze_layers=1" in layout
    for key in start:
        same = torch.equal(trained[key], start[key])
        assert same == (frozen and key.startswith("layers.0.")), key  # everything else trained
    # a restart of the same run resumes its own checkpoint (step 2), not the imported weights
    summary = str(tmp_path / "summary.json")
    r = train(2, args_for(imported, run_dir, 3, f"objective.name={objective}", *layout), summary)
    with open(summary) as f:
        assert json.load(f)["start_step"] == 2
    assert "initialised from" not in r.stderr + r.stdout


def test_refusals_list_every_difference(imported, tmp_path):
    from card_megatron.training.init_from import read_init_weights

    export, prefix = imported
    base = [f"data.data_path={prefix}", f"train.run_dir={tmp_path / 'r'}"]
    cfg = load_config(None, [*RUN, *base, f"train.init_from={export}"])  # architecture from the checkpoint
    assert (cfg.model.hidden_size, cfg.model.num_query_groups, cfg.model.rotary_base) == (64, 2, 50000)
    assert cfg.data.tokenizer_model == os.path.join(export, "tokenizer.model")
    assert read_init_weights(cfg).rows == 384
    cfg = load_config(None, [*RUN, *base, f"train.init_from={export}", "model.hidden_size=128", "model.num_layers=3"])
    with pytest.raises(ConfigError) as e:
        read_init_weights(cfg)
    assert "model.num_layers: checkpoint 2, this run 3" in str(e.value)
    assert "model.hidden_size: checkpoint 64, this run 128" in str(e.value)
    other = tmp_path / "other.json"
    with open(os.path.join(export, "tokenizer.json")) as f:
        other.write_text(f.read().replace('"<|endoftext|>"', '"<|eot|>"'))
    cfg = load_config(None, [*RUN, *base, f"train.init_from={export}", f"data.tokenizer_model={other}"])
    with pytest.raises(ConfigError, match="is not the checkpoint's tokenizer"):
        read_init_weights(cfg)
    with pytest.raises(ConfigError, match="train.init_from: checkpoint not found: .*missing"):
        load_config(None, [*RUN, *base, f"train.init_from={tmp_path / 'missing'}"])
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "tokenizer.model"):
        with open(os.path.join(export, name), "rb") as src, open(broken / name, "wb") as dst:
            dst.write(src.read())
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    cfg = load_config(None, [*RUN, *base, f"train.init_from={broken}"])
    with pytest.raises(ValueError, match="model.pt is not a card_megatron export"):
        read_init_weights(cfg)
