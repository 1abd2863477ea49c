"""Configuration: every YAML in configs/ loads and validates; bad values are named."""

import glob
import os

import pytest

from card_megatron.config import ConfigError, load_config, validate

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


def test_there_are_configs():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"tiny-cpu.yaml", "gpt-125m.yaml", "gpt-350m.yaml", "card-1b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_validates(path):
    cfg = load_config(path)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    dp = cfg.train.global_batch_size // cfg.train.micro_batch_size
    validate(cfg, world_size=tp * pp)  # the smallest world the layout admits
    assert cfg.model.hidden_size % cfg.model.num_attention_heads == 0
    assert dp >= 1


def test_paper_config_is_the_paper_model():
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "card-1b.yaml"))
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.ffn_hidden_size, m.seq_length) == (
        33,
        1536,
        24,
        4096,
        128,
    )


def test_overrides_and_types():
    cfg = load_config(None, ["objective.name=arm", "train.train_iters=7", "optim.lr=1e-3", "logging.wandb=true"])
    assert (cfg.objective.name, cfg.train.train_iters, cfg.optim.lr, cfg.logging.wandb) == ("arm", 7, 1e-3, True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.nonexistent=1"], "unknown key model.nonexistent"),
        (["nosection.key=1"], "unknown section 'nosection'"),
        (["train.train_iters=abc"], "train.train_iters: expected an integer"),
        (["objective.name=gpt"], "objective.name ('gpt') must be one of"),
        (
            ["model.num_attention_heads=6", "parallel.tensor_model_parallel_size=4"],
            "num_attention_heads (6) must be divisible by parallel.tensor_model_parallel_size (4)",
        ),
        (["parallel.pipeline_model_parallel_size=2", "parallel.zero_stage=2"], "zero_stage (2) with pipeline"),
        (["objective.name=bd3lm", "objective.block_size=5"], "block_size (5) must divide model.seq_length (128)"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "must be a multiple of train.micro_batch_size"),
        (["objective.tail_factor=0.5"], "tail_factor (0.5) must be >= 1"),
        (["noequals"], "expected section.key=value"),
        (["optim.ema_decay=1.0"], "optim.ema_decay (1.0) must be in [0, 1)"),
        (["train.eval_ema=true"], "train.eval_ema needs an EMA: set optim.ema_decay"),
        # the choices of an enumerated key are its Literal type
        (["train.precision=fp8"], "train.precision ('fp8') must be one of auto, bf16, fp16, fp32"),
        (
            ["parallel.distributed_backend=mpi"],
            "parallel.distributed_backend ('mpi') must be one of nccl, gloo (or none)",
        ),
        (["optim.lr_decay_style=step"], "optim.lr_decay_style ('step') must be one of cosine, linear, constant"),
        (["data.split=1,nan,1"], "data.split ('1,nan,1') must be three non-negative weights"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["objective.name=x", "objective.masking=y", "train.precision=z"])
    text = str(e.value)
    assert "objective.name" in text and "objective.masking" in text and "train.precision" in text


def test_world_size_checks():
    cfg = load_config(
        None, ["parallel.tensor_model_parallel_size=2", "train.global_batch_size=8", "train.micro_batch_size=4"]
    )
    with pytest.raises(ConfigError, match=r"world size \(3\) must be divisible"):
        validate(cfg, world_size=3)
    with pytest.raises(ConfigError, match=r"multiple of micro_batch_size \(4\) x data-parallel size \(4\)"):
        validate(cfg, world_size=8)
    validate(cfg, world_size=4)


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 3\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown key model.hiden_size"):
        load_config(str(path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.clip_grad=-1", "optim.clip_grad (-1.0) must be >= 0"),
        ("optim.lr_warmup_iters=-10", "optim.lr_warmup_iters (-10) must be >= 0"),
        ("optim.weight_decay=-3", "optim.weight_decay (-3.0) must be >= 0"),
        ("model.init_method_std=-1", "model.init_method_std (-1.0) must be positive"),
        ("optim.adam_beta1=5", "optim.adam_beta1 (5.0) must be in [0, 1)"),
        ("model.hidden_dropout=2", "model.hidden_dropout (2.0) must be in [0, 1)"),
        ("optim.lr=nan", "optim.lr (nan) must be a finite number"),
        ("optim.adam_eps=inf", "optim.adam_eps (inf) must be a finite number"),
        ("train.eval_iters=0", "train.eval_iters (0) must be >= 1"),
        ("data.num_workers=-1", "data.num_workers (-1) must be >= 0"),
        ("optim.lr_decay_iters=0", "optim.lr_decay_iters (0) must be >= 1"),
    ],
)
def test_numeric_values_out_of_range_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_every_numeric_key_has_a_range():
    import dataclasses
    import typing

    from card_megatron.config import RANGES, Config

    for section in dataclasses.fields(Config):
        for f, tp in typing.get_type_hints(type(getattr(Config(), section.name))).items():
            if int in (tp, *typing.get_args(tp)) or float in (tp, *typing.get_args(tp)):
                assert f"{section.name}.{f}" in RANGES, f"{section.name}.{f} has no range in config.RANGES"


def test_override_text_of_string_keys_is_kept_as_given():
    cfg = load_config(
        None,
        [
            "train.run_dir=on",
            "data.data_path=0123",
            "data.tokenizer_model=0x1F",
            "data.cache_dir=none",
            "train.seed=0123",
            "optim.lr=1e-3",
            "logging.wandb=on",
        ],
    )
    assert (cfg.train.run_dir, cfg.data.data_path, cfg.data.tokenizer_model) == ("on", "0123", "0x1F")
    assert cfg.data.cache_dir is None and cfg.train.seed == 123 and cfg.optim.lr == 1e-3 and cfg.logging.wandb


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.hidden_size=[1", "command line: model.hidden_size: expected an integer, got '[1'"),
        ("optim.lr={a: 1", "command line: optim.lr: expected a number, got '{a: 1'"),
        ("logging.wandb=maybe", "command line: logging.wandb: expected true/false, got 'maybe'"),
    ],
)
def test_unparsable_override_names_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_resume_changes_lists_what_may_not_change():
    from card_megatron.config import resume_changes

    saved = load_config(None, ["data.data_path=a", "model.seq_length=64"])
    same_run = load_config(
        None,
        [
            "data.data_path=a",
            "model.seq_length=64",
            "train.train_iters=5000",
            "optim.lr=1e-4",
            "optim.lr_decay_style=linear",
            "train.log_interval=1",
            "train.eval_iters=3",
            "data.num_workers=2",
            "train.keep_last_checkpoints=9",
            "logging.wandb=true",
            "train.micro_batch_size=4",
        ],
    )
    assert resume_changes(saved, same_run) == []
    assert resume_changes(saved, same_run, saved_dp=1, dp=2) == []  # ZeRO 0: another data-parallel size is fine
    changed = load_config(
        None,
        [
            "data.data_path=b",
            "model.seq_length=128",
            "objective.name=arm",
            "parallel.tensor_model_parallel_size=2",
            "parallel.zero_stage=1",
            "optim.adam_beta2=0.99",
            "train.train_iters=9",
        ],
    )
    got = resume_changes(saved, changed, saved_dp=2, dp=1)
    assert got[:-1] == [
        "model.seq_length: 64 -> 128",
        "objective.name: 'card' -> 'arm'",
        "data.data_path: 'a' -> 'b'",
        "parallel.tensor_model_parallel_size: 1 -> 2",
        "parallel.zero_stage: 0 -> 1",
        "optim.adam_beta2: 0.95 -> 0.99",
    ]
    assert got[-1].startswith("data-parallel size: 2 -> 1 under parallel.zero_stage 1")


