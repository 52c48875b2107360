"""``make bench``: spark-ray-udf against the alternatives, side by side (see ``run.py``)."""
