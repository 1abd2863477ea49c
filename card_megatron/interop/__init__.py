"""Taking models to and from other libraries: export to ``transformers`` (:mod:`.hf_export`), import of
Llama-family checkpoints (:mod:`.hf_import`) and the ``transformers`` anchor of the decoding benchmark
(:mod:`.anchor`). Above loading and inference: it uses them, they never use it."""
