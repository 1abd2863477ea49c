"""The tools' logic: one module per tool with its options dataclass and ``main(argv)``, run by
``python -m card_megatron.tools.<name>``, a console script (``setup.py``) or ``python tools/<name>.py``."""
