"""``make demo``'s report (``tools/demo.sh`` runs ``tools/demo_report.py``)."""
