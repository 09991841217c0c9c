"""Calibration and evaluation text: load real text, tokenize it, cache the result by content hash.

Sources (see README.md): a plain text file (one sample a line), a TSV/CSV file with a header
and a named text column, or a Hugging Face dataset name (`name[:config][:split][:column]`)
where a hub is reachable and the `datasets` package is installed.
"""

from calibration.text import TokenizedSet, default_text_path, load_texts, tokenized_set

__all__ = ["TokenizedSet", "default_text_path", "load_texts", "tokenized_set"]
