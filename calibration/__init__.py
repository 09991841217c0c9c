"""Calibration and evaluation text: load real text, tokenize it, cache the result by content hash.

Sources (see README.md, `readers.py`): a plain text file (one sample a line), a TSV/CSV file
with a header and a named text column, JSON Lines, Parquet (with `pyarrow`), or a Hugging Face
dataset name (`name[:config][:split]`) where a hub is reachable and `datasets` is installed.
"""

from calibration.readers import default_text_path
from calibration.text import TokenizedSet, load_texts, tokenized_set

__all__ = ["TokenizedSet", "default_text_path", "load_texts", "tokenized_set"]
