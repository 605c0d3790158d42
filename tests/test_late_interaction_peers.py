"""mmfast.late_interaction_loss against colpali-engine's ColbertLoss / ColbertPairwiseCELoss and
PyLate's contrastive loss, on the cases they share.

Neither can share this environment: colpali-engine requires torchvision (never installed here) and
peft < 0.21, PyLate pins sentence-transformers 5.3.0 and transformers <= 5.3.0. So a session fixture
installs pinned copies with `pip install --no-deps --target .peer-losses` at the checkout's root
(once; a failed install fails these tests, it never skips them; benchmarks/peer_losses.py, which the
benchmark shares) and loads only their loss modules, by path:

- colpali-engine: colpali_engine/utils/maxsim.py and colpali_engine/loss/late_interaction_losses.py,
  the real files, under empty package shells (the real colpali_engine/__init__.py imports its models,
  hence transformers and torchvision). COLPALI_SCORES_BACKEND=torch picks its einsum scores.
- PyLate: pylate/utils/tensor.py, pylate/scores/{colbert,_flash_backend,_lik_backend}.py and
  pylate/losses/contrastive.py, the real files; pylate.models.ColBERT is a light stub holding only
  the real skiplist_mask rule the loss calls, pylate.utils a stub of the distributed helpers (unused
  on one process) and the model a stub returning given token embeddings. PYLATE_SCORES_BACKEND=torch.

Shared cases: colpali-engine marks padding by zero vectors (a padded query token scores 0, which our
query mask drops too) and has no document mask: documents are unpadded. PyLate multiplies padded
document tokens' scores by 0 instead of leaving them out: documents unpadded there too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmfast
from tests.helpers import BACKENDS, unit_rows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peer_losses  # noqa: E402


@pytest.fixture(scope="session")
def peer_site() -> Path:
    return peer_losses.install()


@pytest.fixture
def colpali(peer_site, monkeypatch):
    monkeypatch.setenv("COLPALI_SCORES_BACKEND", "torch")
    saved = {k: v for k, v in sys.modules.items() if k.startswith("colpali_engine")}
    yield peer_losses.load_colpali_losses(peer_site)
    for k in [k for k in sys.modules if k.startswith("colpali_engine")]:
        del sys.modules[k]
    sys.modules.update(saved)


@pytest.fixture
def pylate(peer_site, monkeypatch):
    monkeypatch.setenv("PYLATE_SCORES_BACKEND", "torch")
    root = peer_site / "pylate"
    saved = {k: v for k, v in sys.modules.items() if k.startswith("pylate")}

    def skiplist_mask(input_ids, skiplist):  # pylate.models.ColBERT.skiplist_mask's rule
        return ~torch.isin(input_ids, torch.tensor(skiplist, dtype=torch.long, device=input_ids.device))

    def single_process_only(*args, **kwargs):
        raise AssertionError("the distributed helpers are stubbed: the test runs on one process")

    peer_losses.shell("pylate", root)
    colbert = type("ColBERT", (), {"skiplist_mask": staticmethod(skiplist_mask)})
    peer_losses.shell("pylate.models", None, ColBERT=colbert)
    distributed = dict(all_gather=single_process_only, all_gather_with_gradients=single_process_only,
                       get_rank=lambda: 0, get_world_size=lambda: 1)  # fmt: skip
    peer_losses.shell("pylate.utils", root / "utils", **distributed)
    peer_losses.load("pylate.utils.tensor", root / "utils" / "tensor.py")
    scores = peer_losses.shell("pylate.scores", root / "scores")
    for name in ("_flash_backend", "_lik_backend", "colbert"):
        peer_losses.load(f"pylate.scores.{name}", root / "scores" / f"{name}.py")
    scores.ColBERTScores = sys.modules["pylate.scores.colbert"].ColBERTScores
    peer_losses.shell("pylate.losses", root / "losses")
    yield peer_losses.load("pylate.losses.contrastive", root / "losses" / "contrastive.py")
    for k in [k for k in sys.modules if k.startswith("pylate")]:
        del sys.modules[k]
    sys.modules.update(saved)


def padded_queries(b: int, lq: int, d: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit token vectors with ragged lengths (query 0 keeps one token), padding zeroed as colpali pads."""
    query = unit_rows(b, lq, d, generator=generator)
    lengths = torch.randint(1, lq + 1, (b,), generator=generator)
    lengths[0] = 1
    mask = torch.arange(lq)[None, :] < lengths[:, None]
    return query * mask[..., None], mask


def grads_of(loss_fn, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("peer_loss", ["ColbertLoss", "ColbertPairwiseCELoss"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_colpali_engine(colpali, backend, peer_loss, normalize):
    g = torch.Generator().manual_seed(7 + normalize)
    query, mask = padded_queries(6, 5, 16, g)
    document = unit_rows(6, 9, 16, generator=g)
    temperature = 0.02 if peer_loss == "ColbertLoss" else 0.5
    peer = getattr(colpali, peer_loss)(temperature=temperature, normalize_scores=normalize)
    loss = "infonce" if peer_loss == "ColbertLoss" else "pairwise"
    expected = grads_of(peer, query, document)
    ours = grads_of(lambda q, d: mmfast.late_interaction_loss(q.float(), d.float(), query_mask=mask, loss=loss,
                    temperature=temperature, normalize_scores=normalize, backend=backend), query, document)  # fmt: skip
    torch.testing.assert_close(ours[0].double(), expected[0], rtol=1e-5, atol=1e-6)
    # colpali-engine's padding tokens are zero vectors that still get a gradient; ours are left out.
    torch.testing.assert_close(ours[1][0].double(), expected[1][0] * mask[..., None], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1][1].double(), expected[1][1], rtol=1e-4, atol=1e-5)


class _TokenEmbeddings(torch.nn.Module):
    """The stub model: each feature dict carries its token embeddings."""

    skiplist: list[int] = []
    do_query_expansion = False

    def forward(self, features):
        return {"token_embeddings": features["embeddings"]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_pylate_contrastive(pylate, backend):
    g = torch.Generator().manual_seed(3)
    b, k = 5, 2
    query, mask = padded_queries(b, 6, 8, g)
    positives = unit_rows(b, 7, 8, generator=g)
    negatives = unit_rows(k, b, 7, 8, generator=g)  # PyLate: one feature dict per negative slot
    peer = pylate.Contrastive(model=_TokenEmbeddings(), temperature=0.05)

    def pylate_loss(q, p, n):
        def features(embeddings, attention):
            return {"embeddings": embeddings, "attention_mask": attention, "input_ids": attention.long()}

        full = torch.ones(b, 7, dtype=torch.long)
        return peer([features(q, mask.long()), features(p, full), *(features(n[i], full) for i in range(k))])

    def ours(q, p, n):
        q, p, n = (F.normalize(x, dim=-1) for x in (q, p, n))  # as PyLate's loss normalises its model's output
        flat = n.transpose(0, 1).reshape(b * k, 7, 8)  # shared negatives: any order of the candidates
        return mmfast.late_interaction_loss(q.float(), p.float(), flat.float(), query_mask=mask, temperature=0.05,
                                            backend=backend)  # fmt: skip

    expected, got = grads_of(pylate_loss, query, positives, negatives), grads_of(ours, query, positives, negatives)
    torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=1e-6)
    for a, e in zip(got[1], expected[1], strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)
