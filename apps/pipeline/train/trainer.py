"""Train a model bundle end to end: recall channels, features, ranker, evaluation. Pure core.

Time layout (point in time, no leakage)::

    ........ history ........ | T1 .. train labels .. | T2 .. validation labels .. | end
    recallers + features fit on ts < T1

Recallers and feature tables learn from events before ``T1`` only. Ranker examples are the
fused candidates of users active after ``T1``, labelled by what they did in ``[T1, T2)`` (train)
and ``[T2, end]`` (validation, used for early stopping and for the offline comparison). The
bundle that serves is then refitted on everything (recallers and features at ``end``); the
ranker learned at ``T1`` scores features of the same catalogue, as in production.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from apps.pipeline import evaluate as ev
from apps.pipeline import feature_store
from apps.pipeline import features as ft
from apps.pipeline.train import ranker as rk
from apps.pipeline.train.base import Candidates, Recaller, TrainingSet
from apps.pipeline.train.loader import write_smoke_requests

logger = logging.getLogger(__name__)

Log = Callable[[str], None]

DEFAULT_CHANNELS: tuple[str, ...] = (
    "itemcf",
    "usercf",
    "ease",
    "content",
    "tag",
    "category",
    "price_band",
    "popular",
    "trending",
    "vector",
    "semantic",
)

# Events that count as "relevant" when scoring offline recommendations: any deliberate
# engagement with an item, not a plain page view.
RELEVANT_EVENTS: tuple[str, ...] = (
    "detail_view",
    "search_click",
    "favorite",
    "sample_download",
    "add_to_cart",
    "task",
    "purchase",
)

# Label grades for the ranker (LightGBM grades are whole numbers).
LABEL_WEIGHTS: Mapping[str, float] = {
    "detail_view": 1,
    "search_click": 1,
    "favorite": 2,
    "sample_download": 2,
    "add_to_cart": 3,
    "task": 3,
    "purchase": 5,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run (recorded in the manifest and in MLflow)."""

    channels: tuple[str, ...] = DEFAULT_CHANNELS
    channel_weights: Mapping[str, float] = field(default_factory=dict)
    per_channel: int = 50
    fused: int = 200
    label_days: float = 10.0
    valid_days: float = 7.0
    k: int = 10
    objective: str = "lambdarank"
    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 31
    seed: int = 42
    max_users: int = 4000
    store_list_size: int = 50
    # Ranker label grade per event (whole numbers). Match it to what counts as relevant: where
    # every engagement is equally relevant (public benchmarks), binary grades fit the metric.
    label_weights: Mapping[str, float] = field(default_factory=lambda: dict(LABEL_WEIGHTS))

    def params(self) -> dict[str, Any]:
        """Flat parameters for MLflow."""
        nested = ("channels", "channel_weights", "label_weights")
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k not in nested}
        for event, grade in sorted(self.label_weights.items()):
            out[f"label_{event}"] = float(grade)
        out["channels"] = ",".join(self.channels)
        for name in self.channels:
            out[f"weight_{name}"] = float(self.channel_weights.get(name, 1.0))
        return out


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    bundle_dir: Path
    metrics: dict[str, float]
    comparison: dict[str, dict[str, float]]
    ranker_metrics: dict[str, float]
    channels: tuple[str, ...]
    skipped_channels: dict[str, str]
    feature_schema: list[dict[str, str]]
    timings: dict[str, float]
    cutoffs: dict[str, str]
    counts: dict[str, int]


def make_channel(name: str, config: TrainConfig) -> Recaller:
    """Instantiate a recall channel by name with the run's seed where it takes one."""
    from apps.pipeline.train.recall import RECALLERS

    cls = RECALLERS[name]
    try:
        return cls(seed=config.seed)  # type: ignore[call-arg]
    except TypeError:
        return cls()


def fit_channels(
    data: TrainingSet, config: TrainConfig, log: Log
) -> tuple[dict[str, Recaller], dict[str, str]]:
    """Fit every configured channel; a channel that cannot run here is skipped with a reason."""
    fitted: dict[str, Recaller] = {}
    skipped: dict[str, str] = {}
    for name in config.channels:
        started = time.perf_counter()
        try:
            fitted[name] = make_channel(name, config).fit(data)
        except ImportError as exc:  # the semantic channel's optional requirements
            skipped[name] = str(exc).splitlines()[0]
            log(f"channel {name} skipped: {skipped[name]}")
            continue
        log(f"channel {name} fitted in {time.perf_counter() - started:.1f}s")
    return fitted, skipped


