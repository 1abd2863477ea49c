"""Evaluation of trained checkpoints: perplexity on token shards (:mod:`.perplexity`) and the
lm-eval-harness model adapter (:mod:`.harness`)."""