def test_resume_allows_what_does_not_change_the_maths_and_compares_resolved_values():
    """Activation recomputation, fused kernels and the ELBO's sample count may change on resume;
    train.precision compares by what it resolved to on each machine (issue 21)."""
    from card_megatron.config import resume_changes

    saved = load_config(None, ["data.data_path=a"])
    same_maths = load_config(
        None,
        [
            "data.data_path=a",
            "model.recompute_activations=true",
            "model.fused_kernels=false",
            "objective.eval_t_samples=8",
            "train.drop_ema=true",
            "data.allow_missing_sidecar=true",
        ],
    )
    assert resume_changes(saved, same_maths) == []
    fp32 = load_config(None, ["data.data_path=a", "train.precision=fp32"])
    cpu = {"train.precision": "fp32", "parallel.distributed_backend": "gloo"}
    gpu = {"train.precision": "bf16", "parallel.distributed_backend": "nccl"}
    assert resume_changes(saved, fp32) == ["train.precision: 'auto' -> 'fp32'"]  # without the record: as written
    assert resume_changes(saved, fp32, saved_resolved=cpu, resolved=cpu) == []  # auto was fp32 here
    assert resume_changes(saved, saved, saved_resolved=gpu, resolved=cpu) == [
        "train.precision: 'auto' (bf16) -> 'auto' (fp32)"  # auto on a GPU, resumed on a CPU
    ]


def test_every_key_has_a_description_and_the_docs_list_them():
    """Each config field has a one-line docstring; --help-config and docs/config.md show every key."""
    import dataclasses

    from card_megatron.config import Config, config_help, config_markdown, field_docs

    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section.name}.{f.name} has no docstring in config.py"
            assert f"{section.name}.{f.name} = " in config_help()
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "config.md")
    with open(path) as f:
        assert f.read() == config_markdown(), "docs/config.md is stale: regenerate it from config.config_markdown()"


def test_help_config_prints_the_keys(capsys):
    from card_megatron.train import main

    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert "objective.name = 'card'  (card | arm | mdlm | bd3lm)" in out and "Objective: CARD" in out


def test_an_objective_built_without_the_loader_is_checked_by_the_same_rules():
    import dataclasses

    from card_megatron.config import ObjectiveConfig
    from card_megatron.objectives import build_objective

    for changes, message in (
        ({"masking": "random"}, "objective.masking ('random') must be one of tail, uniform"),
        ({"tail_factor": 0.5}, "objective.tail_factor (0.5) must be >= 1"),
        ({"name": "bd3lm", "block_size": 3}, "objective.block_size (3) must divide"),
    ):
        with pytest.raises(ConfigError) as e:
            build_objective(dataclasses.replace(ObjectiveConfig(), **changes), 8, 9, 10)
        assert message in str(e.value)