def recall_lists(
    channels: Mapping[str, Recaller], users: np.ndarray, config: TrainConfig
) -> dict[str, dict[int, Candidates]]:
    """Each channel's top ``config.per_channel`` candidates per user (``channel -> user ->
    (ids, scores)``): what ``candidate_pairs`` fuses, and what serving reads from Redis."""
    return {name: ch.recommend(users, config.per_channel) for name, ch in channels.items()}


def candidate_pairs(
    channels: Mapping[str, Recaller],
    users: np.ndarray,
    config: TrainConfig,
    lists: Mapping[str, Mapping[int, Candidates]] | None = None,
) -> pd.DataFrame:
    """Fused candidates per user with each channel's score and rank as columns.

    Returns ``user_id, item_id, fused_score, fused_rank, channel`` plus
    ``recall_score_<c>``/``recall_rank_<c>`` for every channel (absent: 0 / MISSING_RANK).
    ``lists`` are the channels' recall lists when the caller already has them.
    """
    from apps.pipeline.train.recall import fuse

    if lists is None:
        lists = recall_lists(channels, users, config)
    empty: Candidates = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
    fused_parts: list[pd.DataFrame] = []
    long_parts: list[pd.DataFrame] = []
    for name, per_user in lists.items():
        for user, (ids, scores) in per_user.items():
            if len(ids):
                long_parts.append(
                    pd.DataFrame(
                        {
                            "user_id": user,
                            "item_id": ids,
                            "channel": name,
                            "score": scores.astype(np.float32),
                            "rank": np.arange(1, len(ids) + 1, dtype=np.float32),
                        }
                    )
                )
    for user in users.tolist():
        per = {name: lists[name].get(user, empty) for name in channels}
        ids, scores, chans = fuse(per, config.channel_weights, config.fused)
        if len(ids):
            fused_parts.append(
                pd.DataFrame(
                    {
                        "user_id": user,
                        "item_id": ids,
                        "fused_score": scores,
                        "fused_rank": np.arange(1, len(ids) + 1),
                        "channel": chans.astype(str),
                    }
                )
            )
    if not fused_parts:
        return pd.DataFrame(columns=["user_id", "item_id", "fused_score", "fused_rank", "channel"])
    fused = pd.concat(fused_parts, ignore_index=True)
    if long_parts:
        long = pd.concat(long_parts, ignore_index=True)
        wide = long.pivot_table(
            index=["user_id", "item_id"],
            columns="channel",
            values=["score", "rank"],
            aggfunc="first",
        )
        wide.columns = [f"recall_{kind}_{ch}" for kind, ch in wide.columns]
        fused = fused.merge(wide.reset_index(), on=["user_id", "item_id"], how="left")
    for name in ft.RECALL_CHANNELS:
        score, rank = f"recall_score_{name}", f"recall_rank_{name}"
        fused[score] = fused[score].fillna(0.0) if score in fused else 0.0
        fused[rank] = fused[rank].fillna(ft.MISSING_RANK) if rank in fused else ft.MISSING_RANK
    return fused


def _truth(
    interactions: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp | None
) -> dict[int, set[int]]:
    window = interactions[
        (interactions["ts"] >= start) & (interactions["event"].isin(RELEVANT_EVENTS))
    ]
    if end is not None:
        window = window[window["ts"] < end]
    window = window.dropna(subset=["user_id", "item_id"])
    return {
        int(u): set(map(int, g))
        for u, g in window.groupby(window["user_id"].astype("int64"))["item_id"]
    }


def _recs_from(
    frame: pd.DataFrame, score: str, k: int
) -> tuple[dict[int, list[int]], dict[int, list[str]]]:
    ordered = frame.sort_values(["user_id", score], ascending=[True, False], kind="stable")
    top = ordered.groupby("user_id", sort=False).head(k)
    recs = {int(u): g.tolist() for u, g in top.groupby("user_id", sort=False)["item_id"]}
    chans = {int(u): g.tolist() for u, g in top.groupby("user_id", sort=False)["channel"]}
    return recs, chans


