"""Embedding cache: every unique (text, image) input is embedded once per model, and kept on disk.

Keys:
- the model: `model_fingerprint(encoder)`, a SHA-256 of the encoder's class, its `config` (the
  prompts live there) and a digest of every parameter and buffer: name, shape, dtype, the float64 sum
  and L2 norm, and up to 1024 evenly strided values. Reading each tensor once is cheap next to
  embedding anything, and any training step, adapter merge or dtype change moves it.
- the input: its text plus, for an image file, its resolved path, size and mtime (a replaced file is
  embedded again); for an in-memory PIL image, a hash of its pixels; for a lazy source (a decoded
  video frame, an image stored as bytes), the source's own `cache_key()`.

On disk: `<directory>/<sha256(model key)[:24]>/` holds `model.json` (what the fingerprint covers) and
shards `embeddings-*.pt` ({"keys": [...], "embeddings": float32 [n, D]}), each written atomically
after every block of newly embedded inputs, so an interrupted run keeps what it had embedded.

Multi-vector encoders (ColPali) return [n, L, D] token vectors, zero at padding: each input keeps its
real tokens only, shards hold them padded with zero tokens, and `embed` returns them padded to the
longest of the call ([n, L_max, D]; `encoder.token_mask` gives the mask back).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from ..video_inputs import Video

MAX_LOADED = 128


@runtime_checkable
class ImageSource(Protocol):
    """An image loaded only when it has to be embedded (a video frame, image bytes in a parquet)."""

    def cache_key(self) -> str: ...

    def load(self) -> Image.Image: ...


def _describe_configs(encoder) -> str:
    """The encoder's `config` (the backbone's) and `encoder_config` (prompts, pooling): both shape the embeddings."""
    parts = []
    for attribute in ("config", "encoder_config"):
        config = getattr(encoder, attribute, None)
        if config is not None:
            parts.append(repr(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config))
    return "\n".join(parts)


def model_fingerprint(encoder) -> str:
    """SHA-256 (hex) of the encoder's class, config and parameters; see the module note."""
    module = encoder if isinstance(encoder, torch.nn.Module) else getattr(encoder, "model", None)
    if not isinstance(module, torch.nn.Module):
        raise ValueError(
            f"cannot fingerprint {type(encoder).__name__}: it is not an nn.Module and has no `model` module; "
            "give EmbeddingCache(..., model_key=...) a string that changes whenever the model does"
        )
    digest = hashlib.sha256(f"{type(encoder).__module__}.{type(encoder).__qualname__}\n".encode())
    digest.update(_describe_configs(encoder).encode())
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"\n{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
            if tensor.is_meta or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            if flat.is_complex():
                flat = torch.view_as_real(flat).reshape(-1)
            # Reductions with dtype= accumulate in float64 without a float64 copy of the tensor.
            total = flat.sum(dtype=torch.float64).item()
            norm = torch.linalg.vector_norm(flat, dtype=torch.float64).item() if flat.is_floating_point() else 0.0
            sample = flat[:: max(1, flat.numel() // 1024)][:1024].to("cpu", torch.float64)
            digest.update(f" {total!r} {norm!r}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def input_key(text: str, image) -> str:
    """The cache key of one input (see the module note)."""
    if image is None:
        image_part = ""
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image).resolve()
        try:
            stat = path.stat()
        except OSError as error:
            raise FileNotFoundError(f"image file not found: {path} ({error.strerror})") from None
        image_part = f"file:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    elif isinstance(image, Image.Image):
        pixels = hashlib.sha256(f"{image.mode} {image.size}".encode())
        pixels.update(image.tobytes())
        image_part = "pixels:" + pixels.hexdigest()
    elif isinstance(image, ImageSource):
        image_part = "source:" + image.cache_key()
    elif isinstance(image, Video):  # keyed by its frames' own keys, in order
        image_part = "video:" + json.dumps([input_key("", frame) for frame in image.frames])
    else:
        kinds = "a path, a PIL image, an ImageSource, a Video or None"
        raise TypeError(f"an image must be {kinds}, got {type(image).__name__}")
    return hashlib.sha256(json.dumps([text, image_part]).encode()).hexdigest()


class EmbeddingCache:
    """Embeds inputs through `encoder.encode`, each unique input once.

    directory: where embeddings persist across runs (None: in memory only, for this object's life;
    such a cache must not outlive a change to the model's weights).
    model_key: replaces `model_fingerprint(encoder)` (needed when the encoder exposes no module).
    block_size: inputs per `encode` call; a shard is written after each block.
    Counters: `num_encoded` inputs embedded, `num_reused` found in the cache, `encode_calls`.
    """

    def __init__(
        self,
        encoder,
        directory: str | os.PathLike | None = None,
        *,
        model_key: str | None = None,
        batch_size: int = 32,
        show_progress: bool = True,
        block_size: int = 1024,
    ):
        if not callable(getattr(encoder, "encode", None)):
            raise TypeError(f"encoder must have an encode(texts, images, ...) method, got {type(encoder).__name__}")
        for name, value in (("batch_size", batch_size), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.encoder, self.batch_size, self.block_size = encoder, batch_size, block_size
        self.show_progress = show_progress
        self.num_encoded = self.num_reused = self.encode_calls = 0
        self._table: dict[str, torch.Tensor] = {}
        self._dim: int | None = None
        self.directory = None
        if directory is not None:
            self.model_key = model_key if model_key is not None else model_fingerprint(encoder)
            # Hashed again so that any model_key string makes one plain folder name.
            self.directory = Path(directory) / hashlib.sha256(self.model_key.encode()).hexdigest()[:24]
            self.directory.mkdir(parents=True, exist_ok=True)
            self._describe_model()
            self._load_shards()

    def embed(self, texts: Sequence[str], images: Sequence | None = None) -> torch.Tensor:
        """[n, D] float32 embeddings of (texts[i], images[i]); images entries: path, PIL image,
        ImageSource or None."""
        texts = list(texts)
        images = [None] * len(texts) if images is None else list(images)
        if len(images) != len(texts):
            raise ValueError(f"images must have one entry per text ({len(texts)}), got {len(images)}")
        keys = [input_key(text, image) for text, image in zip(texts, images, strict=True)]
        todo: dict[str, int] = {}
        for position, key in enumerate(keys):
            if key not in self._table and key not in todo:
                todo[key] = position
        self.num_reused += len(keys) - len(todo)
        self._encode([(key, texts[p], images[p]) for key, p in todo.items()])
        if not keys:
            return torch.zeros(0, self._dim or 0)
        rows = [self._table[key] for key in keys]
        if rows[0].dim() == 1:
            return torch.stack(rows)
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # token vectors: zero-padded

    def _encode(self, pending: list[tuple[str, str, object]]) -> None:
        if not pending:
            return
        # A block holds at most block_size inputs, and at most MAX_LOADED images decoded in memory
        # (video frames, inline bytes): paths are read by the encoder batch by batch, those are not.
        blocks, loaded = [[]], 0
        for item in pending:
            # `is not None` first: isinstance against a runtime-checkable Protocol costs ~30 µs per call.
            in_memory = item[2] is not None and isinstance(item[2], (ImageSource, Video))
            if len(blocks[-1]) == self.block_size or (in_memory and loaded == MAX_LOADED):
                blocks.append([])
                loaded = 0
            blocks[-1].append(item)
            loaded += in_memory
        bar = None
        if self.show_progress and len(blocks) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc="embedding", unit="input")
        for block in blocks:
            texts = [text for _, text, _ in block]
            images = [image.load() if image is not None and isinstance(image, (ImageSource, Video)) else image
                      for _, _, image in block]  # fmt: skip
            out = self.encoder.encode(
                texts,
                images if any(image is not None for image in images) else None,
                batch_size=self.batch_size,
                show_progress=self.show_progress and bar is None,
            )
            self.encode_calls += 1
            out = self._check_output(out, block)
            for row, (key, _, _) in enumerate(block):
                self._table[key] = _real_tokens(out[row])
            self.num_encoded += len(block)
            if self.directory is not None:
                self._write_shard([key for key, _, _ in block], out)
            if bar is not None:
                bar.update(len(block))
        if bar is not None:
            bar.close()

    def _check_output(self, out, block) -> torch.Tensor:
        name = type(self.encoder).__name__
        if not isinstance(out, torch.Tensor) or out.dim() not in (2, 3) or out.shape[0] != len(block):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{name}.encode returned {shape} for {len(block)} inputs; expected a [n, D] tensor "
                             "(or [n, L, D] token vectors)")  # fmt: skip
        if self._dim is not None and out.shape[-1] != self._dim:
            raise ValueError(f"{name}.encode returned dimension {out.shape[-1]}, the cache holds {self._dim}")
        out = out.detach().to("cpu", torch.float32).contiguous()
        bad = (~torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)).nonzero().squeeze(1)
        if bad.numel():
            _, text, image = block[int(bad[0])]
            raise ValueError(
                f"{name}.encode returned non-finite embeddings for {bad.numel()} of {len(block)} inputs "
                f"(the first: text {text[:80]!r}, image {image!r})"
            )
        self._dim = out.shape[-1]
        return out

    def _describe_model(self) -> None:
        described = {
            "model_key": self.model_key,
            "encoder": f"{type(self.encoder).__module__}.{type(self.encoder).__qualname__}",
            "config": _describe_configs(self.encoder),
        }
        path = self.directory / "model.json"
        if not path.exists():
            _atomic_write(path, lambda f: f.write(json.dumps(described, indent=2).encode()))

    def _load_shards(self) -> None:
        for path in sorted(self.directory.glob("embeddings-*.pt")):
            try:
                shard = torch.load(path, map_location="cpu", weights_only=True)
                keys, embeddings = shard["keys"], shard["embeddings"]
                well_formed = isinstance(keys, list) and isinstance(embeddings, torch.Tensor)
                well_formed = well_formed and embeddings.dim() in (2, 3) and embeddings.shape[0] == len(keys)
            except Exception as error:  # a foreign or damaged file: say which, whatever torch.load raised
                raise ValueError(
                    f"embedding cache shard {path} cannot be read ({error}); delete it to rebuild"
                ) from None
            if not well_formed:
                raise ValueError(f"embedding cache shard {path} is malformed (keys/embeddings); delete it to rebuild")
            if self._dim is not None and embeddings.shape[-1] != self._dim:
                raise ValueError(
                    f"embedding cache shard {path} has dimension {embeddings.shape[-1]}, others {self._dim}"
                )
            self._dim = embeddings.shape[-1]
            self._table.update(zip(keys, map(_real_tokens, embeddings.float()), strict=True))

    def _write_shard(self, keys: list[str], embeddings: torch.Tensor) -> None:
        name = f"embeddings-{time.time_ns()}-{os.getpid()}-{self.encode_calls}.pt"
        _atomic_write(self.directory / name, lambda f: torch.save({"keys": keys, "embeddings": embeddings}, f))


def _real_tokens(embedding: torch.Tensor) -> torch.Tensor:
    """A [D] embedding as it is; a multi-vector one [L, D] without its padding (zero) tokens."""
    return embedding if embedding.dim() == 1 else embedding[embedding.ne(0).any(dim=-1)]


def _atomic_write(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        write(f)
    os.replace(temporary, path)


def as_cache(encoder, cache, *, batch_size: int = 32, show_progress: bool = True) -> EmbeddingCache:
    """`cache` as the evaluators take it: None (in memory), a directory, or an EmbeddingCache of this encoder."""
    if isinstance(cache, EmbeddingCache):
        if cache.encoder is not encoder:
            raise ValueError("cache is an EmbeddingCache of another encoder")
        return cache
    if cache is not None and not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache must be None, a directory or an EmbeddingCache, got {type(cache).__name__}")
    return EmbeddingCache(encoder, cache, batch_size=batch_size, show_progress=show_progress)