def _sample_users(users: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if users.size <= limit:
        return np.sort(users)
    return np.sort(np.random.default_rng(seed).choice(users, size=limit, replace=False))


def train_bundle(
    frames: Mapping[str, pd.DataFrame],
    config: TrainConfig,
    bundle_dir: Path,
    *,
    log: Log | None = None,
) -> TrainResult:
    """Run the whole training and write the bundle's artefacts (not the manifest) to ``bundle_dir``."""
    say = log or logger.info
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    inter = frames["interactions"]
    known = inter.dropna(subset=["user_id", "item_id"])
    if known.empty:
        raise ValueError("no interactions with a known user and item: nothing to learn from")
    end = known["ts"].max() + pd.Timedelta(seconds=1)
    t2 = end - pd.Timedelta(days=config.valid_days)
    t1 = t2 - pd.Timedelta(days=config.label_days)
    past = TrainingSet.from_frames(frames, cutoff=t1)
    if past.interactions.empty:
        raise ValueError(f"no interactions before the training cutoff {t1}; need more history")

    # 1. Recall and features as of T1.
    channels, skipped = fit_channels(past, config, say)
    lap("fit_channels_t1")
    builder = ft.FeatureBuilder(cutoff=t1).fit(past)
    lap("fit_features_t1")

    # 2. Ranker examples: train labels in [T1, T2), validation labels in [T2, end].
    train_truth = _truth(inter, t1, t2)
    valid_truth = _truth(inter, t2, None)
    train_users = _sample_users(
        np.fromiter(train_truth, dtype=np.int64), config.max_users, config.seed
    )
    valid_users = _sample_users(
        np.fromiter(valid_truth, dtype=np.int64), config.max_users, config.seed + 1
    )
    after = inter[inter["ts"] >= t1]
    examples: dict[str, pd.DataFrame] = {}
    matrices: dict[str, np.ndarray] = {}
    for split, users, start, stop, now in (
        ("train", train_users, t1, t2, t1),
        ("valid", valid_users, t2, None, t2),
    ):
        pairs = candidate_pairs(channels, users, config)
        window = after[
            (after["ts"] >= start) & ((after["ts"] < stop) if stop is not None else True)
        ]
        labels = rk.build_labels(
            pairs[["user_id", "item_id"]], window, config.label_weights, graded=True
        )
        pairs = pairs.merge(
            labels[["user_id", "item_id", "label"]], on=["user_id", "item_id"], how="left"
        )
        pairs["label"] = pairs["label"].fillna(0).astype("int64")
        pairs = pairs.sort_values(["user_id", "fused_rank"], kind="stable").reset_index(drop=True)
        X, names = builder.transform_pairs(pairs, now)
        examples[split], matrices[split] = pairs, X
    feature_names = names
    lap("build_examples")

    # 3. Rankers: LightGBM with early stopping on the later window, logistic fallback.
    train, valid = examples["train"], examples["valid"]
    if train["label"].sum() == 0 or valid["label"].sum() == 0:
        raise ValueError(
            "no positive ranker examples: recall found none of the items users engaged with"
        )
    ranker = rk.LGBMRanker(
        config.objective,
        n_estimators=config.n_estimators,
        learning_rate=config.learning_rate,
        num_leaves=config.num_leaves,
        seed=config.seed,
        num_threads=2,
    ).fit(
        matrices["train"],
        train["label"].to_numpy(),
        rk.group_sizes(train),
        matrices["valid"],
        valid["label"].to_numpy(),
        rk.group_sizes(valid),
        feature_names=feature_names,
    )
    fallback = rk.LogisticRanker(seed=config.seed).fit(
        matrices["train"], (train["label"].to_numpy() > 0).astype(int), feature_names=feature_names
    )
    lap("fit_ranker")

    # 4. Offline comparison on the validation window: popularity, each channel, fused, ranked.
    valid["ranked_score"] = ranker.predict(matrices["valid"])
    valid["fallback_score"] = fallback.predict(matrices["valid"])
    valid_truth_sampled = {u: valid_truth[u] for u in valid_users.tolist()}
    popularity = ev.popularity_from(past.interactions)
    n_items = int(frames["items"]["item_id"].nunique())
    categories = dict(
        zip(
            frames["items"]["item_id"].astype(int),
            frames["items"]["category"].astype(str),
            strict=False,
        )
    )

    def score(
        recs: Mapping[int, Sequence[int]], chans: Mapping[int, Sequence[str]] | None = None
    ) -> dict[str, float]:
        return ev.evaluate(
            recs,
            valid_truth_sampled,
            k=config.k,
            item_popularity=popularity,
            n_items=n_items,
            item_categories=categories,
            channels=chans,
        )

    comparison: dict[str, dict[str, float]] = {}
    for name, channel in channels.items():
        lists = channel.recommend(valid_users, config.k)
        comparison[name] = score({u: ids.tolist() for u, (ids, _) in lists.items()})
    fused_recs, fused_chans = _recs_from(valid, "fused_score", config.k)
    comparison["fused"] = score(fused_recs, fused_chans)
    ranked_recs, ranked_chans = _recs_from(valid, "ranked_score", config.k)
    comparison["ranked"] = score(ranked_recs, ranked_chans)
    fallback_recs, _ = _recs_from(valid, "fallback_score", config.k)
    comparison["ranked_logistic"] = score(fallback_recs)
    metrics = dict(comparison["ranked"])
    metrics.update({f"ranker_{k}": v for k, v in ranker.metrics_.items()})
    lap("evaluate")
    say(
        "validation ndcg@{k}: popular {p:.4f} fused {f:.4f} ranked {r:.4f}".format(
            k=config.k,
            p=comparison.get("popular", {}).get(f"ndcg@{config.k}", float("nan")),
            f=comparison["fused"][f"ndcg@{config.k}"],
            r=comparison["ranked"][f"ndcg@{config.k}"],
        )
    )

    # 5. The serving bundle: refit recall and features on everything, keep the ranker.
    bundle_dir.mkdir(parents=True, exist_ok=True)
    full = TrainingSet.from_frames(frames, cutoff=end)
    final_channels, _ = fit_channels(full, config, say)
    final_builder = ft.FeatureBuilder(cutoff=end).fit(full)
    lap("refit_full")
    for name, channel in final_channels.items():
        channel.save(bundle_dir / "recall" / name)
    final_builder.save(bundle_dir / "features")
    # The offline feature tables as Parquet and as the read-only SQLite store serving falls
    # back to; the version is the bundle directory's name.
    tables = final_builder.tables()
    feature_store.write_parquet(bundle_dir / "feature_tables", tables)
    feature_store.write_sqlite(bundle_dir / "features.sqlite3", tables, version=bundle_dir.name)
    ranker.save(bundle_dir / "ranker")
    fallback.save(bundle_dir / "ranker_fallback")
    onnx_path = rk.export_onnx(ranker, len(feature_names), bundle_dir / "ranker" / "model.onnx")
    sample = matrices["valid"][: min(500, len(matrices["valid"]))]
    try:
        metrics["onnx_max_abs_diff"] = float(rk.verify_onnx(onnx_path, ranker, sample, atol=1e-5))
        metrics["onnx_verified"] = 1.0
    except rk.OnnxMismatchError as exc:
        # Seen on small models: a few rows whose feature equals a split threshold that ONNX
        # stores in float32 fall on the other side. Ship no ONNX file rather than a scorer that
        # disagrees; serving then scores with native LightGBM.
        onnx_path.unlink()
        metrics["onnx_verified"] = 0.0
        say(f"ONNX export not shipped: {exc}")
    write_smoke_requests(bundle_dir, matrices["valid"], feature_names)
    # The catalogue serving shows with each recommendation (title, price, category).
    catalogue = frames["items"][["item_id", "title", "price", "category", "is_active"]].copy()
    catalogue.to_parquet(bundle_dir / "items.parquet", index=False)
    lap("save_artifacts")
    _write_local_store(
        bundle_dir / "store.sqlite3", final_channels, final_builder, ranker, frames, config, full
    )
    lap("local_store")
    (bundle_dir / "training.json").write_text(
        json.dumps(
            {
                "config": config.params(),
                "comparison": comparison,
                "ranker": ranker.metrics_,
                "cutoffs": {"t1": t1.isoformat(), "t2": t2.isoformat(), "end": end.isoformat()},
            },
            indent=2,
            default=float,
        )
    )
    return TrainResult(
        bundle_dir=bundle_dir,
        metrics={k: float(v) for k, v in metrics.items()},
        comparison=comparison,
        ranker_metrics={k: float(v) for k, v in ranker.metrics_.items()},
        channels=tuple(final_channels),
        skipped_channels=skipped,
        feature_schema=ft.feature_schema(),
        timings=timings,
        cutoffs={"t1": t1.isoformat(), "t2": t2.isoformat(), "end": end.isoformat()},
        counts={
            "train_examples": len(train),
            "valid_examples": len(valid),
            "train_users": int(train_users.size),
            "valid_users": int(valid_users.size),
            "interactions": len(inter),
        },
    )


def pack_candidates(ids: np.ndarray, scores: np.ndarray) -> bytes:
    """One recall list as stored in `user_candidates`: int64 ids, then float32 scores (LE)."""
    return np.asarray(ids, dtype="<i8").tobytes() + np.asarray(scores, dtype="<f4").tobytes()


def unpack_candidates(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `pack_candidates`; ValueError when `blob` is not one."""
    if len(blob) % 12:
        raise ValueError(f"not a packed candidate list ({len(blob)} bytes)")
    n = len(blob) // 12
    ids = np.frombuffer(blob, dtype="<i8", count=n)
    return ids, np.frombuffer(blob, dtype="<f4", count=n, offset=8 * n)


def _write_local_store(
    path: Path,
    channels: Mapping[str, Recaller],
    builder: ft.FeatureBuilder,
    ranker: rk.LGBMRanker,
    frames: Mapping[str, pd.DataFrame],
    config: TrainConfig,
    data: TrainingSet,
) -> None:
    """The bundle's read-only fallback store: ranked lists per user, similar items, popular,
    and each user's per-channel recall lists.

    Serving reads the ranked lists when Redis is down (and uses them as the online store when
    no Redis is configured), so they hold final answers: no model runs on that path. The
    recall lists (`user_candidates`, one packed row per user and channel: int64 ids then
    float32 scores, little-endian) are what `publish` puts in Redis for the online ranker:
    the same candidates, in the same order, that the ranker was trained and scored on here.
    """
    import sqlite3

    users = np.unique(data.interactions["user_id"].to_numpy(dtype=np.int64))
    user_rows: list[tuple[int, str]] = []
    candidate_rows: list[tuple[int, str, bytes]] = []
    step = 1000
    for start in range(0, users.size, step):
        block = users[start : start + step]
        lists = recall_lists(channels, block, config)
        for name, per_user in lists.items():
            for user, (ids, scores) in per_user.items():
                if len(ids):
                    candidate_rows.append((int(user), name, pack_candidates(ids, scores)))
        pairs = candidate_pairs(channels, block, config, lists)
        if pairs.empty:
            continue
        X, _ = builder.transform_pairs(pairs)
        pairs["score"] = ranker.predict(X)
        top = (
            pairs.sort_values(["user_id", "score"], ascending=[True, False])
            .groupby("user_id")
            .head(config.store_list_size)
        )
        for user, group in top.groupby("user_id"):
            user_rows.append(
                (
                    int(user),
                    json.dumps(
                        [
                            [int(i), round(float(s), 6), str(c)]
                            for i, s, c in zip(
                                group["item_id"], group["score"], group["channel"], strict=True
                            )
                        ]
                    ),
                )
            )
    items = frames["items"]
    active = items.loc[items["is_active"], "item_id"].astype("int64").to_numpy()
    similar_rows: list[tuple[int, str]] = []
    for name in ("itemcf", "content", "semantic", "vector"):
        channel = channels.get(name)
        if channel is None:
            continue
        for item, (ids, scores) in channel.similar(active, config.store_list_size).items():
            similar_rows.append(
                (
                    int(item),
                    json.dumps(
                        {
                            "channel": name,
                            "items": [
                                [int(i), round(float(s), 6)]
                                for i, s in zip(ids, scores, strict=True)
                            ],
                        }
                    ),
                )
            )
    popular = channels.get("popular")
    popular_rows: list[tuple[int, int, float]] = []
    if popular is not None:
        ids, scores = popular.recommend([-1], config.store_list_size * 2, exclude_seen=False)[-1]
        popular_rows = [
            (rank, int(i), float(s)) for rank, (i, s) in enumerate(zip(ids, scores, strict=True), 1)
        ]
    if path.exists():
        path.unlink()
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE user_recs (user_id INTEGER PRIMARY KEY, items TEXT NOT NULL);"
            "CREATE TABLE similar_items (item_id INTEGER, channel_items TEXT NOT NULL);"
            "CREATE INDEX similar_items_item ON similar_items (item_id);"
            "CREATE TABLE popular (rank INTEGER PRIMARY KEY, item_id INTEGER NOT NULL, score REAL NOT NULL);"
            "CREATE TABLE user_candidates (user_id INTEGER NOT NULL, channel TEXT NOT NULL,"
            " items BLOB NOT NULL, PRIMARY KEY (user_id, channel)) WITHOUT ROWID;"
        )
        conn.executemany("INSERT INTO user_candidates VALUES (?, ?, ?)", candidate_rows)
        conn.executemany("INSERT INTO user_recs VALUES (?, ?)", user_rows)
        conn.executemany("INSERT INTO similar_items VALUES (?, ?)", similar_rows)
        conn.executemany("INSERT INTO popular VALUES (?, ?, ?)", popular_rows)
    conn.close()
